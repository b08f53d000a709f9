"""Search for the best subnet under a budget: evolution (OFA's EvolutionFinder) and random search.

TOFA eq. 5: a* = argmax_a Acc_val(a) subject to M(a) ≤ B, with M a cost metric (FLOPs, params,
latency). Both searches work on the integer codes of ``space.encode`` and treat the fitness as a
black box over a batch of codes (``SubnetEvaluator.fitness`` for validation accuracy), so they can be
tested on synthetic fitness functions without any training.

**Genome.** A code row holds ``-1`` for the layers beyond a stage's active depth, and in a
stage-granularity space repeats one kernel and one expand index over a stage's layers. The searches
therefore vary a *genome*: one gene per independent choice (resolution, stem, head, and per stage
width, depth and the kernel/expand of every layer — or of the stage), each with its list of allowed
choice indices. Inactive layers keep a gene value too, so a depth mutation that activates a layer
gives it a value (OFA keeps the kernel/expand lists of all layers in its arch dict for the same
reason). Genome → code is a broadcast and a depth mask; code → genome fills inactive layers at random.

**Evolution** (Cai et al., OFA, ``EvolutionFinder``): a population of ``population`` distinct subnets
that fit the budget; each generation keeps the best ``parent_ratio`` of it as parents, adds
``mutation_ratio·population`` mutants of random parents (each gene resampled with probability
``mutate_prob``) and fills the rest with crossovers of two random parents (each gene from either;
more mutants when converged parents have too few unseen crossovers).
Candidates are generated in vectorised batches, scored against the budget with one metric call per
batch, and kept if they fit and are new — never evaluated before in this search — so each
generation spends its evaluations on unseen subnets and the evaluation count is known in advance.

**Random search**: the same number of distinct subnets drawn uniformly among those that fit (for the
FLOPs metric exactly uniform by :meth:`Estimator.sample`; for other metrics uniform over the space
and filtered), best fitness wins.

Ties in fitness (accuracy on a few hundred validation images ties often) go to the larger metric —
more capacity within the budget, as in :meth:`SelectionIndex.select` — then to the earlier found.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from ..estimator import Estimator
from ..estimator.layout import allowed_expand_indices
from ..spaces import Arch, SearchSpace

Fitness = Callable[[np.ndarray], np.ndarray]
Metric = Callable[[np.ndarray], np.ndarray]
METRICS = ("flops", "params", "latency")
# Candidate generation draws this many times the number still needed (plus a constant) per round,
# for at most MAX_ROUNDS rounds; a search in a nearly exhausted budget then continues with fewer.
OVERSAMPLE = 3
MAX_ROUNDS = 16


@dataclass
class SearchResult:
    """The outcome of one search.

    Attributes:
        method: ``"evolution"`` or ``"random"``.
        arch: the best subnet found.
        fitness: its fitness (e.g. validation accuracy).
        metric_value: its cost under the search's metric.
        budget: the budget searched under.
        evaluations: distinct subnets whose fitness was computed.
        history: best fitness after the initial population and after each generation
            (random search: a single entry).
        codes: int32 (evaluations, code_length), every subnet evaluated, in evaluation order.
        scores: float64 (evaluations,), their fitness.
    """

    method: str
    arch: Arch
    fitness: float
    metric_value: float
    budget: float
    evaluations: int
    history: list[float] = field(default_factory=list)
    codes: np.ndarray | None = field(default=None, repr=False)
    scores: np.ndarray | None = field(default=None, repr=False)


class Genome:
    """The gene view of a space's codes (module docstring): genes, their code columns and choices.

    Shapes: genomes are int64 (n, num_genes); codes are int32 (n, space.code_length).
    """

    def __init__(self, space: SearchSpace):
        self.space = space
        columns: list[list[int]] = [[0], [1], [2]]
        allowed: list[list[int]] = [
            list(range(len(space.resolutions))),
            list(range(len(space.stem.widths))),
            list(range(len(space.head.widths))),
        ]
        self._depth_genes: list[tuple[int, int, np.ndarray]] = []  # (gene, code offset, depth values)
        offset = 3
        for stage in space.stages:
            dmax = stage.max_depth
            columns += [[offset], [offset + 1]]
            allowed += [list(range(len(stage.widths))), list(range(len(stage.depths)))]
            self._depth_genes.append((len(columns) - 1, offset, np.array(stage.depths)))
            kernels, expands = offset + 2, offset + 2 + dmax
            if space.granularity == "stage":
                columns += [list(range(kernels, kernels + dmax)), list(range(expands, expands + dmax))]
                allowed += [list(range(len(stage.kernels))), list(range(len(stage.expands)))]
            else:
                for j in range(dmax):
                    columns.append([kernels + j])
                    allowed.append(list(range(len(stage.kernels))))
                for j in range(dmax):
                    columns.append([expands + j])
                    allowed.append(allowed_expand_indices(stage, j))
            offset += 2 + 2 * dmax
        self.columns = [np.array(c) for c in columns]
        self.allowed = [np.array(a) for a in allowed]
        self.num_genes = len(columns)

    def random(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` genomes with every gene uniform over its choices."""
        return np.stack([a[rng.integers(len(a), size=n)] for a in self.allowed], axis=1).astype(np.int64)

    def from_codes(self, codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Genomes of ``codes``; genes of inactive layers (code ``-1``) get random allowed values."""
        genomes = np.stack([codes[:, c[0]] for c in self.columns], axis=1).astype(np.int64)
        inactive = genomes < 0
        if inactive.any():
            genomes = np.where(inactive, self.random(len(codes), rng), genomes)
        return genomes

    def to_codes(self, genomes: np.ndarray) -> np.ndarray:
        """Canonical codes: every gene broadcast to its columns, layers beyond the depth set to -1."""
        codes = np.empty((len(genomes), self.space.code_length), dtype=np.int32)
        for gene, cols in enumerate(self.columns):
            codes[:, cols] = genomes[:, gene : gene + 1]
        for (gene, offset, depths), stage in zip(self._depth_genes, self.space.stages):
            dmax = stage.max_depth
            beyond = np.arange(dmax)[None, :] >= depths[genomes[:, gene]][:, None]
            for start in (offset + 2, offset + 2 + dmax):
                block = codes[:, start : start + dmax]
                block[beyond] = -1
        return codes

    def mutate(self, genomes: np.ndarray, prob: float, rng: np.random.Generator) -> np.ndarray:
        """Each gene resampled uniformly over its choices with probability ``prob``."""
        resample = rng.random(genomes.shape) < prob
        return np.where(resample, self.random(len(genomes), rng), genomes)

    @staticmethod
    def crossover(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Each gene from ``a`` or ``b`` with probability 1/2."""
        return np.where(rng.random(a.shape) < 0.5, a, b)


# -- argument checking ----------------------------------------------------------------------------


def resolve_metric(estimator: Estimator, metric: str | Metric) -> tuple[str, Metric]:
    """``(name, codes → values)`` for ``"flops"``, ``"params"``, ``"latency"`` or a callable."""
    if callable(metric):
        return getattr(metric, "__name__", "metric"), metric
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)} or a callable, got {metric!r}")
    return metric, getattr(estimator, metric)


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return int(value)


