"""Evolutionary and random search on synthetic fitness functions of the codes (no training)."""

from __future__ import annotations

import numpy as np
import pytest

import tofa_fast
from tofa_fast.estimator import Estimator
from tofa_fast.search import Genome, evolutionary_search, random_search


@pytest.fixture(scope="module")
def estimator():
    return Estimator("digits", num_classes=10)


def _distance_fitness(target: np.ndarray, bonus: Estimator | None = None):
    """Minus the Hamming distance to ``target``'s code (0 at the target), plus, with ``bonus``, a
    FLOPs term below 1 that rewards filling the budget."""

    def fitness(codes: np.ndarray) -> np.ndarray:
        score = -(codes != target).sum(1).astype(np.float64)
        if bonus is not None:
            score += bonus.flops(codes) / bonus.flops_range()[1]
        return score

    return fitness


@pytest.mark.parametrize("space_name", ["digits", "tofa", "ofa_mbv3"])
def test_genome_round_trips_codes_and_builds_valid_archs(space_name):
    space = tofa_fast.spaces.get(space_name)
    est = Estimator(space, num_classes=10)
    genome, rng = Genome(space), np.random.default_rng(0)
    codes = est.sample(100, seed=1, as_codes=True)
    assert np.array_equal(genome.to_codes(genome.from_codes(codes, rng)), codes)
    for genomes in (genome.random(50, rng), genome.mutate(genome.from_codes(codes[:50], rng), 0.5, rng)):
        children = genome.to_codes(genomes)
        assert np.array_equal(space.encode(space.decode(children)), children)  # canonical and valid


def test_budget_is_respected_by_every_evaluated_subnet(estimator):
    low, high = estimator.flops_range()
    target = estimator.sample(1, seed=3, as_codes=True)[0]
    for budget in (low, low * 1.2, low + 0.3 * (high - low)):
        for result in (
            evolutionary_search(_distance_fitness(target, estimator), estimator, budget, population=16, generations=4),
            random_search(_distance_fitness(target, estimator), estimator, budget, 40),
        ):
            assert result.metric_value <= budget
            assert (estimator.flops(result.codes) <= budget).all()
            assert len({c.tobytes() for c in result.codes}) == result.evaluations == len(result.scores)


def test_evolution_beats_random_search_on_average(estimator):
    low, high = estimator.flops_range()
    budget = low + 0.4 * (high - low)
    evo, rnd = [], []
    for seed in range(5):
        target = estimator.sample(1, None, budget, seed=100 + seed, as_codes=True)[0]
        fitness = _distance_fitness(target, estimator)
        e = evolutionary_search(fitness, estimator, budget, population=24, generations=8, seed=seed)
        r = random_search(fitness, estimator, budget, e.evaluations, seed=seed)
        assert r.evaluations == e.evaluations
        evo.append(e.fitness)
        rnd.append(r.fitness)
    assert np.mean(evo) > np.mean(rnd)


def test_evolution_finds_the_optimum_of_an_easy_fitness(estimator):
    target = estimator.sample(1, seed=5, as_codes=True)[0]
    result = evolutionary_search(
        _distance_fitness(target), estimator, estimator.flops_range()[1], population=40, generations=25, seed=0
    )
    assert result.fitness == 0 and np.array_equal(estimator.space.encode([result.arch])[0], target)
    assert result.history == sorted(result.history) and len(result.history) == 26


def test_searches_are_deterministic_for_a_seed(estimator):
    target = estimator.sample(1, seed=7, as_codes=True)[0]
    budget = float(np.mean(estimator.flops_range()))
    runs = [
        evolutionary_search(_distance_fitness(target), estimator, budget, population=12, generations=3, seed=s)
        for s in (4, 4, 5)
    ]
    assert np.array_equal(runs[0].codes, runs[1].codes) and runs[0].arch == runs[1].arch
    assert not np.array_equal(runs[0].codes, runs[2].codes)
    a, b = (random_search(_distance_fitness(target), estimator, budget, 30, seed=9) for _ in range(2))
    assert np.array_equal(a.codes, b.codes)


def test_fitness_is_called_once_per_generation_on_new_subnets_only(estimator):
    calls = []

    def fitness(codes):
        calls.append(len(codes))
        return codes.sum(1).astype(np.float64)

    result = evolutionary_search(fitness, estimator, estimator.flops_range()[1], population=10, generations=3)
    assert len(calls) == 4 and sum(calls) == result.evaluations
    # 10 initial, then 10 − 2 parents new per generation (the space is large enough to fill them)
    assert calls == [10, 8, 8, 8]


def test_other_metrics_and_callables(estimator):
    space = estimator.space
    params = estimator.params(space.encode([space.min_arch(), space.max_arch()]))
    budget = float(params[0] + 0.3 * (params[1] - params[0]))
    result = evolutionary_search(
        lambda c: c.sum(1).astype(float), estimator, budget, metric="params", population=12, generations=2
    )
    assert (estimator.params(result.codes) <= budget).all() and result.metric_value <= budget
    doubled = random_search(lambda c: c.sum(1).astype(float), estimator, 2 * budget, 20, metric=estimator.params)
    assert (estimator.params(doubled.codes) <= 2 * budget).all()


def test_bad_arguments_name_the_argument(estimator):
    low, high = estimator.flops_range()

    def fit(codes):
        return np.zeros(len(codes))

    with pytest.raises(ValueError, match="below the smallest subnet's flops"):
        evolutionary_search(fit, estimator, low - 1)
    with pytest.raises(ValueError, match="budget must be a positive finite number"):
        random_search(fit, estimator, float("nan"), 10)
    with pytest.raises(ValueError, match="budget must be a number"):
        random_search(fit, estimator, "big", 10)
    with pytest.raises(ValueError, match="population must be an integer ≥ 2"):
        evolutionary_search(fit, estimator, high, population=1)
    with pytest.raises(ValueError, match="generations must be an integer ≥ 0"):
        evolutionary_search(fit, estimator, high, generations=-1)
    with pytest.raises(ValueError, match="parent_ratio must be in"):
        evolutionary_search(fit, estimator, high, parent_ratio=0)
    with pytest.raises(ValueError, match="mutate_prob must be in"):
        evolutionary_search(fit, estimator, high, mutate_prob=1.5)
    with pytest.raises(ValueError, match="parent_ratio \\+ mutation_ratio must not exceed 1"):
        evolutionary_search(fit, estimator, high, parent_ratio=0.6, mutation_ratio=0.6)
    with pytest.raises(ValueError, match="evaluations must be an integer ≥ 1"):
        random_search(fit, estimator, high, 0)
    with pytest.raises(ValueError, match="metric must be one of"):
        random_search(fit, estimator, high, 5, metric="energy")
    with pytest.raises(ValueError, match="fitness must return one score per code row"):
        random_search(lambda c: np.zeros(1), estimator, high, 5)
