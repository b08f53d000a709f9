"""Is the zero-cost choice just above a_min worse than a_min? (issue 15, item 8.)

Near the smallest subnet, Algorithm 2 has few candidates: a budget a little above a_min's FLOPs is
met by the handful of *sampled* subnets that happen to be that small, and the rule returns the one
with the highest index — often one trained at a single step. a_min itself is trained at every step
of a ``tofa`` run (the sandwich rule) but is not in the index, so the rule only falls back to it when
no sampled subnet fits. This script measures, on trained runs, whether the sampled choice is worse
than a_min in that region.

For each run and each budget at which the choice changes (the FLOPs of every indexed subnet up to
``--span`` × a_min's FLOPs), it records the choice, its index, how many sampled subnets fit, and the
validation and test accuracy (BN recalibrated, ``SubnetEvaluator``) of the choice and of a_min.

    for s in 0 1 2; do tofa-fast train --val-per-class 20 --seed $s --out runs/strategies/s$s/tofa; done
    python examples/selection_near_min.py runs/strategies/s{0,1,2}/tofa --out bench/results/selection_near_min_digits
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import numpy as np

from tofa_fast.search import SubnetEvaluator
from tofa_fast.train.checkpoint import write_text_atomic
from tofa_fast.train.run import _estimator, open_run


def measure(run: str, span: float) -> list[dict]:
    """One row per sampled subnet the zero-cost rule chooses for some budget between a_min's FLOPs and
    ``span`` × that (with the range of budget ratios over which it is the choice)."""
    record = open_run(run, device="cpu")
    estimator = _estimator(record)
    smallest = record.space.min_arch()
    f_min = float(estimator.flops([smallest])[0])
    indexed = record.selection.archs()
    flops = np.asarray(estimator.flops(indexed), dtype=float) if indexed else np.zeros(0)
    budgets = sorted({float(f) for f in flops if f_min <= f <= span * f_min})
    evaluator = SubnetEvaluator.from_run(record, ("val", "test"))
    reference = {split: float(evaluator.accuracy([smallest], split)[0]) for split in ("val", "test")}
    rows: list[dict] = []
    for budget in budgets:
        choice = record.zero_cost_choice(estimator.flops, budget, "FLOPs")
        if choice == smallest:
            continue
        if rows and rows[-1]["choice"] == str(choice):  # the same choice over a range of budgets: one row
            rows[-1]["budget_ratio_high"] = budget / f_min
            continue
        accuracy = {split: float(evaluator.accuracy([choice], split)[0]) for split in ("val", "test")}
        rows.append(
            {
                "run": run,
                "budget_ratio": budget / f_min,
                "budget_ratio_high": budget / f_min,
                "choice": str(choice),
                "choice_index": record.selection[choice],
                "candidates": int((flops <= budget).sum()),
                "choice_mflops": float(estimator.flops([choice])[0]) / 1e6,
                "min_mflops": f_min / 1e6,
                "val": accuracy["val"],
                "test": accuracy["test"],
                "min_val": reference["val"],
                "min_test": reference["test"],
            }
        )
    return rows


def summary(rows: list[dict], edges: tuple[float, ...]) -> list[str]:
    lines = [
        "| lowest budget / a_min FLOPs | choices | choice − a_min, val (points) | choice − a_min, test (points) "
        "| choice worse than a_min (test) |",
        "|---|---:|---:|---:|---:|",
    ]
    for low, high in zip(edges, edges[1:]):
        part = [r for r in rows if low < r["budget_ratio"] <= high]
        if not part:
            continue
        dv = 100 * np.array([r["val"] - r["min_val"] for r in part])
        dt = 100 * np.array([r["test"] - r["min_test"] for r in part])
        lines.append(
            f"| ({low:.2f}, {high:.2f}] | {len(part)} | {dv.mean():+.2f} ± {dv.std():.2f} | "
            f"{dt.mean():+.2f} ± {dt.std():.2f} | {(dt < 0).sum()} of {len(part)} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="tofa run folders trained with --val-per-class")
    parser.add_argument("--span", type=float, default=1.5, help="largest budget, as a multiple of a_min's FLOPs")
    parser.add_argument("--out", required=True, help="output path prefix (writes .md and .json)")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = [row for run in args.runs for row in measure(run, args.span)]
    edges = (1.0, 1.05, 1.1, 1.2, 1.3, args.span)
    lines = [
        "# Zero-cost choice just above a_min vs a_min",
        "",
        f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        "- index: Σ of the steps at which the subnet was trained (a subnet trained once at step t has t)",
        f"- {len(rows)} distinct (run, sampled subnet) choices for budgets from a_min's FLOPs to {args.span:g}× them; "
        "accuracy BN-recalibrated (validation: 20 images per class; test: the test split); "
        f"{time.perf_counter() - start:.0f} s",
        "",
        *summary(rows, edges),
        "",
        "| run | budgets / a_min | sampled subnets that fit | choice MFLOPs | index | val | a_min val "
        "| test | a_min test |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['budget_ratio']:.3f}–{r['budget_ratio_high']:.3f} | {r['candidates']} | "
            f"{r['choice_mflops']:.2f} | "
            f"{r['choice_index']} | {100 * r['val']:.1f} | {100 * r['min_val']:.1f} | {100 * r['test']:.1f} | "
            f"{100 * r['min_test']:.1f} |"
        )
    write_text_atomic("\n".join(lines) + "\n", args.out + ".md")
    write_text_atomic(json.dumps(rows, indent=1) + "\n", args.out + ".json")
    print("\n".join(lines[:12]))


if __name__ == "__main__":
    main()
