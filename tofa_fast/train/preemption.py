"""Surviving pre-emption: when to write a mid-epoch checkpoint, and stopping cleanly on a signal.

Cluster schedulers pre-empt a job with SIGTERM (then SIGKILL after a grace period); a person stops
one with Ctrl-C (SIGINT). :class:`StopSignals` turns either into a request the trainer honours at
the next step boundary: it writes a checkpoint there and raises :class:`TrainingStopped`, which the
CLI reports with the command that resumes. A second Ctrl-C interrupts at once, as usual.

:class:`CheckpointClock` says when a mid-epoch checkpoint is due (every N steps and/or every M
minutes), so a SIGKILL loses at most that much work. Under ``torchrun`` the time-based and signal
decisions are combined over ranks (:meth:`CheckpointClock.agree`), so every rank checkpoints and
stops at the same step.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

import torch

from . import distributed as dist_utils


class TrainingStopped(Exception):
    """Training stopped at a step boundary on a signal, after writing a checkpoint."""

    def __init__(self, signum: int, checkpoint: str, epoch: int, step: int):
        self.signum, self.checkpoint, self.epoch, self.step = signum, checkpoint, epoch, step
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step} (epoch {epoch + 1}); checkpoint {checkpoint} written")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for a process ended by a signal


class StopSignals:
    """While active (a context manager), SIGTERM and SIGINT request a stop instead of killing.

    Signal handlers can only be installed from the main thread; elsewhere this does nothing and the
    signals keep their default behaviour."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the person does not want to wait
        self.requested = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class CheckpointClock:
    """When a mid-epoch checkpoint is due: every ``every_steps`` optimizer steps (deterministic,
    the same on every rank) and/or every ``every_minutes`` of wall time since the last one."""

    def __init__(self, every_steps: int | None, every_minutes: float | None):
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self.last = time.monotonic()

    def reset(self) -> None:
        self.last = time.monotonic()

    def steps_due(self, step: int) -> bool:
        return self.every_steps is not None and step % self.every_steps == 0

    def time_due(self) -> bool:
        return self.every_minutes is not None and time.monotonic() - self.last >= 60 * self.every_minutes

    def agree(self, stop: int | None, ctx: dist_utils.DistContext) -> tuple[bool, int | None]:
        """(a time-based checkpoint is due, the stop signal) as all ranks see them: the maximum
        over ranks, so one rank's signal or clock stops or checkpoints every rank at this step."""
        due = self.time_due()
        if not ctx.enabled:
            return due, stop
        flags = torch.tensor([float(due), float(stop or 0)], dtype=torch.float64)
        flags = dist_utils.all_reduce_max(flags, ctx)
        return bool(flags[0]), int(flags[1]) or None
