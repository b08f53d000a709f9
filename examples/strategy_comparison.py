"""Population evaluation of several training strategies on one data split (the RSS paper's Fig. 3 question:
how good is a *typical* subnet of the supernet at each FLOPs level, not just the hand-picked ones?).

Train the runs first, on the same split (same data, seed and validation hold-out), e.g.::

    for s in tofa rss ps single; do
        tofa-fast train --strategy $s --val-per-class 20 --out runs/strategies/$s
    done
    python examples/strategy_comparison.py runs/strategies/{tofa,rss,ps} --single runs/strategies/single \
        --out bench/results/strategy_comparison_digits

Every run is measured on the *same* subnets (the draws depend only on the space and ``--seed``), BN
recalibrated per subnet on the run's own training images, tested on the test split. Writes
``OUT.md`` (one table, a column per strategy, plus each run's zero-cost palette), ``OUT.json`` and
``OUT.png`` (mean with min–max band per strategy).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from tofa_fast.search import plot_population, population_evaluation
from tofa_fast.train.checkpoint import write_text_atomic
from tofa_fast.train.run import _estimator, open_run


def _label(record) -> str:
    return f"{record.config.strategy} ({record.config.loss})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders trained on the same data split")
    parser.add_argument("--single", default=None, help="a run of strategy 'single' (one point, for reference)")
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--per-target", type=int, default=10)
    parser.add_argument("--band", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output path prefix (writes .md, .json, .png)")
    args = parser.parse_args()

    start = time.perf_counter()
    results, palettes, spaces_seen = {}, {}, set()
    for run in args.runs:
        record = open_run(run)
        spaces_seen.add(record.space.to_json())
        label = _label(record)
        results[label] = population_evaluation(
            record,
            _estimator(record),
            targets=args.targets,
            per_target=args.per_target,
            band=args.band,
            seed=args.seed,
            progress=True,
        )
        palettes[label] = json.load(open(os.path.join(run, "palette.json")))
        print(f"{label}: mean over targets {np.mean([r.mean for r in results[label]]):.2%}", flush=True)
    if len(spaces_seen) != 1:
        raise SystemExit("the runs use different search spaces: their populations are not comparable")
    single = None
    if args.single:
        single_palette = json.load(open(os.path.join(args.single, "palette.json")))
        single = (f"single ({open_run(args.single).config.loss})", single_palette[0])

    labels = list(results)
    targets = results[labels[0]]
    lines = [
        "# Population evaluation of training strategies (RSS protocol)",
        "",
        f"- command: `python examples/strategy_comparison.py {' '.join(args.runs)}"
        + (f" --single {args.single}" if args.single else "")
        + f" --targets {args.targets} --per-target {args.per_target} --band {args.band} --seed {args.seed}`",
        f"- {args.per_target} subnets per target drawn uniformly in ±{args.band:.0%} of the target "
        "(`Estimator.sample`), the same subnets for every run; BN recalibrated per subnet; test split",
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads, wall time "
        f"{time.perf_counter() - start:.0f} s; written {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        "Mean test accuracy (min – max) per FLOPs target:",
        "",
        "| target MFLOPs | " + " | ".join(labels) + " |",
        "|---:|" + "---:|" * len(labels),
    ]
    for i, t in enumerate(targets):
        cells = [f"{results[k][i].mean:.1%} ({results[k][i].min:.1%} – {results[k][i].max:.1%})" for k in labels]
        lines.append(f"| {t.target_mflops:.2f} | " + " | ".join(cells) + " |")
    lines.append(
        "| **mean** | " + " | ".join(f"**{np.mean([r.mean for r in results[k]]):.1%}**" for k in labels) + " |"
    )
    lines.append("| **worst subnet** | " + " | ".join(f"{min(r.min for r in results[k]):.1%}" for k in labels) + " |")
    lines += ["", "Zero-cost palettes of the same runs (`palette.json`: MFLOPs → test accuracy):", ""]
    for k in labels:
        lines.append(f"- {k}: " + ", ".join(f"{e['flops'] / 1e6:.2f} → {e['accuracy']:.1%}" for e in palettes[k]))
    if single:
        lines.append(
            f"- {single[0]} (one arch, trained alone): {single[1]['flops'] / 1e6:.2f} → {single[1]['accuracy']:.1%}"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_text_atomic("\n".join(lines) + "\n", args.out + ".md")
    write_text_atomic(
        json.dumps({k: [r.to_dict() for r in v] for k, v in results.items()}, indent=1) + "\n", args.out + ".json"
    )
    plot_population(results, args.out + ".png", title="digits: population by training strategy")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
