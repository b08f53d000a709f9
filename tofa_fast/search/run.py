"""Entry points on a run folder: validation-based search and population evaluation.

``search_run`` backs ``tofa-fast search RUN`` and writes ``search.json`` / ``search.md``;
``population_run`` backs ``tofa-fast evaluate RUN --population N`` and writes ``population.json`` /
``population.md`` / ``population.png``. Both open the run with :meth:`Run.open` (data loaded for
BN recalibration) and leave the checkpoint untouched.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..train.run_record import Run
from .compare import METRIC_UNITS, SEARCH_METHODS, BudgetComparison, compare_selection
from .evaluator import SubnetEvaluator
from .population import PopulationTarget, population_evaluation
from .report import write_population, write_search

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
    targets: int = 10,
    per_target: int = 20,
    band: float = 0.05,
    seed: int = 0,
    split: str = "test",
    device: str | None = None,
    progress: bool = True,
) -> list[PopulationTarget]:
    """Population evaluation (RSS protocol) of a run folder's supernet.

    ``targets`` evenly spaced MFLOPs targets over the space's range, ``per_target`` subnets drawn
    uniformly in the band ``[t(1 − band), t(1 + band)]`` around each, BN recalibrated, measured on
    ``split``. Writes ``population.json``, ``population.md`` and ``population.png`` into ``run`` and
    returns the per-target results (see :func:`population_evaluation` for errors).
    """
    from ..estimator import Estimator

    start = time.perf_counter()
    record = Run.open(run, device=device)
    estimator = Estimator(record.space, num_classes=record.num_classes)
    evaluator = SubnetEvaluator.from_run(record, (split,))
    results = population_evaluation(
        evaluator,
        estimator,
        targets=targets,
        per_target=per_target,
        band=band,
        seed=seed,
        split=split,
        progress=progress,
    )
    c = record.config
    label = f"{c.strategy} ({c.loss})"
    meta = {
        **record.meta(),
        "title": f"{c.data} — population, {split} split",
        "targets": targets,
        "subnets per target": per_target,
        "band": f"±{band:.0%}",
        "split": split,
        "sample seed": seed,
        "torch threads": torch.get_num_threads(),
        "wall time (s)": round(time.perf_counter() - start, 1),
    }
    write_population(run, {label: results}, meta)
    return results
