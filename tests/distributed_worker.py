"""Worker for tests/test_train_distributed.py: trains a tiny run, alone or as one torchrun rank.

usage: python distributed_worker.py OUT EPOCHS FREEZE_BN [--resume] [--stop-after N]

Besides the run folder (written by rank 0 only), every rank saves its final weights to
``OUT.rank<R>.pt`` *outside* the run folder, so the test can compare ranks.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from test_train_run import tiny_digits  # noqa: E402

from tofa_fast.train import TrainConfig, Trainer  # noqa: E402


def main() -> None:
    out, epochs, freeze_bn = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    resume = "--resume" in sys.argv
    stop_after = int(sys.argv[sys.argv.index("--stop-after") + 1]) if "--stop-after" in sys.argv else None
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
    )
    trainer = Trainer(config, splits=tiny_digits(), resume=resume)
    trainer.fit(max_epochs=stop_after)
    rank = trainer.dist.rank
    torch.save({k: v.clone() for k, v in trainer.net.state_dict().items()}, f"{out}.rank{rank}.pt")
    from tofa_fast.train.distributed import shutdown

    shutdown()


if __name__ == "__main__":
    main()
