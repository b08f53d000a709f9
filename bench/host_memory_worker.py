"""One process of ``test_bench_host_memory.py``: time sequential training steps under one host memory
policy and print the per-step times and page faults as JSON on the last line of stdout.

The policy is process-wide and cannot be undone, hence a process per measurement. This process
leaves the C library's allocator alone unless ``--policy retained``.

Usage: ``python bench/host_memory_worker.py {digits,ofa} {retained,system} STEPS``
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import torch

import tofa_fast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(case: str, policy: str, steps: int) -> None:
    applied = tofa_fast.retain_freed_host_memory() if policy == "retained" else False
    torch.set_num_threads(int(os.environ.get("TOFA_BENCH_THREADS", "2")))
    from test_bench_fused_step import DigitsProblem, OfaProblem

    problem = DigitsProblem() if case == "digits" else OfaProblem()
    cycle = problem.runner("sequential")  # one call: a round of the case's steps
    per_round = len(problem.plans)
    cycle()  # warm-up: caches, the allocator's first growth
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(max(1, steps // per_round)):
        start = time.perf_counter()
        cycle()
        times.append((time.perf_counter() - start) / per_round)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    print(
        json.dumps(
            {"applied": applied, "seconds_per_step": times, "faults_per_step": faults / (len(times) * per_round)}
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
