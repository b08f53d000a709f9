"""Zero-cost vs evolution vs random per budget, the report files and the run-folder entry points."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from search_fixtures import one_thread, tiny_run

from tofa_fast.estimator import Estimator
from tofa_fast.search import (
    SubnetEvaluator,
    compare_selection,
    comparison_budgets,
    population_run,
    search_markdown,
    search_run,
)
from tofa_fast.train.checkpoint import load_checkpoint, save_atomic


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("run"))


def test_compare_selection_records_every_method_per_budget(record):
    estimator = Estimator(record.space, num_classes=10)
    evaluator = SubnetEvaluator.from_run(record)
    budgets = comparison_budgets(estimator, "flops", 3)
    low, high = estimator.flops_range()
    assert budgets[0] == low and budgets[-1] == pytest.approx(high) and budgets == sorted(budgets)
    comparisons = compare_selection(
        record, budgets=3, population=6, generations=2, seed=1, evaluator=evaluator, estimator=estimator
    )
    assert [c.budget for c in comparisons] == budgets
    for c in comparisons:
        assert set(c.selected) == {"zero-cost", "evolution", "random"} and not c.errors
        for s in c.selected.values():
            assert s.flops <= c.budget and s.metric_value == s.flops
            assert s.val_accuracy == evaluator.accuracy([s.arch], "val")[0]
            assert s.test_accuracy == evaluator.accuracy([s.arch], "test")[0]
        evo, rnd, zero = c.selected["evolution"], c.selected["random"], c.selected["zero-cost"]
        assert rnd.evaluations == evo.evaluations > 0 and zero.evaluations == 0
        assert evo.val_accuracy == max(evo.history)
        assert c.gap == evo.test_accuracy - zero.test_accuracy
        assert json.loads(json.dumps(c.to_dict()))["gap_test"] == c.gap
    assert comparisons[0].selected["zero-cost"].arch == record.space.min_arch()  # nothing else fits
    assert comparisons[-1].selected["zero-cost"].arch == record.space.max_arch()  # a_max fits (sandwich)
    again = compare_selection(
        record, budgets=3, population=6, generations=2, seed=1, evaluator=evaluator, estimator=estimator
    )
    assert [str(c.selected["evolution"].arch) for c in again] == [
        str(c.selected["evolution"].arch) for c in comparisons
    ]
    table = search_markdown(comparisons, {"run": "tiny"})
    assert "gap test (evo − zc)" in table and table.count("\n| ") >= 5


def test_compare_selection_bad_arguments(record):
    with pytest.raises(ValueError, match="methods must be a subset of"):
        compare_selection(record, budgets=1, methods=("annealing",))
    with pytest.raises(ValueError, match="budgets must be a positive integer count"):
        compare_selection(record, budgets=0)
    with pytest.raises(ValueError, match="below the smallest subnet's flops"):
        compare_selection(record, budgets=[1.0], methods=("random",))


def test_search_run_and_population_run_write_the_run_folder(record):
    run = record.config.out
    comparisons = search_run(run, budgets=2, population=4, generations=1, progress=False)
    data = json.loads(open(f"{run}/search.json").read())
    assert len(data["budgets"]) == len(comparisons) == 2
    assert (
        data["budgets"][1]["methods"]["evolution"]["test_accuracy"]
        == comparisons[1].selected["evolution"].test_accuracy
    )
    assert set(data["summary"]) >= {"zero-cost", "evolution", "random", "gap_test"}
    assert data["meta"]["strategy"] == "tofa" and "| budget MFLOPs |" in open(f"{run}/search.md").read()

    only = search_run(run, method="evolution", budgets=[2.5], population=4, generations=1, progress=False)
    assert len(only) == 1 and set(only[0].selected) == {"zero-cost", "evolution"}
    assert only[0].budget == 2.5e6 and only[0].selected["evolution"].flops <= 2.5e6

    results = population_run(run, targets=2, per_target=3, progress=False)
    assert len(results) == 2 and all(r.n == 3 for r in results)
    saved = json.loads(open(f"{run}/population.json").read())
    assert list(saved["runs"]) == ["tofa (sup+fm+kd)"] and saved["runs"]["tofa (sup+fm+kd)"][0]["n"] == 3
    assert open(f"{run}/population.png", "rb").read(4) == b"\x89PNG"
    assert "| target MFLOPs |" in open(f"{run}/population.md").read()


def test_search_run_without_a_validation_split_says_how_to_get_one(record, tmp_path):
    state = load_checkpoint(f"{record.config.out}/checkpoint.pt")
    state["config"] = {**state["config"], "val_per_class": None}
    save_atomic(state, str(tmp_path / "checkpoint.pt"))
    with pytest.raises(ValueError, match="no validation split: train with --val-per-class N"):
        search_run(str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        search_run(str(tmp_path), method="annealing")
    with pytest.raises(ValueError, match="metric 'latency' needs latency_table"):
        search_run(str(tmp_path), metric="latency")
    with pytest.raises(ValueError, match="run folder .* does not exist"):
        search_run(str(tmp_path / "missing"))


def test_zero_cost_failures_are_recorded_not_raised(record):
    # strategy 'single' style: no sandwich members, so a budget no indexed subnet fits has no choice
    saved = record.config
    record.config = replace(saved, strategy="single")
    try:
        estimator = Estimator(record.space, num_classes=10)
        low = float(estimator.flops_range()[0])
        indexed = estimator.flops(record.selection.archs())
        if np.min(indexed) <= low:
            pytest.skip("the tiny run happened to index the smallest subnet")
        (c,) = compare_selection(record, budgets=[low], population=4, generations=1, estimator=estimator)
        assert "zero-cost" not in c.selected and "smallest available" in c.errors["zero-cost"] and c.gap is None
        assert "evolution" in c.selected
    finally:
        record.config = saved
