"""Runs survive pre-emption (SPEC §12): mid-epoch checkpoints, SIGTERM / SIGINT, SIGKILL at random
moments (during a checkpoint write too), failed writes. Every resumed run must equal the
uninterrupted one bit for bit: weights, optimizer state, selection index."""

from __future__ import annotations

import errno
import glob
import os
import queue
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import replace

import pytest
import torch
from test_train_run import tiny_config, tiny_digits

from tofa_fast.cli import main
from tofa_fast.train import Trainer, load_checkpoint
from tofa_fast.train import checkpoint as checkpoint_module
from tofa_fast.train.preemption import CheckpointClock, TrainingStopped

WORKER = os.path.join(os.path.dirname(__file__), "preemption_worker.py")


def _assert_same_training(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["selection"] == b["selection"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key]["momentum_buffer"], sb[key]["momentum_buffer"]), key


def _final(trainer: Trainer) -> dict:
    return {
        "model": trainer.net.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "selection": trainer.selection.state_dict(),
        "step": trainer.step,
    }


def _signal_at(trainer: Trainer, step: int, signum: int = signal.SIGTERM) -> None:
    """Make the trainer see ``signum`` arrive during optimizer step ``step``."""
    original = trainer.train_step

    def step_then_signal(*args, **kwargs):
        terms = original(*args, **kwargs)
        if trainer.step == step:
            trainer._signals.requested = signum
        return terms

    trainer.train_step = step_then_signal


@pytest.mark.parametrize("strategy,epochs,stop_at", [("tofa", 2, 3), ("ps", 6, 3)])
def test_a_stop_signal_checkpoints_mid_epoch_and_resume_is_exact(tmp_path, strategy, epochs, stop_at):
    # ps (2 steps per epoch: passes over the 20 labelled images): step 3 is inside epoch 1, the kernel
    # phase, whose start re-sorted nothing but cleared the optimizer and froze the teacher — a resume
    # must not do that again mid-epoch.
    splits = tiny_digits()
    config = replace(tiny_config(tmp_path / "a", strategy=strategy), epochs=epochs)
    straight = Trainer(config, splits=splits)
    straight.fit()
    stopped = Trainer(replace(config, out=str(tmp_path / "b")), splits=splits)
    _signal_at(stopped, stop_at)
    with pytest.raises(TrainingStopped, match=f"stopped by SIGTERM after step {stop_at} ") as info:
        stopped.fit()
    assert info.value.exit_code == 128 + signal.SIGTERM
    state = load_checkpoint(str(tmp_path / "b" / "checkpoint.pt"))
    assert state["step"] == stop_at and "epoch_progress" in state
    resumed = Trainer(replace(config, out=str(tmp_path / "b")), splits=splits, resume=True)
    resumed.fit()
    _assert_same_training(_final(straight), _final(resumed))
    if strategy == "ps":
        for key, value in straight.strategy.teacher().state_dict().items():
            assert torch.equal(value, resumed.strategy.teacher().state_dict()[key]), key


def test_checkpoint_every_and_minutes(tmp_path, monkeypatch):
    written = []
    save = checkpoint_module.save_atomic

    def counting_save(obj, path):
        written.append(obj["step"])
        save(obj, path)

    monkeypatch.setattr("tofa_fast.train.trainer.save_atomic", counting_save)
    trainer = Trainer(tiny_config(tmp_path, checkpoint_every=2), splits=tiny_digits())
    trainer.fit()
    assert written == [2, 4, 5, 6, 8, 10]  # every 2 steps mid-epoch, and every epoch's end (5 steps each)
    clock = CheckpointClock(None, 1e-9)
    assert clock.time_due() and not clock.steps_due(4)
    assert not CheckpointClock(None, 60.0).time_due()


def _partial_save_then(error: OSError):
    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise error

    return failing_save


