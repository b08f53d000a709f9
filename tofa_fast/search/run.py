"""Entry points on a run folder: validation-based search and population evaluation.

``search_run`` backs ``tofa-fast search RUN`` and writes ``search.json`` / ``search.md``;
``population_run`` backs ``tofa-fast evaluate RUN --population N [--protocol band|rss]`` and writes
``population.json`` / ``population.md`` / ``population.png``. Both open the run with :meth:`Run.open` (data loaded for
BN recalibration) and leave the checkpoint untouched.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from ..train.run_record import Run
from .compare import METRIC_UNITS, SEARCH_METHODS, BudgetComparison, compare_selection
from .evaluator import SubnetEvaluator
from .population import PopulationTarget, population_evaluation
from .report import write_population, write_search
from .rss_protocol import rss_population_evaluation, rss_tolerance_mflops

POPULATION_PROTOCOLS = ("band", "rss")
SEARCH_RUN_METHODS = {"all": SEARCH_METHODS, "evolution": ("evolution",), "random": ("random",), "zero-cost": ()}


def search_run(
    run: str,
    *,
    method: str = "all",
    budgets: int | Sequence[float] = 6,
    metric: str = "flops",
    population: int = 24,
    generations: int = 8,
    seed: int = 0,
    latency_table: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> list[BudgetComparison]:
    """Choose a subnet per budget by validation accuracy and compare with the zero-cost choice.

    Args:
        run: a run folder trained with a validation split (``tofa-fast train --val-per-class N``).
        method: ``"all"`` (evolution and random search), ``"evolution"``, ``"random"`` or
            ``"zero-cost"`` (the zero-cost choice is always recorded, for the gap).
        budgets: a count K of budgets spanning the supernet's range, or the budgets themselves in
            the metric's display unit: MFLOPs (``flops``), millions of parameters (``params``),
            milliseconds (``latency``).
        metric: ``"flops"``, ``"params"`` or ``"latency"`` (needs ``latency_table``).
        population, generations: the evolution's size (random search gets as many evaluations).
        seed: searches are deterministic given it.
        latency_table: path of a ``tofa-fast profile`` table, for ``metric="latency"``.
        device: where to evaluate (default: CUDA when available).
        progress: show progress bars.

    Writes ``search.json`` and ``search.md`` into ``run`` and returns the comparisons. Raises
    ``ValueError`` when the run has no validation split.
    """
    from ..estimator import Estimator

    if method not in SEARCH_RUN_METHODS:
        raise ValueError(f"method must be one of {list(SEARCH_RUN_METHODS)}, got {method!r}")
    if metric not in METRIC_UNITS:
        raise ValueError(f"metric must be one of {list(METRIC_UNITS)}, got {metric!r}")
    if metric == "latency" and latency_table is None:
        raise ValueError("metric 'latency' needs latency_table (a table written by `tofa-fast profile`)")
    if not isinstance(budgets, (int, Sequence)) or isinstance(budgets, (bool, str)):
        raise ValueError(f"budgets must be a count or a list of budgets, got {budgets!r}")
    start = time.perf_counter()
    record = Run.open(run, device=device)
    if record.splits.val is None:
        raise ValueError(
            f"run {run!r} has no validation split: train with --val-per-class N to search on validation accuracy"
        )
    estimator = Estimator(record.space, num_classes=record.num_classes, latency_table=latency_table)
    unit, scale = METRIC_UNITS[metric]
    raw_budgets = budgets if isinstance(budgets, int) else [float(b) * scale for b in budgets]
    evaluator = SubnetEvaluator.from_run(record)
    comparisons = compare_selection(
        record,
        budgets=raw_budgets,
        metric=metric,
        methods=SEARCH_RUN_METHODS[method],
        population=population,
        generations=generations,
        seed=seed,
        evaluator=evaluator,
        estimator=estimator,
        progress=progress,
    )
    meta = {
        **record.meta(),
        "metric": metric,
        "method": method,
        "evolution": f"population {population}, {generations} generations",
        "search seed": seed,
        "validation / test images": f"{len(record.splits.val)} / {len(record.splits.test)}",
        "distinct subnets measured": evaluator.evaluations,
        "torch threads": torch.get_num_threads(),
        "wall time (s)": round(time.perf_counter() - start, 1),
    }
    write_search(run, comparisons, meta)
    return comparisons


def population_run(
    run: str,
    *,
    per_target: int = 20,
    protocol: str = "band",
    targets: int | None = None,
    band: float | None = None,
    targets_mflops: Sequence[float] | None = None,
    tolerance_mflops: float | None = None,
    seed: int = 0,
    split: str = "test",
    device: str | None = None,
    progress: bool = True,
) -> list[PopulationTarget]:
    """Population evaluation of a run folder's supernet, by either protocol (:mod:`.population`).

    ``protocol="band"``: ``targets`` (default 10) evenly spaced MFLOPs targets over the space's
    range, ``per_target`` subnets drawn uniformly in the band ``[t(1 − band), t(1 + band)]``
    (default ``band`` 0.05) around each (:func:`population_evaluation`). ``protocol="rss"``: the RSS
    paper's §6.1 protocol, ``per_target`` per-layer uniform draws within ``tolerance_mflops`` of each
    of ``targets_mflops`` (defaults: the paper's {4, …, 14} ± 0.5 on the ``rss`` space; see
    :func:`rss_population_evaluation`). Options of the other protocol are refused (``ValueError``).

    Subnets are BN recalibrated and measured on ``split``. Writes ``population.json``,
    ``population.md`` and ``population.png`` into ``run`` and returns the per-target results.
    """
    from ..estimator import Estimator

    if protocol not in POPULATION_PROTOCOLS:
        raise ValueError(f"protocol must be one of {list(POPULATION_PROTOCOLS)}, got {protocol!r}")
    foreign = {
        "band": {"targets_mflops": targets_mflops, "tolerance_mflops": tolerance_mflops},
        "rss": {"targets": targets, "band": band},
    }[protocol]
    given = [name for name, value in foreign.items() if value is not None]
    if given:
        verb = "does" if len(given) == 1 else "do"
        raise ValueError(f"{' and '.join(given)} {verb} not apply to protocol {protocol!r}")
    start = time.perf_counter()
    record = Run.open(run, device=device)
    estimator = Estimator(record.space, num_classes=record.num_classes)
    evaluator = SubnetEvaluator.from_run(record, (split,))
    c = record.config
    meta = {**record.meta(), "title": f"{c.data} — population ({protocol} protocol), {split} split"}
    common: dict[str, Any] = {"per_target": per_target, "seed": seed, "split": split, "progress": progress}
    if protocol == "band":
        targets, band = 10 if targets is None else targets, 0.05 if band is None else band
        results = population_evaluation(evaluator, estimator, targets=targets, band=band, **common)
        meta |= {
            "protocol": "band: uniform among the subnets in a band around each target",
            "targets": targets,
            "band": f"±{band:.0%}",
        }
    else:
        tolerance = rss_tolerance_mflops(estimator) if tolerance_mflops is None else tolerance_mflops
        results = rss_population_evaluation(
            evaluator, estimator, targets_mflops=targets_mflops, tolerance_mflops=tolerance, **common
        )
        meta |= {
            "protocol": "rss: per-layer uniform draws rejected until within the tolerance of the target; "
            "expand ratios at their minimum for the lowest target, at their maximum for the highest",
            "targets (MFLOPs)": ", ".join(f"{r.target_mflops:g}" for r in results),
            "tolerance": f"±{tolerance:g} MFLOPs",
        }
    meta |= {
        "subnets per target": per_target,
        "split": split,
        "sample seed": seed,
        "torch threads": torch.get_num_threads(),
        "wall time (s)": round(time.perf_counter() - start, 1),
    }
    write_population(run, {f"{c.strategy} ({c.loss})": results}, meta)
    return results
