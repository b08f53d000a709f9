"""Worker for tests/test_train_preemption.py: a tiny run that checkpoints after every step.

usage: python preemption_worker.py OUT [--slow-write SECONDS]

Resumes from OUT/checkpoint.pt when it exists. Prints ``step N`` (flushed) after every optimizer
step, so the test knows how far it got; with ``--slow-write`` every checkpoint write pauses that long
before its fsync and touches ``OUT/writing`` meanwhile (a slow disk: a window to kill the process
mid-write). At the end it saves the weights, optimizer state and selection index to ``OUT/final.pt``.
A stop signal ends it with the trainer's message and exit code 128 + signal.
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from test_train_run import tiny_config, tiny_digits  # noqa: E402

from tofa_fast.train import Trainer  # noqa: E402
from tofa_fast.train.preemption import TrainingStopped  # noqa: E402


def main() -> int:
    out = sys.argv[1]
    slow = float(sys.argv[sys.argv.index("--slow-write") + 1]) if "--slow-write" in sys.argv else 0.0
    torch.set_num_threads(1)
    if slow:
        fsync = os.fsync

        def slow_fsync(fd: int) -> None:
            marker = os.path.join(out, "writing")
            open(marker, "w").close()
            time.sleep(slow)
            fsync(fd)
            os.remove(marker)

        os.fsync = slow_fsync
    resume = os.path.exists(os.path.join(out, "checkpoint.pt"))
    trainer = Trainer(tiny_config(out, checkpoint_every=1), splits=tiny_digits(), resume=resume)
    step = trainer.train_step

    def reporting_step(*args, **kwargs):
        terms = step(*args, **kwargs)
        print(f"step {trainer.step}", flush=True)
        return terms

    trainer.train_step = reporting_step
    try:
        trainer.fit()
    except TrainingStopped as stop:
        print(stop, file=sys.stderr, flush=True)
        return stop.exit_code
    torch.save(
        {
            "model": trainer.net.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "selection": trainer.selection.state_dict(),
            "step": trainer.step,
        },
        os.path.join(out, "final.pt"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