@pytest.mark.parametrize(
    "error,words",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
    ],
)
def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error, words):
    trainer = Trainer(tiny_config(tmp_path), splits=tiny_digits())
    trainer.fit(max_epochs=1)
    path = str(tmp_path / "checkpoint.pt")
    before = open(path, "rb").read()
    if isinstance(error, PermissionError):  # root ignores file modes: make the folder refuse new files

        def refuse(*args, **kwargs):
            raise error

        monkeypatch.setattr(checkpoint_module.tempfile, "mkstemp", refuse)
    else:  # the disk fills up half-way through the write
        monkeypatch.setattr(checkpoint_module.torch, "save", _partial_save_then(error))
    with pytest.raises(OSError, match=f"could not write checkpoint .* at step 5: {words}; the previous checkpoint"):
        trainer.save()
    assert open(path, "rb").read() == before
    assert load_checkpoint(path)["step"] == 5
    assert glob.glob(str(tmp_path / ".tmp-*")) == []  # no half-written file left behind


def test_cli_reports_a_stop_with_the_resume_command(tmp_path, monkeypatch, capsys):
    def stopped(config, resume=False):
        raise TrainingStopped(signal.SIGTERM, f"{config.out}/checkpoint.pt", 0, 3)

    monkeypatch.setattr("tofa_fast.train.run.train", stopped)
    assert main(["train", "--out", str(tmp_path)]) == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after step 3" in err and f"tofa-fast train --out {tmp_path} --resume" in err


# -- real processes ---------------------------------------------------------------------------


class _Worker:
    """A preemption_worker.py process whose printed steps are read on a thread."""

    def __init__(self, out, *args: str):
        # stderr (progress bars) goes to a file: only the reader thread reads stdout, so no line is lost
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, WORKER, str(out), *args], stdout=subprocess.PIPE, stderr=self.err, text=True
        )
        self.steps: queue.Queue[int] = queue.Queue()
        self.last = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("step "):
                for step in re.findall(r"step (\d+)", line):
                    self.steps.put(int(step))

    def wait_for_step(self, step: int, timeout: float = 120) -> int:
        while self.last < step:
            self.last = self.steps.get(timeout=timeout)
        return self.last

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        self.proc.wait(timeout=timeout)
        self.reader.join(timeout=60)  # every line the process printed is in the queue now
        while not self.steps.empty():
            self.last = self.steps.get()
        self.err.seek(0)
        return self.proc.returncode, self.err.read()


def _checkpoint_step(out) -> int:
    """The step of the run's checkpoint (0 before the first: a kill can land before it is written)."""
    path = os.path.join(out, "checkpoint.pt")
    return load_checkpoint(path)["step"] if os.path.exists(path) else 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted")
    code, err = _Worker(out).finish()
    assert code == 0, err
    return torch.load(out / "final.pt", weights_only=True)


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(tmp_path, uninterrupted):
    rng = random.Random(2026)
    total = uninterrupted["step"]  # 10 steps, a checkpoint after each
    # 1: killed between steps, at a random one
    worker = _Worker(tmp_path)
    worker.wait_for_step(rng.randint(1, 3))
    worker.proc.kill()
    worker.finish()
    # 2: killed during a checkpoint write (a slow disk gives the window)
    worker = _Worker(tmp_path, "--slow-write", "1.0")
    marker = tmp_path / "writing"
    worker.wait_for_step(_checkpoint_step(tmp_path) + 1)
    while not marker.exists():  # the next write has started
        assert worker.proc.poll() is None
    worker.proc.kill()
    worker.finish()
    assert glob.glob(str(tmp_path / ".tmp-*.pt")), "the kill was meant to land mid-write"
    before = _checkpoint_step(tmp_path)  # the previous checkpoint, intact
    # 3: killed again at a random later step
    worker = _Worker(tmp_path)
    worker.wait_for_step(rng.randint(before + 1, total - 1))
    worker.proc.kill()
    worker.finish()
    # 4: resumed to the end
    code, err = _Worker(tmp_path).finish()
    assert code == 0, err
    assert glob.glob(str(tmp_path / ".tmp-*.pt")) == []
    _assert_same_training(uninterrupted, torch.load(tmp_path / "final.pt", weights_only=True))


@pytest.mark.slow
def test_sigterm_stops_at_a_step_boundary_and_loses_no_step(tmp_path, uninterrupted):
    worker = _Worker(tmp_path)
    worker.wait_for_step(3)
    worker.proc.send_signal(signal.SIGTERM)
    code, err = worker.finish()
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in err
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == worker.last  # every finished step kept
    code, err = _Worker(tmp_path).finish()
    assert code == 0, err
    _assert_same_training(uninterrupted, torch.load(tmp_path / "final.pt", weights_only=True))
