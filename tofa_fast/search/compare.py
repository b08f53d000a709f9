"""Zero-cost selection against validation-based search, budget by budget (TOFA Fig. 8–11 question).

For K budgets spanning the supernet's range (geometric, as the palette's: :func:`palette_budgets`),
three subnets are chosen per budget:

* ``zero-cost`` — TOFA's Algorithm 2 on the run's selection index (:meth:`Run.zero_cost_choice`), free;
* ``evolution`` — :func:`evolutionary_search` maximising validation accuracy (TOFA eq. 5);
* ``random`` — :func:`random_search` with as many evaluations as the evolution made.

Each choice is then measured on the validation and the test split (BN recalibrated), and the
per-budget gap evo test − zero-cost test says what the validation search buys.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..estimator import Estimator
from ..spaces import Arch
from ..train.palette import palette_budgets
from ..train.run_record import Run
from .evaluator import SubnetEvaluator
from .evolution import Metric, evolutionary_search, random_search, resolve_metric

SEARCH_METHODS = ("evolution", "random")
# How budgets and costs are shown: unit name and the divisor from the metric's raw unit.
METRIC_UNITS: dict[str, tuple[str, float]] = {
    "flops": ("MFLOPs", 1e6),
    "params": ("M params", 1e6),
    "latency": ("ms", 1.0),
}


@dataclass
class Selected:
    """One method's subnet for one budget and what it measures.

    ``evaluations`` counts the subnets the method measured on the validation split to choose (0 for
    ``zero-cost``); ``seconds`` is the wall time of choosing, measuring the choice excluded.
    """

    method: str
    arch: Arch
    flops: int
    params: int
    metric_value: float
    val_accuracy: float
    test_accuracy: float
    evaluations: int = 0
    seconds: float = 0.0
    history: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "arch": self.arch.to_dict(),
            "arch_string": str(self.arch),
            "flops": self.flops,
            "params": self.params,
            "metric_value": self.metric_value,
            "val_accuracy": self.val_accuracy,
            "test_accuracy": self.test_accuracy,
            "evaluations": self.evaluations,
            "seconds": round(self.seconds, 3),
            "history": self.history,
        }


@dataclass
class BudgetComparison:
    """The methods' choices for one budget (in the metric's raw unit); ``errors`` holds the reason a
    method chose nothing (e.g. zero-cost when no indexed subnet fits)."""

    budget: float
    metric: str
    selected: dict[str, Selected] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def gap(self) -> float | None:
        """Test accuracy of the evolution's choice minus the zero-cost choice's (None if either is missing)."""
        evo, zero = self.selected.get("evolution"), self.selected.get("zero-cost")
        if evo is None or zero is None:
            return None
        return evo.test_accuracy - zero.test_accuracy

    def to_dict(self) -> dict[str, Any]:
        unit, scale = METRIC_UNITS.get(self.metric, (self.metric, 1.0))
        return {
            "budget": self.budget,
            "budget_display": self.budget / scale,
            "unit": unit,
            "metric": self.metric,
            "methods": {name: s.to_dict() for name, s in self.selected.items()},
            "errors": dict(self.errors),
            "gap_test": self.gap,
        }


def comparison_budgets(estimator: Estimator, metric: str | Metric, count: int) -> list[float]:
    """``count`` budgets geometrically spaced from the smallest to the largest subnet's cost."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"budgets must be a positive integer count or a list of budgets, got {count!r}")
    name, fn = resolve_metric(estimator, metric)
    if name == "flops":
        ends = [float(v) for v in estimator.flops_range()]
    else:
        space = estimator.space
        ends = [float(v) for v in fn(space.encode([space.min_arch(), space.max_arch()]))]
    return palette_budgets(ends, int(count))


