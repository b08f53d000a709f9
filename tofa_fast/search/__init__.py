"""Subnet search on a trained supernet (SPEC §7): validation-based selection (TOFA eq. 5) and
population evaluation (the RSS paper's question, by two protocols).

Where things live:

* :mod:`.evaluator` — :class:`SubnetEvaluator`, accuracy of many subnets, BN recalibrated each;
* :mod:`.evolution` — :func:`evolutionary_search` and :func:`random_search` under a cost budget;
* :mod:`.compare` — :func:`compare_selection`, zero-cost vs evolution vs random over K budgets;
* :mod:`.population` — :func:`population_evaluation` (the ``band`` protocol) and
  :func:`plot_population`;
* :mod:`.rss_protocol` — :func:`rss_population_evaluation`, the RSS paper's own protocol (fixed
  MFLOPs targets, per-layer uniform draws rejected until in range, width locked at the extremes);
* :mod:`.report` — Markdown and JSON of both; :mod:`.run` — :func:`search_run` and
  :func:`population_run` on a run folder (behind ``tofa-fast search`` / ``evaluate --population``).
"""

from .compare import BudgetComparison, Selected, compare_selection, comparison_budgets
from .evaluator import SubnetEvaluator
from .evolution import Genome, SearchResult, evolutionary_search, random_search
from .population import PopulationTarget, plot_population, population_evaluation, population_targets
from .report import population_markdown, search_markdown, write_population, write_search
from .rss_protocol import (
    RSS_PAPER_TARGETS_MFLOPS,
    per_layer_uniform_codes,
    rss_population_evaluation,
    rss_targets_mflops,
    rss_tolerance_mflops,
    sample_near_target,
)
from .run import population_run, search_run

__all__ = [
    "RSS_PAPER_TARGETS_MFLOPS",
    "BudgetComparison",
    "Genome",
    "PopulationTarget",
    "SearchResult",
    "Selected",
    "SubnetEvaluator",
    "compare_selection",
    "comparison_budgets",
    "evolutionary_search",
    "per_layer_uniform_codes",
    "plot_population",
    "population_evaluation",
    "population_markdown",
    "population_run",
    "population_targets",
    "random_search",
    "rss_population_evaluation",
    "rss_targets_mflops",
    "rss_tolerance_mflops",
    "sample_near_target",
    "search_markdown",
    "search_run",
    "write_population",
    "write_search",
]
