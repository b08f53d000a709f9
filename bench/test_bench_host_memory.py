"""CPU benchmark of the host memory policy (tofa_fast/host_memory.py): training steps with the freed
memory kept by the heap (``tofa_fast``, what the ``tofa-fast`` commands do) against the C library's
own policy (``system``: freed blocks unmapped or trimmed, then faulted in again, page by page).

The policy is process-wide and cannot be undone, so every measurement is its own process
(``host_memory_worker.py``): the two policies alternate process by process (A B B A ...), each
process times ``STEPS`` sequential steps after a warm-up round, and the medians are over all steps
of a policy's processes. Also recorded (``meta``): the minor page faults per step and the median of
the per-pair ratios.

Cases: the default run's step (digits, TOFA, 32 labelled + 32 unlabelled, sequential) and the
``ofa_mbv3`` w1.2 128 px sandwich step (batch 32, 4 members), as in ``test_bench_fused_step.py``.

``test_target`` fails the run when keeping the memory does not make the digits step at least
``TARGET`` × as fast.

Run: ``python -m pytest bench/test_bench_host_memory.py -p no:cacheprovider``
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys

import pytest

from tofa_fast.host_memory import ENV

SUITE = "host_memory_cpu"
MODE = "step (fwd+bwd)"
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "host_memory_worker.py")
CASES = {  # name -> (worker case, steps per process, process pairs)
    "digits TOFA step, 32 labelled + 32 unlabelled, sequential": ("digits", 15, 4),
    "ofa_mbv3 w1.2 128px, batch 32, 4 members, sequential": ("ofa", 3, 3),
}
DIGITS_CASE = next(iter(CASES))
TARGET = 1.03

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the policy is glibc's mallopt; elsewhere it does nothing",
)


def _process(case: str, policy: str, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    out = subprocess.run(
        [sys.executable, WORKER, case, policy, str(steps)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_host_memory(bench_registry, case):
    worker_case, steps, pairs = CASES[case]
    if worker_case == "ofa" and importlib.util.find_spec("ofa") is None:
        pytest.skip("the ofa package is not installed")
    for impl in ("tofa_fast", "system"):
        bench_registry.expect(SUITE, case, MODE, impl)
    meta = bench_registry.REGISTRY[SUITE]["meta"]
    meta["description"] = (
        "Sequential training steps, 2 threads, each policy in its own processes, alternating (A B B A ...): "
        "tofa_fast = freed host memory kept by the heap (retain_freed_host_memory, what the tofa-fast commands "
        "do), system = the C library's own policy. Medians over every timed step of a policy. Run: python -m "
        "pytest bench/test_bench_host_memory.py -p no:cacheprovider"
    )
    runs: dict[str, list[dict]] = {"tofa_fast": [], "system": []}
    for pair in range(pairs):
        order = ("system", "tofa_fast") if pair % 2 == 0 else ("tofa_fast", "system")
        for impl in order:
            runs[impl].append(_process(worker_case, "retained" if impl == "tofa_fast" else "system", steps))
    assert all(r["applied"] for r in runs["tofa_fast"]) and not any(r["applied"] for r in runs["system"])
    medians = {impl: statistics.median([t for r in rs for t in r["seconds_per_step"]]) for impl, rs in runs.items()}
    for impl, median in medians.items():
        bench_registry.record(SUITE, case, MODE, impl, median)
    pair_ratios = sorted(
        statistics.median(s["seconds_per_step"]) / statistics.median(o["seconds_per_step"])
        for s, o in zip(runs["system"], runs["tofa_fast"])
    )
    faults = {impl: statistics.median([r["faults_per_step"] for r in rs]) for impl, rs in runs.items()}
    meta.setdefault("cases", {})[case] = {"pair_ratios": pair_ratios, "faults_per_step": faults}
    line = (
        f"{case}: kept memory {medians['system'] / medians['tofa_fast']:.3f}× the system policy "
        f"(per-pair ratios {', '.join(f'{r:.3f}' for r in pair_ratios)}); minor page faults per step "
        f"{faults['tofa_fast']:,.0f} kept vs {faults['system']:,.0f}"
    )
    bench_registry.note(SUITE, line)


def test_target(bench_registry):
    """Fails the run when keeping the freed memory does not speed the default run's step up."""
    if not bench_registry.complete(SUITE):
        pytest.skip("the benchmark did not run completely (filtered, or the ofa package missing)")
    ratio = bench_registry.speedups(SUITE)[(DIGITS_CASE, MODE)]["system"]
    assert ratio >= TARGET, f"kept memory {ratio:.3f}× < {TARGET}× the system policy on the digits step"
