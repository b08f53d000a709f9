"""Markdown tables and JSON files of search comparisons and population evaluations.

Files are written atomically (:func:`write_text_atomic`), so an interrupted command never leaves a
half-written ``search.json`` or ``population.json`` behind. Accuracies are fractions in [0, 1] in
JSON and percentages in Markdown.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..train.checkpoint import write_text_atomic
from .compare import METRIC_UNITS, BudgetComparison
from .population import PopulationTarget

METHOD_ORDER = ("zero-cost", "evolution", "random")


def _methods(comparisons: Sequence[BudgetComparison]) -> list[str]:
    present = {name for c in comparisons for name in (*c.selected, *c.errors)}
    return [m for m in METHOD_ORDER if m in present]


def search_summary(comparisons: Sequence[BudgetComparison]) -> dict[str, Any]:
    """Mean validation/test accuracy per method over the budgets where every method chose, and the
    mean, min and max per-budget gap (evo test − zero-cost test)."""
    methods = _methods(comparisons)
    complete = [c for c in comparisons if all(m in c.selected for m in methods)]
    summary: dict[str, Any] = {"budgets": len(comparisons), "budgets_all_methods": len(complete)}
    for m in methods:
        if complete:
            summary[m] = {
                "mean_val_accuracy": float(np.mean([c.selected[m].val_accuracy for c in complete])),
                "mean_test_accuracy": float(np.mean([c.selected[m].test_accuracy for c in complete])),
                "evaluations": int(sum(c.selected[m].evaluations for c in comparisons if m in c.selected)),
                "seconds": round(float(sum(c.selected[m].seconds for c in comparisons if m in c.selected)), 2),
            }
    gaps = [c.gap for c in comparisons if c.gap is not None]
    if gaps:
        summary["gap_test"] = {
            "mean": float(np.mean(gaps)),
            "min": float(np.min(gaps)),
            "max": float(np.max(gaps)),
            "evolution_better": sum(g > 0 for g in gaps),
            "equal": sum(g == 0 for g in gaps),
            "zero_cost_better": sum(g < 0 for g in gaps),
        }
    return summary


def search_json(comparisons: Sequence[BudgetComparison], meta: Mapping[str, Any]) -> str:
    data = {
        "meta": dict(meta),
        "budgets": [c.to_dict() for c in comparisons],
        "summary": search_summary(comparisons),
    }
    return json.dumps(data, indent=2) + "\n"


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def search_markdown(comparisons: Sequence[BudgetComparison], meta: Mapping[str, Any]) -> str:
    """One row per budget: each method's cost, validation and test accuracy (%), and the gap."""
    methods = _methods(comparisons)
    metric = comparisons[0].metric if comparisons else "flops"
    unit, scale = METRIC_UNITS.get(metric, (metric, 1.0))
    lines = ["# Subnet selection: zero-cost vs validation-based search", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "Accuracies in %; val = validation split (searched on), test = held-out test split.", ""]
    header = [f"budget {unit}"]
    for m in methods:
        header += [f"{m} {unit}", f"{m} val", f"{m} test"]
    if "evolution" in methods and "zero-cost" in methods:
        header.append("gap test (evo − zc)")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---:|" * len(header))
    for c in comparisons:
        row = [f"{c.budget / scale:.3f}"]
        for m in methods:
            s = c.selected.get(m)
            if s is None:
                row += ["—", "—", "—"]
            else:
                row += [f"{s.metric_value / scale:.3f}", _pct(s.val_accuracy), _pct(s.test_accuracy)]
        if "evolution" in methods and "zero-cost" in methods:
            row.append(_pct(c.gap, signed=True))
        lines.append("| " + " | ".join(row) + " |")
    summary = search_summary(comparisons)
    if summary["budgets_all_methods"]:
        row = ["**mean**"]
        for m in methods:
            row += ["", _pct(summary[m]["mean_val_accuracy"]), _pct(summary[m]["mean_test_accuracy"])]
        if "gap_test" in summary:
            row.append(_pct(summary["gap_test"]["mean"], signed=True))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for m in methods:
        if m in summary:
            lines.append(
                f"- `{m}`: {summary[m]['evaluations']} validation evaluations in all, {summary[m]['seconds']} s"
            )
    if "gap_test" in summary:
        g = summary["gap_test"]
        lines.append(
            f"- gap evo − zero-cost (test): mean {_pct(g['mean'], True)}, min {_pct(g['min'], True)}, "
            f"max {_pct(g['max'], True)} points; evolution better on {g['evolution_better']}, equal on "
            f"{g['equal']}, zero-cost better on {g['zero_cost_better']} of {len(comparisons)} budgets"
        )
    errors = [(c, m, e) for c in comparisons for m, e in c.errors.items()]
    for c, m, e in errors:
        lines.append(f"- `{m}` chose nothing for budget {c.budget / scale:.3f} {unit}: {e}")
    lines += ["", "Chosen subnets:", ""]
    for c in comparisons:
        for m in methods:
            if m in c.selected:
                lines.append(f"- {c.budget / scale:.3f} {unit}, `{m}`: `{c.selected[m].arch}`")
    return "\n".join(lines) + "\n"


