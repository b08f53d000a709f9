"""Shared machinery of the pytest-benchmark suites: a results registry, the side-by-side table, files.

Each benchmark records its median under (suite, case, mode, implementation). At the end of the run
the terminal summary prints, per suite, one row per case and mode with every implementation's
median and the speed-up of ``tofa_fast`` over each baseline, the geometric means, and the machine;
complete runs are saved to bench/results/<suite>.json and .md.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections import defaultdict

import pytest
import torch

import tofa_fast
from tofa_fast.backends import cpu_model

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

OURS = "tofa_fast"

# suite -> {"expected": set of (case, mode, impl), "medians": {(case, mode): {impl: seconds}}, ...}
REGISTRY: dict[str, dict] = defaultdict(lambda: {"expected": set(), "medians": defaultdict(dict), "meta": {}})
_LOAD_AT_START = os.getloadavg() if hasattr(os, "getloadavg") else None
# Every implementation is timed under the allocator policy the tofa-fast command runs with
# (tofa_fast/host_memory.py), baselines included: it spares them the same page faults.
HOST_MEMORY = "retained" if tofa_fast.retain_freed_host_memory() else "system allocator"


@pytest.fixture(scope="module", autouse=True)
def _module_threads(request):
    """Intra-op threads for a suite's module: its ``THREADS`` (timings are compared at one thread
    count), restored afterwards; modules without ``THREADS`` keep torch's."""
    threads = getattr(request.module, "THREADS", None)
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    yield
    torch.set_num_threads(previous)


def machine_info() -> dict:
    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_at_start": _LOAD_AT_START,
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "host_memory": HOST_MEMORY,
    }
    if hasattr(torch.ops, "tofa_fast") and hasattr(torch.ops.tofa_fast, "_elastic_dwconv2d_cpu_isa"):
        info["tofa_fast_cpu_kernels"] = torch.ops.tofa_fast._elastic_dwconv2d_cpu_isa()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def expect(suite: str, case: str, mode: str, impl: str) -> None:
    REGISTRY[suite]["expected"].add((case, mode, impl))


def record(suite: str, case: str, mode: str, impl: str, median_seconds: float) -> None:
    REGISTRY[suite]["medians"][(case, mode)][impl] = median_seconds


def note(suite: str, line: str) -> None:
    """A figure measured outside the table (e.g. an interleaved A/B): printed now, and listed under
    "Notes" in the suite's results file."""
    REGISTRY[suite]["meta"].setdefault("notes", []).append(line)
    print("\n" + line)


