"""Where the default run's training step spends its time on a CPU, and how much faster it could get.

The step of bench/test_bench_fused_step.py's digits case (TOFA: the pseudo-label pass of a_max, then
a_max, a_min and two random members with CE + FixMatch (+ KD) on 32 labelled + 32 unlabelled images),
in the trainer's CPU format (fp32, channels-last) and step (``--step auto``), forward and backward.
Three measurements, each answering one question:

* ``batch`` — how much of the step is a fixed cost. The step's time at batch 1, 2, 8, 16 and 32
  (labelled = unlabelled = b), 2 threads; the line through 16 and 32 gives the part that does not
  shrink with the batch (per-op overhead: Python, dispatch, autograd, allocation, thread start-up).
* ``threads`` — which ops use the second core. Each op's own time per step (``torch.profiler``) at
  1 and 2 threads, and the ops that move no data (views, autograd nodes, allocations: "glue"). Also
  the whole step unprofiled at 1 and 2 threads (T1, T2), and from them Amdahl's bound on its serial
  part, S ≤ 2·T2 − T1 (T1 = S + P, T2 ≥ S + P/2): the time the second core has nothing to do
  (Python, dispatch, autograd, allocation, ops too small to split), which no kernel speed-up removes.
* ``processes`` — what splitting the members over processes would give. Two single-thread
  processes each train half of the members on the full batch, meeting at a barrier after every
  step (the gradients would then be added), against one process with 2 threads on all members, and
  each half alone: the ceiling of member parallelism on this machine, synchronisation not counted.

Run: ``python bench/profile_step_cpu.py [--sections batch,threads,processes] [--out DIR]`` →
DIR/step_profile_cpu.json (default bench/results) and the tables on stdout. Takes 2–3 minutes.
``--quick`` runs every section briefly at batch 2 (a smoke test, not a measurement; it writes the
JSON only with ``--out``; tests/test_profile_step_cpu.py runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tofa_fast  # noqa: E402
from tofa_fast.train.plan import StepPlan  # noqa: E402
from tofa_fast.train.step import StepBatch, choose_step_backend, train_step  # noqa: E402

THREADS = 2
#: the process each member of a TOFA step (a_max, a_min, two random, in plan order) goes to in
#: ``processes``: of the three pairings, a_max + a_min | the random two (each also runs the KD view
#: and both run the pseudo-label pass) balanced best (2026-12-08: 229–241 ms against 253–278 ms)
SPLIT = (0, 0, 1, 1)
#: ops that move no tensor data: views, autograd bookkeeping, allocation
GLUE = ("aten::view", "aten::permute", "aten::slice", "aten::as_strided", "aten::t", "aten::transpose",
        "aten::reshape", "aten::select", "aten::narrow", "aten::unsqueeze", "aten::flatten", "aten::expand",
        "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::to", "aten::detach", "aten::alias",
        "aten::resize_", "torch::autograd::AccumulateGrad")  # fmt: skip


class Step:
    """The default run's step at a batch size, as the trainer runs it (format, step mode)."""

    def __init__(self, batch: int):
        from test_bench_fused_step import CPU_FORMAT, CYCLES, StrategyStepProblem

        self.problem = StrategyStepProblem("tofa", CYCLES["digits"], labelled=batch, unlabelled=batch)
        self.fmt = CPU_FORMAT
        p = self.problem
        p.net = p.net.to(memory_format=self.fmt.memory_format)
        b = p.batch
        self.batch = StepBatch.to_device((b.x, b.y), (b.u_weak, b.u_strong), torch.device("cpu"), self.fmt)
        self.backend = choose_step_backend("auto", p.net, torch.device("cpu"))

    def cycle(self, members: tuple[int, ...] | None = None, after_step=None) -> None:
        """One step per plan of the problem's cycle; ``members``: only those members of each plan;
        ``after_step()`` after each step."""
        p = self.problem
        for plan in p.plans:
            if members is not None:
                plan = StepPlan(tuple(plan.members[i] for i in members), plan.pseudo_label_teacher)
            p.net.zero_grad(set_to_none=True)
            train_step(p.net, plan, self.batch, p.settings, self.fmt, self.backend, p.teacher)
            if after_step is not None:
                after_step()

    @property
    def steps_per_cycle(self) -> int:
        return len(self.problem.plans)