def _fraction(value: Any, name: str, low: float, high: float, open_low: bool = False) -> float:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")
    return float(value)


def check_budget(estimator: Estimator, metric_name: str, metric: Metric, budget: Any) -> float:
    """``budget`` as a float, or ``ValueError`` naming the smallest cost the space offers."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise ValueError(f"budget must be a number ({metric_name}), got {budget!r}")
    budget = float(budget)
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a positive finite number ({metric_name}), got {budget!r}")
    if metric_name == "flops":
        smallest = float(estimator.flops_range()[0])
    else:
        smallest = float(np.min(metric(estimator.space.encode([estimator.space.min_arch()]))))
    if smallest > budget:
        raise ValueError(
            f"budget {budget:g} is below the smallest subnet's {metric_name} ({smallest:g}): no subnet fits"
        )
    return budget


# -- the searches ---------------------------------------------------------------------------------


class _Search:
    """State shared by both searches: the fitness cache, the metric and the budget filter."""

    def __init__(
        self, fitness: Fitness, estimator: Estimator, budget: float, metric: str | Metric, rng: np.random.Generator
    ):
        self.estimator, self.space = estimator, estimator.space
        self.metric_name, self.metric = resolve_metric(estimator, metric)
        self.budget = check_budget(estimator, self.metric_name, self.metric, budget)
        self.fitness, self.rng = fitness, rng
        self.genome = Genome(self.space)
        self.seen: set[bytes] = set()
        self.codes: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []
        self.costs: list[np.ndarray] = []

    def fresh(self, codes: np.ndarray, costs: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``limit`` rows of ``codes`` that fit the budget and were never evaluated."""
        keep = []
        for i in np.flatnonzero(costs <= self.budget):
            key = codes[i].tobytes()
            if key not in self.seen:
                self.seen.add(key)
                keep.append(i)
                if len(keep) == limit:
                    break
        return codes[keep], costs[keep]

    def collect(self, n: int, propose: Callable[[int], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``n`` new in-budget codes from ``propose(k)`` (k candidate codes per round)."""
        got_codes, got_costs, needed = [], [], n
        for _ in range(MAX_ROUNDS):
            if needed == 0:
                break
            codes = propose(OVERSAMPLE * needed + 8)
            codes, costs = self.fresh(codes, np.asarray(self.metric(codes), dtype=np.float64), needed)
            got_codes.append(codes)
            got_costs.append(costs)
            needed -= len(codes)
        if not got_codes:
            return np.zeros((0, self.space.code_length), np.int32), np.zeros(0)
        return np.concatenate(got_codes), np.concatenate(got_costs)

    def evaluate(self, codes: np.ndarray, costs: np.ndarray) -> np.ndarray:
        scores = np.asarray(self.fitness(codes), dtype=np.float64) if len(codes) else np.zeros(0)
        if scores.shape != (len(codes),):
            raise ValueError(f"fitness must return one score per code row: shape ({len(codes)},), got {scores.shape}")
        self.codes.append(codes)
        self.scores.append(scores)
        self.costs.append(costs)
        return scores

    def uniform(self, k: int) -> np.ndarray:
        """``k`` codes uniform among in-budget subnets (FLOPs) or over the whole space (others)."""
        high = self.budget if self.metric_name == "flops" else None
        return self.estimator.sample(k, None, high, self.rng, as_codes=True)

    def result(self, method: str, history: list[float]) -> SearchResult:
        codes, scores, costs = (np.concatenate(x) for x in (self.codes, self.scores, self.costs))
        best = int(ranking(scores, costs)[0])
        return SearchResult(
            method=method,
            arch=self.space.decode(codes[best : best + 1])[0],
            fitness=float(scores[best]),
            metric_value=float(costs[best]),
            budget=self.budget,
            evaluations=len(codes),
            history=history,
            codes=codes,
            scores=scores,
        )


def ranking(scores: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Indices best first: fitness descending, then cost descending, then first found."""
    return np.lexsort((np.arange(len(scores)), -costs, -scores))


def _mutants(genome: Genome, parents: np.ndarray, prob: float, rng: np.random.Generator, k: int) -> np.ndarray:
    """``k`` codes, each a mutation of a uniformly chosen parent genome."""
    picks = parents[rng.integers(len(parents), size=k)]
    return genome.to_codes(genome.mutate(picks, prob, rng))


def _children(genome: Genome, parents: np.ndarray, rng: np.random.Generator, k: int) -> np.ndarray:
    """``k`` codes, each a crossover of two uniformly chosen parent genomes."""
    a = parents[rng.integers(len(parents), size=k)]
    b = parents[rng.integers(len(parents), size=k)]
    return genome.to_codes(genome.crossover(a, b, rng))


def evolutionary_search(
    fitness: Fitness,
    estimator: Estimator,
    budget: float,
    *,
    metric: str | Metric = "flops",
    population: int = 100,
    generations: int = 20,
    parent_ratio: float = 0.25,
    mutation_ratio: float = 0.5,
    mutate_prob: float = 0.1,
    seed: int | np.random.Generator = 0,
    progress: bool = False,
) -> SearchResult:
    """Maximise ``fitness`` subject to ``metric(a) ≤ budget`` by evolution (module docstring).

    Args:
        fitness: int codes (n, code_length) → float scores (n,), higher is better; called once per
            generation on the new subnets only.
        estimator: scores the metric and samples the initial population.
        budget: the cost limit, in the metric's unit (FLOPs, parameters, milliseconds).
        metric: ``"flops"``, ``"params"``, ``"latency"`` (the estimator's methods) or a callable
            codes → costs.
        population: subnets per generation (OFA: 100).
        generations: generations after the initial population (OFA: 500).
        parent_ratio: share of the population kept as parents (OFA: 0.25).
        mutation_ratio: share of the population made by mutation (OFA: 0.5); crossover fills the rest.
        mutate_prob: per-gene resampling probability of a mutation (OFA: 0.1).
        seed: int or ``np.random.Generator``; the search is deterministic given it.
        progress: show a progress bar over generations.

    Returns a :class:`SearchResult`; at most ``population + generations·(population − parents)``
    evaluations, fewer when the budget leaves too few unseen subnets.
    """
    population = _positive_int(population, "population", 2)
    generations = _positive_int(generations, "generations", 0)
    parent_ratio = _fraction(parent_ratio, "parent_ratio", 0.0, 1.0, open_low=True)
    mutation_ratio = _fraction(mutation_ratio, "mutation_ratio", 0.0, 1.0)
    mutate_prob = _fraction(mutate_prob, "mutate_prob", 0.0, 1.0)
    if parent_ratio + mutation_ratio > 1:
        raise ValueError(f"parent_ratio + mutation_ratio must not exceed 1, got {parent_ratio} + {mutation_ratio}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    search = _Search(fitness, estimator, budget, metric, rng)
    genome = search.genome
    parents_n = max(1, round(population * parent_ratio))
    mutants_n = round(population * mutation_ratio)

    codes, costs = search.collect(population, search.uniform)
    if len(codes) == 0:
        raise ValueError(f"no subnet fits {search.metric_name} ≤ {search.budget:g}")
    scores = search.evaluate(codes, costs)
    history = [float(scores.max())]

    from tqdm import tqdm

    for _ in tqdm(range(generations), desc="evolution", disable=not progress, leave=False):
        order = ranking(scores, costs)[:parents_n]
        parents, p_costs, p_scores = codes[order], costs[order], scores[order]
        parent_genomes = genome.from_codes(parents, rng)
        need_mutants, need_children = mutants_n, population - len(parents) - mutants_n

        m_codes, m_costs = search.collect(need_mutants, partial(_mutants, genome, parent_genomes, mutate_prob, rng))
        c_codes, c_costs = search.collect(need_children, partial(_children, genome, parent_genomes, rng))
        if len(m_codes) + len(c_codes) < need_mutants + need_children:
            # Converged parents have few unseen crossovers (two parents differing in g genes have
            # 2^g children); mutation still explores, so it makes up the shortfall.
            short = need_mutants + need_children - len(m_codes) - len(c_codes)
            extra_codes, extra_costs = search.collect(
                short, partial(_mutants, genome, parent_genomes, mutate_prob, rng)
            )
            m_codes, m_costs = np.concatenate([m_codes, extra_codes]), np.concatenate([m_costs, extra_costs])
        new_codes, new_costs = np.concatenate([m_codes, c_codes]), np.concatenate([m_costs, c_costs])
        new_scores = search.evaluate(new_codes, new_costs)
        codes = np.concatenate([parents, new_codes])
        costs = np.concatenate([p_costs, new_costs])
        scores = np.concatenate([p_scores, new_scores])
        history.append(max(history[-1], float(new_scores.max(initial=-np.inf))))
    return search.result("evolution", history)


def random_search(
    fitness: Fitness,
    estimator: Estimator,
    budget: float,
    evaluations: int,
    *,
    metric: str | Metric = "flops",
    seed: int | np.random.Generator = 0,
) -> SearchResult:
    """Maximise ``fitness`` over ``evaluations`` distinct subnets drawn uniformly among those with
    ``metric ≤ budget`` (the baseline of :func:`evolutionary_search`; arguments as there).

    Fewer evaluations are made only when the budget holds fewer distinct subnets than asked for.
    """
    evaluations = _positive_int(evaluations, "evaluations")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    search = _Search(fitness, estimator, budget, metric, rng)
    codes, costs = search.collect(evaluations, search.uniform)
    if len(codes) == 0:
        raise ValueError(f"no subnet fits {search.metric_name} ≤ {search.budget:g}")
    scores = search.evaluate(codes, costs)
    return search.result("random", [float(scores.max())])