def compare_selection(
    run: Run,
    *,
    budgets: int | Sequence[float] = 6,
    metric: str | Metric = "flops",
    methods: Sequence[str] = SEARCH_METHODS,
    population: int = 24,
    generations: int = 8,
    parent_ratio: float = 0.25,
    mutation_ratio: float = 0.5,
    mutate_prob: float = 0.1,
    seed: int = 0,
    evaluator: SubnetEvaluator | None = None,
    estimator: Estimator | None = None,
    progress: bool = False,
) -> list[BudgetComparison]:
    """Zero-cost, evolutionary and random selection for each budget (module docstring).

    Args:
        run: a :class:`~tofa_fast.train.Run` with a validation split (its selection index and
            strategy give the zero-cost choice).
        budgets: a count K (budgets spanning the space's range) or the budgets themselves, in the
            metric's raw unit (FLOPs, parameters, ms).
        metric: ``"flops"``, ``"params"``, ``"latency"`` (needs an estimator with a latency table)
            or a callable codes → costs.
        methods: which searches to run beside zero-cost, a subset of ``("evolution", "random")``.
            ``random`` alone gets the evaluation count evolution would have made at most.
        population, generations, parent_ratio, mutation_ratio, mutate_prob: the evolution's
            settings (:func:`evolutionary_search`).
        seed: every search is deterministic given it (budget k uses the seed sequence (seed, k)).
        evaluator, estimator: reuse existing ones (default: built from the run).
        progress: show progress bars.

    Returns one :class:`BudgetComparison` per budget, in increasing order.
    """
    unknown = [m for m in methods if m not in SEARCH_METHODS]
    if unknown or isinstance(methods, str):
        raise ValueError(f"methods must be a subset of {list(SEARCH_METHODS)}, got {methods!r}")
    evaluator = evaluator or SubnetEvaluator.from_run(run)
    evaluator.require("val")
    evaluator.require("test")
    space = run.space
    estimator = estimator or Estimator(space, num_classes=run.num_classes)
    metric_name, metric_fn = resolve_metric(estimator, metric)
    if isinstance(budgets, (int, np.integer)) and not isinstance(budgets, bool):
        budget_list = comparison_budgets(estimator, metric, int(budgets))
    else:
        budget_list = sorted(float(b) for b in budgets)
        if not budget_list:
            raise ValueError("budgets must not be empty")
    fitness = evaluator.fitness("val")
    max_evaluations = population + generations * (population - max(1, round(population * parent_ratio)))

    def measure(method: str, arch: Arch, seconds: float, evaluations: int, history: list[float]) -> Selected:
        code = space.encode([arch])
        return Selected(
            method=method,
            arch=arch,
            flops=int(estimator.flops(code)[0]),
            params=int(estimator.params(code)[0]),
            metric_value=float(np.asarray(metric_fn(code))[0]),
            val_accuracy=float(evaluator.accuracy([arch], "val")[0]),
            test_accuracy=float(evaluator.accuracy([arch], "test")[0]),
            evaluations=evaluations,
            seconds=seconds,
            history=history,
        )

    from tqdm import tqdm

    results = []
    for k, budget in enumerate(tqdm(budget_list, desc="budgets", disable=not progress, leave=False)):
        comparison = BudgetComparison(budget, metric_name)
        start = time.perf_counter()
        try:
            arch = run.zero_cost_choice(lambda archs: metric_fn(space.encode(list(archs))), budget, metric_name)
            comparison.selected["zero-cost"] = measure("zero-cost", arch, time.perf_counter() - start, 0, [])
        except ValueError as exc:
            comparison.errors["zero-cost"] = str(exc)
        evaluations = max_evaluations
        if "evolution" in methods:
            start = time.perf_counter()
            evo = evolutionary_search(
                fitness,
                estimator,
                budget,
                metric=metric,
                population=population,
                generations=generations,
                parent_ratio=parent_ratio,
                mutation_ratio=mutation_ratio,
                mutate_prob=mutate_prob,
                seed=np.random.default_rng([seed, k, 0]),
            )
            seconds = time.perf_counter() - start
            comparison.selected["evolution"] = measure("evolution", evo.arch, seconds, evo.evaluations, evo.history)
            evaluations = evo.evaluations
        if "random" in methods:
            start = time.perf_counter()
            rnd = random_search(
                fitness, estimator, budget, evaluations, metric=metric, seed=np.random.default_rng([seed, k, 1])
            )
            seconds = time.perf_counter() - start
            comparison.selected["random"] = measure("random", rnd.arch, seconds, rnd.evaluations, rnd.history)
        results.append(comparison)
    return results