def population_json(results_by_label: Mapping[str, Sequence[PopulationTarget]], meta: Mapping[str, Any]) -> str:
    data = {"meta": dict(meta), "runs": {label: [r.to_dict() for r in rs] for label, rs in results_by_label.items()}}
    return json.dumps(data, indent=2) + "\n"


def population_markdown(results_by_label: Mapping[str, Sequence[PopulationTarget]], meta: Mapping[str, Any]) -> str:
    """Per label, one row per target: band, draws (distinct), mean / min / max / std accuracy (%)."""
    protocol = str(meta.get("protocol", "band")).split(":")[0]
    lines = [f"# Population evaluation ({protocol} protocol)", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    for label, results in results_by_label.items():
        lines += [
            "",
            f"## {label}",
            "",
            "| target MFLOPs | band MFLOPs | subnets (distinct) | mean | min | max | std |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results:
            lines.append(
                f"| {r.target_mflops:.3f} | {r.low_mflops:.3f}–{r.high_mflops:.3f} | {r.n} ({r.unique}) | "
                f"{_pct(r.mean)} | {_pct(r.min)} | {_pct(r.max)} | {_pct(r.std)} |"
            )
        if results:
            lines.append(
                f"| **all** | | {sum(r.n for r in results)} | {_pct(np.mean([r.mean for r in results]))} | | | |"
            )
    return "\n".join(lines) + "\n"


def write_search(folder: str, comparisons: Sequence[BudgetComparison], meta: Mapping[str, Any]) -> list[str]:
    """Write ``search.json`` and ``search.md`` into ``folder``; returns their paths."""
    meta = {**meta, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    paths = [os.path.join(folder, "search.json"), os.path.join(folder, "search.md")]
    write_text_atomic(search_json(comparisons, meta), paths[0])
    write_text_atomic(search_markdown(comparisons, meta), paths[1])
    return paths


def write_population(
    folder: str, results_by_label: Mapping[str, Sequence[PopulationTarget]], meta: Mapping[str, Any]
) -> list[str]:
    """Write ``population.json``, ``population.md`` and ``population.png`` into ``folder``."""
    from .population import plot_population

    meta = {**meta, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    paths = [os.path.join(folder, f"population.{ext}") for ext in ("json", "md", "png")]
    write_text_atomic(population_json(results_by_label, meta), paths[0])
    write_text_atomic(population_markdown(results_by_label, meta), paths[1])
    split = meta.get("split", "test")
    ylabel = "test accuracy (%)" if split == "test" else f"{split} accuracy (%)"
    plot_population(results_by_label, paths[2], title=str(meta.get("title", "population evaluation")), ylabel=ylabel)
    return paths
