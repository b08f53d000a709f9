"""Multi-process training with torchrun on gloo/CPU (SPEC §7 scale-out; tofa_fast/train/distributed.py).

The equivalence that holds, and is tested here: with frozen batch norm and no dropout/drop-connect,
2 processes × 4 images compute the same weights as 1 process × 8 images (the same global batch),
up to float summation order. In every configuration the ranks hold bit-identical weights, only
rank 0 writes, and a resumed multi-process run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tofa_fast.train import load_checkpoint

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


def _launch(
    out,
    epochs: int,
    freeze_bn: bool,
    nproc: int,
    resume: bool = False,
    stop_after: int | None = None,
    signal_at: int | None = None,
):
    args = [WORKER, str(out), str(epochs), "1" if freeze_bn else "0"] + (["--resume"] if resume else [])
    args += ["--stop-after", str(stop_after)] if stop_after is not None else []
    args += ["--signal-at", str(signal_at)] if signal_at is not None else []
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _weights(out, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(f"{out}.rank{rank}.pt", weights_only=True)


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    _launch(tmp_path / "one", epochs=2, freeze_bn=True, nproc=1)
    _launch(tmp_path / "two", epochs=2, freeze_bn=True, nproc=2)
    single, rank0, rank1 = _weights(tmp_path / "one", 0), _weights(tmp_path / "two", 0), _weights(tmp_path / "two", 1)
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), key  # ranks agree bit for bit
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-4, atol=2e-6, msg=key)
    moved = sum((single[k].float() - rank0[k].float()).abs().max().item() > 0 for k in single)
    assert moved < len(single)  # sanity: most tensors agree (many exactly)
    a, b = (
        load_checkpoint(str(tmp_path / "one" / "checkpoint.pt")),
        load_checkpoint(str(tmp_path / "two" / "checkpoint.pt")),
    )
    assert a["selection_index"] == b["selection_index"] and a["step"] == b["step"]  # same subnets, same steps


def test_rank_zero_writes_ranks_agree_and_resume_is_exact_with_bn_training(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _launch(straight, epochs=2, freeze_bn=False, nproc=2)
    # ranks agree bit for bit, BN running statistics included (averaged after every epoch)
    r0, r1 = _weights(straight, 0), _weights(straight, 1)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    # One rank pre-empted mid-epoch (at step 3; ranks agree every 2 steps): all stop after step 4.
    # Resumed mid-epoch (each rank's own BN statistics restored) up to the end of epoch 1, then
    # resumed from that epoch boundary: both kinds of resume in one chain (each launch costs ~15 s).
    _launch(stopped, epochs=2, freeze_bn=False, nproc=2, signal_at=3)
    assert [open(f"{stopped}.rank{r}.stopped").read() for r in (0, 1)] == ["4", "4"]
    assert load_checkpoint(str(stopped / "checkpoint.pt"))["step"] == 4
    _launch(stopped, epochs=2, freeze_bn=False, nproc=2, resume=True, stop_after=1)
    assert len(open(stopped / "train_log.jsonl").read().splitlines()) == 1
    _launch(stopped, epochs=2, freeze_bn=False, nproc=2, resume=True)
    resumed = _weights(stopped, 0)
    for key in r0:
        assert torch.equal(r0[key], resumed[key]), key
    # only rank 0 wrote the run folder: one checkpoint and its selection sidecar, one log line per epoch
    assert sorted(os.listdir(straight)) == ["checkpoint.pt", "selection.json", "train_log.jsonl"]
    assert len(open(straight / "train_log.jsonl").read().splitlines()) == 2
    assert len(open(stopped / "train_log.jsonl").read().splitlines()) == 2


def test_global_batch_must_divide_over_processes(monkeypatch, tmp_path):
    from tofa_fast.train.distributed import DistContext, check_divisible

    with pytest.raises(ValueError, match="batch_size \\(9\\) is the global batch"):
        check_divisible(9, DistContext(rank=0, world_size=2))
    check_divisible(8, DistContext(rank=0, world_size=2))
