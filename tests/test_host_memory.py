"""tofa_fast.retain_freed_host_memory: the allocator keeps what a step frees (no page faults again).

The policy is process-wide, so each case runs in its own interpreter."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

import tofa_fast
from tofa_fast.cli import main
from tofa_fast.host_memory import ENV

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A training step in miniature: activations of several sizes alive together, one freed early, then
# all freed; repeated. Prints the policy's outcome and the median over steps of the minor page faults
# per page touched. The median, because the heap's layout takes a few steps to settle: a small block
# allocated mid-step (a tensor's header, an interpreter object) can pin a hole and make one of the
# early steps grow the heap once more, at a different step from run to run (seen in CI: 0.11 as a mean).
CHURN = """
import resource, statistics, sys, torch
import tofa_fast
applied = tofa_fast.retain_freed_host_memory()
MB = 1 << 20  # float32 elements: 4 MiB
def step():
    a = torch.ones(3 * MB); b = torch.ones(5 * MB); c = torch.ones(9 * MB)
    del b
    d = torch.ones(12 * MB)
    return float(a[0] + c[0] + d[0])
step()
pages = 29 * MB * 4 // 4096
faults = []
for _ in range(11):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / pages)
print(applied, statistics.median(faults))
"""


def _churn(policy: str | None) -> tuple[bool, float]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if policy is not None:
        env[ENV] = policy
    out = subprocess.run([sys.executable, "-c", CHURN], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", float(faults)


@pytest.mark.skipif(not GLIBC, reason="the policy is glibc's mallopt; elsewhere it does nothing")
def test_retained_memory_is_not_faulted_in_again():
    applied, faults = _churn(None)
    left_alone, system_faults = _churn("system")
    assert applied and not left_alone
    # glibc's own policy faults most pages of this pattern in again at every step (0.77 per page on
    # the 2-core machine); retained, the settled heap serves them again without a fault
    assert faults < 0.05, f"{faults:.2f} page faults per page touched with the memory retained"
    assert faults < system_faults / 3, (faults, system_faults)


def test_bad_policy_names_the_variable(monkeypatch, capsys):
    import tofa_fast.host_memory as host_memory

    monkeypatch.setenv(ENV, "keep")
    monkeypatch.setattr(host_memory, "_applied", None)
    with pytest.raises(ValueError, match=f"{ENV} must be 'retain'.*'keep'"):
        tofa_fast.retain_freed_host_memory()
    # the command says so and stops before any work
    assert main(["evaluate", "no-such-run"]) == 2
    assert f"tofa-fast evaluate: error: {ENV} must be" in capsys.readouterr().err