def note_interleaved(suite: str, ratios: list[float], what: str) -> dict:
    """Records sorted per-round ratios from :func:`interleaved_ratios` (``{"median", "rounds"}``, returned
    for the caller to file in the suite's meta) and notes "``what`` <median>× ..., interleaved" with
    the round count and range."""
    median = ratios[len(ratios) // 2]
    note(
        suite,
        f"{what.format(median=median)}, interleaved: median of {len(ratios)} per-round ratios "
        f"(range {ratios[0]:.3f}–{ratios[-1]:.3f})",
    )
    return {"median": median, "rounds": ratios}


def speedups(suite: str) -> dict[tuple[str, str], dict[str, float]]:
    """(case, mode) -> {baseline: baseline median / ours median}."""
    out = {}
    for key, medians in REGISTRY[suite]["medians"].items():
        if OURS in medians:
            out[key] = {impl: t / medians[OURS] for impl, t in medians.items() if impl != OURS}
    return out


def geometric_means(suite: str) -> dict[tuple[str, str], float]:
    """(mode, baseline) -> geometric mean of the speed-ups over the cases."""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (_, mode), ratios in speedups(suite).items():
        for impl, ratio in ratios.items():
            groups[(mode, impl)].append(ratio)
    return {key: math.exp(sum(map(math.log, values)) / len(values)) for key, values in groups.items()}


def measure(
    benchmark,
    fn,
    suite: str,
    case: str,
    mode: str,
    impl: str,
    *,
    time_per_bench: float,
    min_rounds: int,
    max_rounds: int,
    warmup_rounds: int = 1,
    per_round: int = 1,
    group: str | None = None,
) -> None:
    """Times ``fn`` with ``benchmark.pedantic`` and records its median (divided by ``per_round``, the
    steps one call runs). One call first warms up and calibrates the round count: about
    ``time_per_bench`` seconds, within [``min_rounds``, ``max_rounds``]."""
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    rounds = max(min_rounds, min(max_rounds, math.ceil(time_per_bench / max(once, 1e-6))))
    benchmark.group = group or f"{case} {mode}"
    benchmark.extra_info.update({"case": case, "mode": mode, "impl": impl, "steps_per_round": per_round})
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    if benchmark.stats is not None:
        record(suite, case, mode, impl, benchmark.stats.stats.median / per_round)


def interleaved_ratios(baseline, ours, rounds: int) -> list[float]:
    """Sorted per-round ratios baseline time / ours time, the two run alternately (A B B A ...) after
    one warm-up call each: for gains smaller than the drift of a shared machine's load between two
    benchmarks run one after the other."""
    baseline()
    ours()
    ratios = []
    for r in range(rounds):
        times = {}
        for name, fn in (
            (("baseline", baseline), ("ours", ours)) if r % 2 == 0 else (("ours", ours), ("baseline", baseline))
        ):
            start = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - start
        ratios.append(times["baseline"] / times["ours"])
    return sorted(ratios)


def complete(suite: str) -> bool:
    entry = REGISTRY[suite]
    seen = {(case, mode, impl) for (case, mode), medians in entry["medians"].items() for impl in medians}
    return bool(entry["expected"]) and entry["expected"] <= seen


def _table(suite: str) -> list[str]:
    entry = REGISTRY[suite]
    impls = sorted({impl for medians in entry["medians"].values() for impl in medians}, key=lambda i: (i != OURS, i))
    baselines = [i for i in impls if i != OURS]
    ratios = speedups(suite)
    header = ["case", "mode", *[f"{i} ms" for i in impls], *[f"× vs {b}" for b in baselines]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (case, mode), medians in sorted(entry["medians"].items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cells = [case, mode, *[f"{medians[i] * 1e3:.3f}" if i in medians else "–" for i in impls]]
        cells += [f"{ratios.get((case, mode), {}).get(b, float('nan')):.2f}" for b in baselines]
        lines.append("| " + " | ".join(cells) + " |")
    means = geometric_means(suite)
    for mode in sorted({m for m, _ in means}):
        cells = [
            "geometric mean",
            mode,
            *["" for _ in impls],
            *[f"{means.get((mode, b), float('nan')):.2f}" for b in baselines],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _save(suite: str, lines: list[str], machine: dict) -> list[str]:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    entry = REGISTRY[suite]
    data = {
        "suite": suite,
        "machine": machine,
        "meta": entry["meta"],
        "medians_seconds": [
            {"case": case, "mode": mode, **medians} for (case, mode), medians in sorted(entry["medians"].items())
        ],
        "speedups": [{"case": case, "mode": mode, **r} for (case, mode), r in sorted(speedups(suite).items())],
        "geometric_means": [
            {"mode": mode, "baseline": b, "speedup": v} for (mode, b), v in sorted(geometric_means(suite).items())
        ],
    }
    json_path = os.path.join(RESULTS_DIR, f"{suite}.json")
    md_path = os.path.join(RESULTS_DIR, f"{suite}.md")
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1)
    with open(md_path, "w") as f:
        f.write(f"# {suite}\n\n{entry['meta'].get('description', '')}\n\n")
        f.write("Machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()) + "\n\n")
        f.write("Medians in milliseconds; `× vs X` = X's median / tofa_fast's median (higher is better).\n\n")
        f.write("\n".join(lines) + "\n")
        if entry["meta"].get("notes"):  # figures a suite measures outside the table (e.g. interleaved A/B)
            f.write("\nNotes:\n\n" + "".join(f"* {note}\n" for note in entry["meta"]["notes"]))
    return [json_path, md_path]


def pytest_terminal_summary(terminalreporter):
    for suite in list(REGISTRY):
        if not REGISTRY[suite]["medians"]:
            continue
        machine = machine_info()
        lines = _table(suite)
        terminalreporter.section(f"{suite}: side by side")
        terminalreporter.write_line("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
        for line in lines:
            terminalreporter.write_line(line)
        if complete(suite):
            for path in _save(suite, lines, machine):
                terminalreporter.write_line(f"saved {os.path.relpath(path)}")
        else:
            terminalreporter.write_line("(partial run: results not saved)")


@pytest.fixture
def bench_registry():
    return sys.modules[__name__]
