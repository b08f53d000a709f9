"""Population evaluation of several training strategies on one data split (the RSS paper's Fig. 3 question:
how good is a *typical* subnet of the supernet at each FLOPs level, not just the hand-picked ones?).

Train the runs first, on the same split (same data, seed and validation hold-out), e.g.::

    for s in tofa rss ps single; do
        tofa-fast train --strategy $s --val-per-class 20 --out runs/strategies/$s
    done
    python examples/strategy_comparison.py runs/strategies/{tofa,rss,ps} --single runs/strategies/single \
        --out bench/results/strategy_comparison_digits

``--protocol band`` (default) draws each target's subnets uniformly among those in a relative band
around evenly spaced targets; ``--protocol rss`` is the RSS paper's own §6.1 protocol (fixed MFLOPs
targets, per-layer uniform draws until within ``--tolerance-mflops``, width locked at the extreme
targets; see ``tofa_fast.search.rss_protocol``) — use it, on ``--space rss`` runs, to reproduce the
paper's Fig. 3 protocol for protocol. Every run is measured on the *same* subnets (the draws depend
only on the space and ``--seed``), BN recalibrated per subnet on the run's own training images,
tested on the test split. Writes
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

from tofa_fast.search import plot_population, population_evaluation, rss_population_evaluation, rss_tolerance_mflops
from tofa_fast.train.checkpoint import write_text_atomic
from tofa_fast.train.run import _estimator, open_run


def _label(record) -> str:
    return f"{record.config.strategy} ({record.config.loss})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders trained on the same data split")
    parser.add_argument("--single", default=None, help="a run of strategy 'single' (one point, for reference)")
    parser.add_argument("--protocol", choices=("band", "rss"), default="band", help="population protocol")
    parser.add_argument("--targets", type=int, default=8, help="band: number of targets")
    parser.add_argument("--per-target", type=int, default=10)
    parser.add_argument("--band", type=float, default=0.05, help="band: relative band around each target")
    parser.add_argument(
        "--targets-mflops", type=float, nargs="+", default=None, help="rss: targets (default: the paper's on rss)"
    )
    parser.add_argument("--tolerance-mflops", type=float, default=None, help="rss: ± MFLOPs around each target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output path prefix (writes .md, .json, .png)")
    args = parser.parse_args()

    start = time.perf_counter()
    results, palettes, spaces_seen = {}, {}, set()
    for run in args.runs:
        record = open_run(run)
        spaces_seen.add(record.space.to_json())
        label = _label(record)
        estimator = _estimator(record)
        if args.protocol == "band":
            results[label] = population_evaluation(
                record,
                estimator,
                targets=args.targets,
                per_target=args.per_target,
                band=args.band,
                seed=args.seed,
                progress=True,
            )
        else:
            tolerance = rss_tolerance_mflops(estimator) if args.tolerance_mflops is None else args.tolerance_mflops
            results[label] = rss_population_evaluation(
                record,
                estimator,
                targets_mflops=args.targets_mflops,
                tolerance_mflops=tolerance,
                per_target=args.per_target,
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
    if args.protocol == "band":
        options = f"--targets {args.targets} --band {args.band}"
        drawn = (
            f"`band` protocol: {args.per_target} subnets per target drawn uniformly among the subnets in "
            f"±{args.band:.0%} of the target (`Estimator.sample`)"
        )
    else:
        options = " ".join(
            (["--targets-mflops " + " ".join(f"{t:g}" for t in args.targets_mflops)] if args.targets_mflops else [])
            + [f"--tolerance-mflops {tolerance:g}"]
        )
        drawn = (
            f"`rss` protocol (the RSS paper's §6.1): {args.per_target} subnets per target, every setting drawn "
            f"uniformly layer by layer until within ±{tolerance:g} MFLOPs of the target; expand ratios locked at "
            "their minimum for the lowest target and at their maximum for the highest (`rss_population_evaluation`)"
        )
    lines = [
        f"# Population evaluation of training strategies ({args.protocol} protocol)",
        "",
        f"- command: `python examples/strategy_comparison.py {' '.join(args.runs)}"
        + (f" --single {args.single}" if args.single else "")
        + f" --protocol {args.protocol} {options} --per-target {args.per_target} --seed {args.seed}`",
        f"- {drawn}; the same subnets for every run; BN recalibrated per subnet; test split",
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
    plot_population(
        results, args.out + ".png", title=f"{record.config.data}: population by training strategy ({args.protocol})"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
