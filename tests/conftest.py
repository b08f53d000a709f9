"""Shared test configuration: tolerances are data (STYLE.md item 4), not numbers in tests."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

# The README's test command runs the suite on two pytest-xdist workers (one test file each at a
# time: `-n 2 --dist loadfile`). Each worker gets its share of the cores for torch's intra-op pool:
# two workers with a full pool each oversubscribe the cores, and OpenMP's spinning threads then
# make compute-bound tests several times slower. Tests that need a pool of 2 set it themselves.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# (rtol, atol) per dtype for comparisons of a kernel / extracted module against its reference.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (1e-3, 1e-3),
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def run_under_cpu_isa(isa: str, script: str) -> str:
    """Run ``script`` in a fresh interpreter whose compiled kernels are capped at ``isa`` (avx2 or
    baseline: TOFA_FAST_CPU_ISA, read once per process); it must print the tile kernels' ISA
    (``_elastic_dwconv2d_cpu_isa``). Returns its output; skips where the CPU lacks that ISA."""
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=dict(os.environ, TOFA_FAST_CPU_ISA=isa),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    if isa == "baseline":
        assert "baseline" in result.stdout
    elif "AVX2" not in result.stdout:
        pytest.skip(f"this CPU has no AVX2: {result.stdout.strip()}")
    return result.stdout