def ms_per_step(step: Step, cycles: int, members: tuple[int, ...] | None = None) -> float:
    """Median over ``cycles`` timed cycles, after two untimed ones."""
    for _ in range(2):
        step.cycle(members)
    times = []
    for _ in range(cycles):
        start = time.perf_counter()
        step.cycle(members)
        times.append((time.perf_counter() - start) / step.steps_per_cycle * 1e3)
    return statistics.median(times)


def batch_section(batches: list[int], cycles: int) -> dict:
    torch.set_num_threads(THREADS)
    times = {b: round(ms_per_step(Step(b), cycles), 1) for b in batches}
    lo, hi = sorted(batches)[-2:]
    per_sample = (times[hi] - times[lo]) / (hi - lo)
    fixed = times[hi] - per_sample * hi
    print(f"\n== batch: ms per step at {THREADS} threads: " + ", ".join(f"b={b}: {t}" for b, t in times.items()))
    print(f"   line through b={lo} and b={hi}: {fixed:.1f} ms fixed + {per_sample:.2f} ms per labelled image")
    print(f"   fixed share at b={hi}: {fixed / times[hi]:.0%}")
    return {"ms_per_step": times, "fixed_ms": round(fixed, 1), "ms_per_image": round(per_sample, 2)}


def threads_section(batch: int, rounds: int) -> dict:
    """Each op's own time per step at 1 and at 2 threads, the two alternating ``rounds`` times
    (the minimum over rounds: the least disturbed)."""
    from torch.profiler import profile

    step = Step(batch)
    own: dict[int, dict[str, list[float]]] = {1: {}, THREADS: {}}
    whole: dict[int, list[float]] = {1: [], THREADS: []}
    for _ in range(rounds):
        for threads in own:
            torch.set_num_threads(threads)
            step.cycle()
            start = time.perf_counter()
            step.cycle()
            whole[threads].append((time.perf_counter() - start) / step.steps_per_cycle * 1e3)
            with profile() as prof:
                step.cycle()
            for e in prof.key_averages():
                own[threads].setdefault(e.key, []).append(e.self_cpu_time_total / 1e3 / step.steps_per_cycle)
    best = {t: {k: min(v) for k, v in ops.items()} for t, ops in own.items()}
    total = {t: sum(ops.values()) for t, ops in best.items()}
    glue = {
        t: sum(v for k, v in ops.items() if k in GLUE or not k.startswith(("aten::", "tofa_fast::")))
        for t, ops in best.items()
    }
    t1, tn = min(whole[1]), min(whole[THREADS])
    serial = (THREADS * tn - t1) / (THREADS - 1)  # Amdahl: t1 = S + P, tn ≥ S + P / THREADS
    top = sorted(best[1], key=lambda k: -best[1][k])[:20]
    rows = {k: (round(best[1][k], 2), round(best[THREADS].get(k, float("nan")), 2)) for k in top}
    print(
        f"\n== threads: the whole step, unprofiled: {t1:.1f} ms at 1 thread, {tn:.1f} ms at {THREADS} (x{t1 / tn:.2f})"
    )
    print(
        f"   serial part (Amdahl, perfect scaling of the rest): at most {serial:.1f} ms = {serial / tn:.0%} of the step"
    )
    print(f"== threads: own time per step (ms, torch.profiler), 1 vs {THREADS} threads, batch {batch}")
    print(f"   {'all ops':58s} {total[1]:7.1f} {total[THREADS]:7.1f}  x{total[1] / total[THREADS]:.2f}")
    print(f"   {'glue (views, autograd nodes, allocation)':58s} {glue[1]:7.1f} {glue[THREADS]:7.1f}")
    for k, (one, two) in rows.items():
        print(f"   {k[:58]:58s} {one:7.2f} {two:7.2f}  x{one / two:.2f}")
    return {
        "batch": batch,
        "step_ms": {"1": round(t1, 1), str(THREADS): round(tn, 1)},
        "serial_ms_at_most": round(serial, 1),
        "total_ms": {str(t): round(v, 1) for t, v in total.items()},
        "glue_ms": {str(t): round(v, 1) for t, v in glue.items()},
        "top_ops_ms": {k: {"1": a, str(THREADS): b} for k, (a, b) in rows.items()},
    }


