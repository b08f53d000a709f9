"""Where a sandwich training step's time goes on a GPU: host-bound or device-bound, and which ops.

The problem of bench/test_bench_fused_step_gpu.py (ofa_mbv3 w1.2, 128 px, batch 32, 4 members, bf16
autocast + channels_last), for each variant: the wall time per step (synchronised), the GPU's busy
time per step (the sum of the kernels' own device time, from ``torch.profiler``), the number of
kernel launches and of CUDA graph launches (one replays many kernels), and the ops that cost the
most device time and the most host time. Wall time far above the busy time means the step is
bound by the host (Python, dispatch, launches), not the GPU.

Variants: ``sequential``, ``shared``, ``fused`` and (on CUDA) ``graphed`` on the default dispatch,
``sequential, CUDA kernels`` with tofa_fast's own depthwise kernels pinned (when built), and
``sequential, library dispatch`` with every call of our ops through the ``torch.library`` custom op instead of the eager
path (tofa_fast/ops/eager_path.py): the host time that path saves.

Run (scripts/gpu_check.sh does, stage ``step-profile``):
``python bench/profile_step_gpu.py --out DIR`` → DIR/step_profile_gpu.json and the tables on stdout.
``--device cpu --batch 4`` runs the same code on a CPU (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tofa_fast.ops.eager_path import use_library_dispatch  # noqa: E402
from tofa_fast.ops.elastic_dwconv_dispatch import CUDA, DwconvProblem, use_backend  # noqa: E402
from tofa_fast.train.step import ComputeFormat  # noqa: E402

FMT = ComputeFormat("bf16", True)
TOP = 12


def _device_time(event) -> float:
    """An event's own device time in µs (the attribute's name moved between torch versions)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def measure(name: str, cycle, device: torch.device, steps_per_cycle: int, timed_cycles: int) -> dict:
    for _ in range(2):
        cycle()
    start = time.perf_counter()
    for _ in range(timed_cycles):
        cycle()
    wall_ms = (time.perf_counter() - start) / (timed_cycles * steps_per_cycle) * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        cycle()
    events = prof.key_averages()
    # Busy time from the kernels' own entries only: an op's entry also carries its kernels' device
    # time, so summing every entry would count each kernel twice.
    kernels = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA]
    busy_ms = sum(_device_time(e) for e in kernels) / 1e3 / steps_per_cycle
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel"))
    # a CUDA graph replay is one launch of many kernels (the graphed variant)
    graph_launches = sum(e.count for e in events if e.key in ("cudaGraphLaunch", "cuGraphLaunch"))
    by_device = sorted(kernels, key=_device_time, reverse=True)[:TOP]
    by_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP]
    report = {
        "variant": name,
        "wall_ms_per_step": round(wall_ms, 2),
        "gpu_busy_ms_per_step": round(busy_ms, 2),
        "kernel_launches_per_step": launches // steps_per_cycle,
        "graph_launches_per_step": graph_launches // steps_per_cycle,
        "top_device_ms_per_step": {e.key[:90]: round(_device_time(e) / 1e3 / steps_per_cycle, 3) for e in by_device},
        "top_host_ms_per_step": {e.key[:90]: round(e.self_cpu_time_total / 1e3 / steps_per_cycle, 3) for e in by_host},
    }
    print(
        f"\n== {name}: wall {wall_ms:.1f} ms/step, GPU busy {busy_ms:.1f} ms/step, "
        f"{report['kernel_launches_per_step']} kernel + {report['graph_launches_per_step']} graph launches/step"
    )
    for title, table in (("device", report["top_device_ms_per_step"]), ("host", report["top_host_ms_per_step"])):
        print(f"   top {title} time (ms/step): " + "; ".join(f"{k} {v}" for k, v in list(table.items())[:8]))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cycles", type=int, default=5, help="timed cycles of 3 steps per variant")
    parser.add_argument(
        "--variants", default="", help="comma-separated variant names to run, in this order (default: all)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    import test_bench_fused_step_gpu as suite

    problem = suite.Problem(device=device, batch=args.batch)
    # (name, step implementation, the context it runs in)
    variants = [
        ("sequential", "sequential", contextlib.nullcontext),
        ("shared", "shared", contextlib.nullcontext),
        ("fused", "tofa_fast", contextlib.nullcontext),
        ("sequential, library dispatch", "sequential", use_library_dispatch),
    ]
    if device.type == "cuda":  # replayed from CUDA graphs: how much of the host time that removes
        variants.insert(1, ("graphed", "graphed", contextlib.nullcontext))
    if device.type == "cuda" and not CUDA.not_supported_reasons(DwconvProblem("cuda", torch.bfloat16, 3, 7, 1, 2)):
        variants.append(("sequential, CUDA kernels", "sequential", lambda: use_backend("CUDA")))
    if args.variants:
        by_name = {variant[0]: variant for variant in variants}
        unknown = [n for n in args.variants.split(",") if n not in by_name]
        if unknown:
            parser.error(f"unknown variants {unknown}; choose from {list(by_name)}")
        variants = [by_name[n] for n in args.variants.split(",")]
    os.makedirs(args.out, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    reports = []
    for name, impl, context in variants:
        with context():
            cycle = problem.runner(impl, FMT)
            reports.append(measure(name, cycle, device, len(problem.plans), args.cycles))
        # after every variant: a run stopped by its time cap keeps what it measured
        with open(os.path.join(args.out, "step_profile_gpu.json"), "w") as f:
            json.dump({"meta": meta, "batch": args.batch, "variants": reports}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
