"""Does validation-based evolutionary search beat zero-cost selection? (TOFA paper, Fig. 8–11.)

Given a run folder trained with a validation split, chooses one subnet per budget (K budgets
geometrically spanning the supernet's FLOPs range) three ways — TOFA's zero-cost rule (Algorithm 2),
evolutionary search on validation accuracy (eq. 5), random search with as many evaluations — and
reports each choice's validation and test accuracy and the per-budget gap evo test − zero-cost test.
Writes ``search.json`` / ``search.md`` into the run folder (``tofa_fast.search.search_run``) and,
with ``--out``, a copy of the table with the command, machine and wall time.

    OMP_NUM_THREADS=1 tofa-fast train --out runs/ablation_tofa --val-per-class 20
    OMP_NUM_THREADS=1 python examples/selection_ablation.py runs/ablation_tofa \\
        --out bench/results/selection_ablation_digits.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import torch

from tofa_fast.backends import cpu_model
from tofa_fast.search import search_run
from tofa_fast.search.report import search_markdown
from tofa_fast.train.checkpoint import write_text_atomic


def evaluator_speed(run: str, count: int, seed: int) -> dict[str, float]:
    """Candidates per second on the validation split: SubnetEvaluator vs the extract + recalibrate +
    ``Trainer.evaluate`` oracle, on the same ``count`` random subnets (per-resolution caches warm)."""
    import numpy as np

    from tofa_fast.estimator import Estimator
    from tofa_fast.search import SubnetEvaluator
    from tofa_fast.train.run import open_run

    record = open_run(run, device="cpu")
    archs = Estimator(record.space, record.splits.num_classes).sample(count, seed=seed)
    evaluator = SubnetEvaluator.from_run(record)
    evaluator.accuracy([record.space.sample(r) for r in range(len(record.space.resolutions) * 4)], "val")
    start = time.perf_counter()
    fast = evaluator.accuracy(archs, "val")
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    slow = [record.evaluate(record.calibrated_subnet(a), a.resolution, record.splits.val) for a in archs]
    slow_s = time.perf_counter() - start
    return {
        "fast": count / fast_s,
        "oracle": count / slow_s,
        "agree": bool(np.array_equal(fast, slow)),
        "val": len(record.splits.val),
        "calibration": record.config.calibration_images,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="runs/ablation_tofa", help="run folder with a validation split")
    parser.add_argument("--budgets", type=int, default=6, help="number of FLOPs budgets K")
    parser.add_argument("--population", type=int, default=24)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--speed-archs", type=int, default=20, help="subnets timed for the evaluator speed line")
    parser.add_argument("--out", default=None, help="also write the table (with command and machine) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    comparisons = search_run(
        args.run,
        budgets=args.budgets,
        population=args.population,
        generations=args.generations,
        seed=args.seed,
        device="cpu",
    )
    seconds = time.perf_counter() - start
    with open(os.path.join(args.run, "search.json")) as f:
        written = json.load(f)["meta"]
    speed = evaluator_speed(args.run, args.speed_archs, args.seed)
    searched = sum(c.selected[m].seconds for c in comparisons for m in ("evolution", "random") if m in c.selected)
    evaluations = sum(
        c.selected[m].evaluations for c in comparisons for m in ("evolution", "random") if m in c.selected
    )
    command = " ".join(["OMP_NUM_THREADS=1", "python", *map(shlex.quote, sys.argv)])
    meta = {
        "command": f"`{command}`",
        "run": f"{args.run}: data {written['data']}, strategy {written['strategy']}, loss {written['loss']}, "
        f"{written['epochs']} epochs, seed {written['seed']}; validation / test images "
        f"{written['validation / test images']}",
        "evolution": f"population {args.population}, {args.generations} generations, seed {args.seed}; "
        "random search: as many evaluations",
        "machine": f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{os.cpu_count()} cores",
        "wall time": f"{seconds:.1f} s (open the run, {len(comparisons)} budgets × 3 methods, measure every choice)",
        "search": f"{evaluations} validation evaluations by the searches in {searched:.1f} s, "
        f"{written['distinct subnets measured']} distinct (split, subnet) measurements in all "
        "(the evaluator memoises; random search re-uses evolution's results where they coincide)",
        "evaluator speed": f"{speed['fast']:.2f} candidates/s (SubnetEvaluator) vs {speed['oracle']:.2f}/s "
        f"(extract + recalibrate + Trainer.evaluate), {speed['fast'] / speed['oracle']:.1f}×, on "
        f"{args.speed_archs} random subnets, {speed['calibration']} calibration + {speed['val']} validation "
        f"images each; same accuracies: {speed['agree']}",
    }
    table = search_markdown(comparisons, meta)
    print(table)
    if args.out:
        write_text_atomic(table, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
