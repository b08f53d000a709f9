"""Population evaluation of several training strategies on one data split (the RSS paper's Fig. 3 question:
how good is a *typical* subnet of the supernet at each FLOPs level, not just the hand-picked ones?).

Train the runs first, on the same split (same data, seed and validation hold-out), e.g.::

    for s in tofa rss ps single; do
        tofa-fast train --strategy $s --val-per-class 20 --out runs/strategies/$s
    done
    python examples/strategy_comparison.py runs/strategies/{tofa,rss,ps} --single runs/strategies/single \
        --out bench/results/strategy_comparison_digits

Runs of the same strategy and loss trained with different ``--seed`` are grouped: each cell is then
the mean ± sd over seeds of the population's mean accuracy at that target (``scripts/strategy_seeds.sh``
trains and compares the README's multi-seed table). Each run's measured population is kept in the run
folder (``population-<protocol>-<hash of the settings>.json``, tied to its checkpoint), so adding a
seed to a comparison measures only the new runs.

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
import hashlib
import json
import os
import re
import time
from collections import defaultdict

import numpy as np
import torch

from tofa_fast.search import (
    PopulationTarget,
    plot_population,
    population_evaluation,
    rss_population_evaluation,
    rss_tolerance_mflops,
)
from tofa_fast.train.checkpoint import write_text_atomic
from tofa_fast.train.run import _estimator, open_run


def _label(record) -> str:
    return f"{record.config.strategy} ({record.config.loss})"


def _wall_minutes(run: str) -> float:
    """The run's training wall time, from the ``report.md`` line the trainer writes."""
    match = re.search(r"wall time ([0-9.]+) min", open(os.path.join(run, "report.md")).read())
    return float(match.group(1)) if match else float("nan")


def _measure(record, estimator, args: argparse.Namespace, tolerance: float) -> list[PopulationTarget]:
    if args.protocol == "band":
        return population_evaluation(
            record,
            estimator,
            targets=args.targets,
            per_target=args.per_target,
            band=args.band,
            seed=args.seed,
            progress=True,
        )
    return rss_population_evaluation(
        record,
        estimator,
        targets_mflops=args.targets_mflops,
        tolerance_mflops=tolerance,
        per_target=args.per_target,
        seed=args.seed,
        progress=True,
    )


