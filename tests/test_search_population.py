"""Population evaluation by both protocols (SPEC §7): bands, the RSS paper's protocol on a trained
run and through the CLI, statistics, plot. (The RSS protocol's sampling alone:
tests/test_search_rss_protocol.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from search_fixtures import one_thread, tiny_run

from tofa_fast.cli import main
from tofa_fast.estimator import Estimator
from tofa_fast.search import (
    PopulationTarget,
    SubnetEvaluator,
    plot_population,
    population_evaluation,
    population_targets,
    rss_population_evaluation,
    rss_targets_mflops,
    rss_tolerance_mflops,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("population"))


@pytest.fixture(scope="module")
def estimator(record):
    return Estimator(record.space, num_classes=10)


def test_targets_span_the_range_and_draws_respect_the_band(record, estimator):
    low, high = estimator.flops_range()
    targets = population_targets(estimator, 4)
    assert targets[0] == low and targets[-1] == high and np.allclose(np.diff(targets), (high - low) / 3)
    results = population_evaluation(record, estimator, targets=4, per_target=5, band=0.1, seed=3)
    assert [r.target_mflops for r in results] == pytest.approx([t / 1e6 for t in targets])
    for r in results:
        t = r.target_mflops * 1e6
        assert r.low_mflops * 1e6 == pytest.approx(max(low, 0.9 * t))
        assert r.high_mflops * 1e6 == pytest.approx(min(high, 1.1 * t))
        assert r.n == 5 and 1 <= r.unique <= 5
        assert all(r.low_mflops - 1e-9 <= f <= r.high_mflops + 1e-9 for f in r.mflops)
    assert results[0].low_mflops * 1e6 == low  # clipped to the range
    again = population_evaluation(record, estimator, targets=4, per_target=5, band=0.1, seed=3)
    assert [r.archs for r in again] == [r.archs for r in results]  # deterministic for a seed


def test_statistics_are_those_of_the_measured_points(record, estimator):
    evaluator = SubnetEvaluator.from_run(record, ("test",))
    results = population_evaluation(evaluator, estimator, targets=2, per_target=6, seed=1)
    space = record.space
    for r in results:
        archs = [space.arch_from_string(s) for s in r.archs]
        accuracy = evaluator.accuracy(archs, "test")
        assert r.accuracy == accuracy.tolist()
        assert r.mflops == pytest.approx((estimator.flops(archs) / 1e6).tolist())
        assert (r.mean, r.min, r.max, r.std) == pytest.approx(
            (accuracy.mean(), accuracy.min(), accuracy.max(), accuracy.std())
        )
        d = r.to_dict()
        assert d["n"] == 6 and d["mean"] == r.mean and len(d["points"]) == 6
        assert PopulationTarget.from_dict(d) == r


def test_hand_made_statistics():
    r = PopulationTarget(2.0, 1.9, 2.1, [1.95, 2.0, 2.05], [0.5, 1.0, 0.75], ["a", "b", "a"])
    assert (r.n, r.unique, r.mean, r.min, r.max) == (3, 2, 0.75, 0.5, 1.0)
    assert r.std == pytest.approx(np.sqrt(((0.25**2) * 2) / 3))


def test_plot_is_written_for_several_runs(tmp_path):
    a = [PopulationTarget(t, t * 0.95, t * 1.05, [t], [acc], ["x"]) for t, acc in ((1.0, 0.8), (2.0, 0.9))]
    b = [
        PopulationTarget(t, t * 0.95, t * 1.05, [t, t], [acc, acc - 0.1], ["x", "y"])
        for t, acc in ((1.0, 0.7), (2.0, 0.95))
    ]
    path = tmp_path / "population.png"
    plot_population({"tofa": a, "rss": b}, str(path), title="two strategies")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["population.png"]  # no temporary left behind
    with pytest.raises(ValueError, match="at least one"):
        plot_population({}, str(path))
    with pytest.raises(ValueError, match="results_by_label\\['tofa'\\] is empty"):
        plot_population({"tofa": []}, str(path))


def test_empty_bands_and_bad_arguments_are_explained(record, estimator):
    evaluator = SubnetEvaluator.from_run(record, ("test",))
    with pytest.raises(ValueError, match="no subnet has FLOPs in the band .* widen band"):
        population_evaluation(evaluator, estimator, targets=4, per_target=2, band=1e-12)
    with pytest.raises(ValueError, match="band must be a relative half-width"):
        population_evaluation(evaluator, estimator, band=1.5)
    with pytest.raises(ValueError, match="per_target must be a positive integer"):
        population_evaluation(evaluator, estimator, per_target=0)
    with pytest.raises(ValueError, match="targets must be a positive integer"):
        population_evaluation(evaluator, estimator, targets=0)
    with pytest.raises(ValueError, match="estimator must score the evaluator's search space"):
        population_evaluation(evaluator, Estimator("rss", num_classes=10))


def test_rss_protocol_measures_draws_in_range_with_the_extremes_width_locked(record, estimator):
    evaluator = SubnetEvaluator.from_run(record, ("test",))
    low, high = (v / 1e6 for v in estimator.flops_range())
    targets, tolerance = rss_targets_mflops(estimator), rss_tolerance_mflops(estimator)
    results = rss_population_evaluation(evaluator, estimator, per_target=2, seed=5)
    assert [r.target_mflops for r in results] == pytest.approx(targets)
    for r, t in zip(results, targets):
        assert r.n == 2 and all(abs(f - t) <= tolerance + 1e-9 for f in r.mflops)
        assert (r.low_mflops, r.high_mflops) == pytest.approx((max(low, t - tolerance), min(high, t + tolerance)))
    space = record.space
    expands = [
        [(e, st) for s in r.archs for sa, st in zip(space.arch_from_string(s).stages, space.stages) for e in sa.expand]
        for r in results
    ]
    assert all(e == min(st.expands) for e, st in expands[0])
    assert all(e == max(st.expands) for e, st in expands[-1])
    again = rss_population_evaluation(evaluator, estimator, per_target=2, seed=5)
    assert [(r.archs, r.accuracy) for r in again] == [(r.archs, r.accuracy) for r in results]

    mine = rss_population_evaluation(
        evaluator, estimator, targets_mflops=[5.0, 2.0], tolerance_mflops=0.3, per_target=1, lock_extremes=False
    )
    assert [r.target_mflops for r in mine] == [2.0, 5.0] and all(
        abs(r.mflops[0] - r.target_mflops) <= 0.3 for r in mine
    )
    with pytest.raises(ValueError, match=r"target 40 MFLOPs ± 0.5 \(tolerance_mflops\) lies outside the FLOPs range"):
        rss_population_evaluation(evaluator, estimator, targets_mflops=[2, 40], tolerance_mflops=0.5)
    with pytest.raises(ValueError, match="targets_mflops lists a target twice"):
        rss_population_evaluation(evaluator, estimator, targets_mflops=[2, 2])
    with pytest.raises(ValueError, match="tolerance_mflops must be a positive number"):
        rss_population_evaluation(evaluator, estimator, tolerance_mflops=0)
    with pytest.raises(ValueError, match="per_target must be a positive integer"):
        rss_population_evaluation(evaluator, estimator, per_target=0)


def test_cli_evaluates_the_population_by_the_rss_protocol(record, capsys):
    run = record.config.out
    argv = ["evaluate", run, "--population", "1", "--protocol", "rss", "--targets-mflops", "4", "2"]
    assert main([*argv, "--tolerance-mflops", "0.4"]) == 0
    assert "wrote" in capsys.readouterr().out
    saved = json.loads(open(f"{run}/population.json").read())
    assert saved["meta"]["protocol"].startswith("rss:") and saved["meta"]["tolerance"] == "±0.4 MFLOPs"
    (points,) = saved["runs"].values()
    assert [p["target_mflops"] for p in points] == [2.0, 4.0] and all(p["n"] == 1 for p in points)
    assert "(rss protocol)" in open(f"{run}/population.md").read()
    assert main([*argv, "--band", "0.1"]) == 2
    assert "band does not apply to protocol 'rss'" in capsys.readouterr().err
    assert main(["evaluate", run, "--population", "1", "--tolerance-mflops", "0.4"]) == 2
    assert "tolerance_mflops does not apply to protocol 'band'" in capsys.readouterr().err
    assert main(["evaluate", run, "--protocol", "rss"]) == 2
    assert "--protocol needs --population N" in capsys.readouterr().err
