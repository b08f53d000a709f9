"""Worker for tests/test_train_distributed.py: trains a tiny run, alone or as one torchrun rank.

usage: python distributed_worker.py OUT EPOCHS FREEZE_BN [--resume] [--stop-after N] [--signal-at N]

``--signal-at N`` makes rank 0 alone see a SIGTERM during step N (one node of a job pre-empted
first); every rank must then stop at the same step, which it writes to ``OUT.rank<R>.stopped``.

Besides the run folder (written by rank 0 only), every rank saves its final weights to
``OUT.rank<R>.pt`` *outside* the run folder, so the test can compare ranks.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from test_train_run import tiny_digits  # noqa: E402

from tofa_fast.train import TrainConfig, Trainer  # noqa: E402
from tofa_fast.train.preemption import TrainingStopped  # noqa: E402


def main() -> None:
    out, epochs, freeze_bn = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    resume = "--resume" in sys.argv
    stop_after = int(sys.argv[sys.argv.index("--stop-after") + 1]) if "--stop-after" in sys.argv else None
    signal_at = int(sys.argv[sys.argv.index("--signal-at") + 1]) if "--signal-at" in sys.argv else None
    torch.set_num_threads(1)
    config = TrainConfig(
        out=out,
        epochs=epochs,
        batch_size=8,
        seed=3,
        palette_size=2,
        calibration_images=40,
        device="cpu",
        freeze_bn=freeze_bn,
        dropout=0.0,
        drop_connect=0.0,
        log_every=2,  # ranks agree on signals every 2 steps
    )
    trainer = Trainer(config, splits=tiny_digits(), resume=resume)
    rank = trainer.dist.rank
    if signal_at is not None and rank == 0:
        step = trainer.train_step

        def step_then_signal(*args, **kwargs):
            terms = step(*args, **kwargs)
            if trainer.step == signal_at:
                trainer._signals.requested = signal.SIGTERM
            return terms

        trainer.train_step = step_then_signal
    try:
        trainer.fit(max_epochs=stop_after)
    except TrainingStopped as stop:
        with open(f"{out}.rank{rank}.stopped", "w") as f:
            f.write(str(stop.step))
    torch.save({k: v.clone() for k, v in trainer.net.state_dict().items()}, f"{out}.rank{rank}.pt")
    from tofa_fast.train.distributed import shutdown

    shutdown()


if __name__ == "__main__":
    main()