def _cache_path(run: str, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(run, f"population-{settings['protocol']}-{digest}.json")


def _cached_population(run: str, settings: dict) -> list[PopulationTarget] | None:
    """A run's population measured earlier with the same settings (and the same checkpoint), so that
    adding a seed to a comparison measures only the new runs."""
    path = _cache_path(run, settings)
    if not os.path.exists(path):
        return None
    return [PopulationTarget.from_dict(d) for d in json.load(open(path))]


def _cache_population(run: str, settings: dict, population: list[PopulationTarget]) -> None:
    write_text_atomic(json.dumps([r.to_dict() for r in population]) + "\n", _cache_path(run, settings))


def _mean_sd(values: list[float], percent: bool = True) -> str:
    """``mean ± sd`` over seeds (sample sd), or the value alone for one seed."""
    scale = 100 if percent else 1
    mean = scale * float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {scale * float(np.std(values, ddof=1)):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders trained on the same data split")
    parser.add_argument(
        "--single", nargs="+", default=(), help="runs of strategy 'single' (one point each, for reference)"
    )
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
    # label -> one entry per run (seed)
    results: dict[str, list] = defaultdict(list)
    palettes: dict[str, list] = defaultdict(list)
    minutes: dict[str, list[float]] = defaultdict(list)
    seeds: dict[str, list[int]] = defaultdict(list)
    spaces_seen = set()
    for run in args.runs:
        record = open_run(run)
        spaces_seen.add(record.space.to_json())
        label = _label(record)
        estimator = _estimator(record)
        tolerance = rss_tolerance_mflops(estimator) if args.tolerance_mflops is None else args.tolerance_mflops
        settings = {
            "protocol": args.protocol,
            "per_target": args.per_target,
            "seed": args.seed,
            "checkpoint_mtime_ns": os.stat(os.path.join(run, "checkpoint.pt")).st_mtime_ns,
            **(
                {"targets": args.targets, "band": args.band}
                if args.protocol == "band"
                else {"targets_mflops": args.targets_mflops, "tolerance_mflops": tolerance}
            ),
        }
        population = _cached_population(run, settings)
        if population is None:
            population = _measure(record, estimator, args, tolerance)
            _cache_population(run, settings, population)
        results[label].append(population)
        palettes[label].append(json.load(open(os.path.join(run, "palette.json"))))
        minutes[label].append(_wall_minutes(run))
        seeds[label].append(record.config.seed)
        print(f"{label} seed {record.config.seed}: mean over targets {np.mean([r.mean for r in population]):.2%}")
    if len(spaces_seen) != 1:
        raise SystemExit("the runs use different search spaces: their populations are not comparable")
    for label in results:  # seed order, whatever order the runs were given in
        order = np.argsort(seeds[label], kind="stable")
        for table in (results, palettes, minutes, seeds):
            table[label] = [table[label][i] for i in order]
    single_label, single_accuracy = None, []
    for run in args.single:
        single_label = f"single ({open_run(run).config.loss})"
        single_accuracy.append(json.load(open(os.path.join(run, "palette.json")))[0]["accuracy"])

    labels = list(results)
    targets = results[labels[0]][0]
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
        + (f" --single {' '.join(args.single)}" if args.single else "")
        + f" --protocol {args.protocol} {options} --per-target {args.per_target} --seed {args.seed}`",
        f"- {drawn}; the same subnets for every run; BN recalibrated per subnet; test split",
        "- seeds: " + "; ".join(f"{k}: {', '.join(map(str, seeds[k]))}" for k in labels),
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads, wall time "
        f"{time.perf_counter() - start:.0f} s; written {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        "Test accuracy (%) of the population at each FLOPs target: the mean over its subnets, then mean ± sd "
        "over seeds; *worst* is the lowest single subnet over all seeds:",
        "",
        "| target MFLOPs | " + " | ".join(labels) + " |",
        "|---:|" + "---:|" * len(labels),
    ]
    for i, t in enumerate(targets):
        cells = [
            f"{_mean_sd([run[i].mean for run in results[k]])} (worst {100 * min(run[i].min for run in results[k]):.1f})"
            for k in labels
        ]
        lines.append(f"| {t.target_mflops:.2f} | " + " | ".join(cells) + " |")
    lines.append(
        "| **mean over targets** | "
        + " | ".join(f"**{_mean_sd([np.mean([r.mean for r in run]) for run in results[k]])}**" for k in labels)
        + " |"
    )
    lines.append(
        "| zero-cost palette, largest budget | "
        + " | ".join(_mean_sd([palette[-1]["accuracy"] for palette in palettes[k]]) for k in labels)
        + " |"
    )
    lines.append(
        "| zero-cost palette, smallest budget | "
        + " | ".join(_mean_sd([palette[0]["accuracy"] for palette in palettes[k]]) for k in labels)
        + " |"
    )
    lines.append("| training wall time, min | " + " | ".join(_mean_sd(minutes[k], False) for k in labels) + " |")
    if single_label:
        lines += ["", f"{single_label}, the max arch trained alone: {_mean_sd(single_accuracy)}% test accuracy."]
    lines += ["", "Zero-cost palettes of the same runs (`palette.json`: MFLOPs → test accuracy):", ""]
    for k in labels:
        for seed, palette in zip(seeds[k], palettes[k]):
            lines.append(
                f"- {k}, seed {seed}: " + ", ".join(f"{e['flops'] / 1e6:.2f} → {e['accuracy']:.1%}" for e in palette)
            )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_text_atomic("\n".join(lines) + "\n", args.out + ".md")
    write_text_atomic(
        json.dumps(
            {
                k: [{"seed": seed, "targets": [r.to_dict() for r in run]} for seed, run in zip(seeds[k], v)]
                for k, v in results.items()
            },
            indent=1,
        )
        + "\n",
        args.out + ".json",
    )
    plot_population(
        {k: v[0] for k, v in results.items()},
        args.out + ".png",
        title=f"{record.config.data}: population by training strategy ({args.protocol}, seed {seeds[labels[0]][0]})",
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