def _process_worker(rank: int, members, batch: int, cycles: int, barrier, results) -> None:
    torch.set_num_threads(1)
    tofa_fast.retain_freed_host_memory()
    step = Step(batch)
    for _ in range(2):
        step.cycle(members)
    times = []
    for _ in range(cycles):
        barrier.wait()
        start = time.perf_counter()
        step.cycle(members, after_step=barrier.wait)  # where the two halves' gradients would be added
        times.append((time.perf_counter() - start) / step.steps_per_cycle * 1e3)
    results.put((rank, statistics.median(times)))


def processes_section(batch: int, cycles: int, rounds: int) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")  # fork would copy the parent's OpenMP state
    halves = [tuple(i for i, r in enumerate(SPLIT) if r == rank) for rank in (0, 1)]
    one_process, two_processes = [], []
    for _ in range(rounds):
        torch.set_num_threads(THREADS)
        one_process.append(ms_per_step(Step(batch), cycles))
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [
            ctx.Process(target=_process_worker, args=(r, halves[r], batch, cycles, barrier, results)) for r in (0, 1)
        ]
        for proc in procs:
            proc.start()
        two_processes.append(max(results.get()[1] for _ in procs))
        for proc in procs:
            proc.join()
    torch.set_num_threads(1)
    alone = [round(ms_per_step(Step(batch), cycles, half), 1) for half in halves]
    one, two = statistics.median(one_process), statistics.median(two_processes)
    balanced = sum(alone) / 2
    print(f"\n== processes: batch {batch}, members {halves[0]} | {halves[1]}")
    print(f"   one process, {THREADS} threads, all members: {one:.1f} ms per step")
    print(f"   two single-thread processes, half the members each, together: {two:.1f} ms  (x{one / two:.2f})")
    print(f"   each half alone on one thread: {alone[0]} and {alone[1]} ms; perfectly balanced: {balanced:.1f} ms")
    print(f"   the halves slow each other by x{two / max(alone):.2f} (shared memory bandwidth)")
    return {
        "batch": batch,
        "halves": halves,
        "one_process_ms": round(one, 1),
        "two_processes_ms": round(two, 1),
        "halves_alone_ms": alone,
        "speedup": round(one / two, 3),
        "ceiling_if_balanced": round(one / (balanced * two / max(alone)), 3),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="batch,threads,processes")
    parser.add_argument("--out", default=None, help="where step_profile_cpu.json goes (default: bench/results)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: every section briefly, batch 2")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - {"batch", "threads", "processes"})
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from batch, threads, processes")
    tofa_fast.retain_freed_host_memory()  # as the tofa-fast commands do
    from conftest import machine_info

    batch, cycles, rounds = (2, 1, 1) if args.quick else (32, 5, 3)
    report: dict = {"meta": {**machine_info(), "torch": torch.__version__, "threads": THREADS}}
    if "batch" in sections:
        report["batch"] = batch_section([1, 2] if args.quick else [1, 2, 8, 16, 32], cycles)
    if "threads" in sections:
        report["threads"] = threads_section(batch, rounds)
    if "processes" in sections:
        report["processes"] = processes_section(batch, cycles, rounds)
    out = args.out or (None if args.quick else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    if out is not None:  # a quick run writes only where it is told to
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "step_profile_cpu.json"), "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
