"""The RSS paper's population protocol, sampling side: per-layer uniform draws (chi-square against the
enumerated distribution of tiny spaces), rejection into the tolerance, width locks, defaults, errors.
Measuring the draws on a trained run, and the CLI, are in tests/test_search_population.py."""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest
from scipy.stats import chisquare

from tofa_fast import spaces
from tofa_fast.estimator import Estimator
from tofa_fast.search import (
    RSS_PAPER_TARGETS_MFLOPS,
    per_layer_uniform_codes,
    rss_targets_mflops,
    rss_tolerance_mflops,
    sample_near_target,
)
from tofa_fast.search.rss_protocol import expand_locks
from tofa_fast.spaces import HeadSpec, SearchSpace, StageSpec, StemSpec


def tiny_space(granularity: str) -> SearchSpace:
    """Enumerable (240 / 96 subnets) with depth choices, an elastic width feeding the next stage, and
    in the layer-granularity one, per-layer expand choices (the first layer {2, 3}, the second {3, 4})."""
    narrowed = {"layer_expands": ((2, 3), (3, 4))} if granularity == "layer" else {}
    return SearchSpace(
        name=f"tiny_{granularity}",
        resolutions=(16,),
        stem=StemSpec((8,), stride=2),
        stages=(
            StageSpec((8, 16), (1, 2), (3, 5), (2, 3, 4), stride=1, act="relu", **narrowed),
            StageSpec((16,), (1, 2), (3,), (2, 4), stride=2, se=True, act="hswish"),
        ),
        head=HeadSpec((32,), expand=2),
        granularity=granularity,
    )


def enumerated(space: SearchSpace, expand: str) -> tuple[np.ndarray, np.ndarray]:
    """Every subnet of ``space`` that the lock ``expand`` allows, as codes (n, code_length), with its
    probability under the per-layer uniform draw (n,): the product of 1/(number of choices) over
    every choice drawn; a locked expand ratio is not drawn."""
    per_stage = []
    for stage in space.stages:
        options = []
        for width, depth in product(stage.widths, stage.depths):
            p = 1 / (len(stage.widths) * len(stage.depths))
            if space.granularity == "stage":
                layers = [((k,) * depth, (e,) * depth) for k, e in product(stage.kernels, stage.expands)]
                drawn = [(stage.kernels, stage.expands)]
            else:
                choices = [stage.expand_choices(j) for j in range(depth)]
                layers = [(ks, es) for ks in product(stage.kernels, repeat=depth) for es in product(*choices)]
                drawn = [(stage.kernels, c) for c in choices]
            for ks, es in layers:
                lock = {"min": [min(c) for _, c in drawn], "max": [max(c) for _, c in drawn]}.get(expand)
                if lock is not None and list(es[: len(drawn)]) != lock:
                    continue
                q = p * math.prod(1 / len(k) * (1 if lock else 1 / len(c)) for k, c in drawn)
                options.append(({"width": width, "depth": depth, "kernel": list(ks), "expand": list(es)}, q))
        per_stage.append(options)
    archs, probs = [], []
    for stages in product(*per_stage):
        d = {"resolution": 16, "stem": 8, "head": 32, "stages": [s for s, _ in stages]}
        archs.append(space.arch_from_dict(d))
        probs.append(math.prod(q for _, q in stages))
    return space.encode(archs), np.asarray(probs)


@pytest.mark.parametrize("granularity", ["layer", "stage"])
@pytest.mark.parametrize("expand", ["free", "min", "max"])
def test_draws_follow_the_per_layer_uniform_distribution_conditioned_on_the_range(granularity, expand):
    space = tiny_space(granularity)
    estimator = Estimator(space, num_classes=10)
    codes, probs = enumerated(space, expand)
    assert probs.sum() == pytest.approx(1.0)
    flops = estimator.flops(codes)
    # A range around the median that holds about half the probability, and both its ends.
    order = np.argsort(flops)
    median = flops[order][np.searchsorted(np.cumsum(probs[order]), 0.5)]
    tolerance = float(np.quantile(np.abs(flops - median), 0.5)) + 1
    inside = np.abs(flops - median) <= tolerance
    assert 0 < inside.sum() < len(flops)
    n = 4000
    draws = sample_near_target(estimator, n, median / 1e6, tolerance / 1e6, np.random.default_rng(7), expand=expand)
    assert draws.shape == (n, space.code_length) and draws.dtype == np.int32
    index = {row.tobytes(): i for i, row in enumerate(codes)}
    hits = np.bincount([index[row.tobytes()] for row in draws], minlength=len(codes))  # KeyError: not enumerated
    assert hits[~inside].sum() == 0
    expected = n * probs[inside] / probs[inside].sum()
    assert chisquare(hits[inside], expected).pvalue > 1e-4, (hits[inside], expected)


@pytest.mark.parametrize("name", ["rss", "digits", "tofa"])
def test_codes_are_valid_and_locks_fix_every_active_expand(name):
    space = spaces.get(name)
    rng = np.random.default_rng(0)
    for expand in ("free", "min", "max"):
        codes = per_layer_uniform_codes(space, 64, rng, expand)
        archs = space.decode(codes)  # validates -1 beyond the depth, one value per stage-granularity stage
        expands = [(e, st) for a in archs for sa, st in zip(a.stages, space.stages) for e in sa.expand]
        if expand == "min":
            assert all(e == min(st.expands) for e, st in expands)
        elif expand == "max":
            assert all(e == max(st.expands) for e, st in expands)
        else:
            assert len({e for e, st in expands}) > 1
    again = per_layer_uniform_codes(space, 64, np.random.default_rng(0), "free")
    assert np.array_equal(again, per_layer_uniform_codes(space, 64, np.random.default_rng(0), "free"))


def test_rss_defaults_are_the_paper_targets_inside_the_range_and_reachable_with_the_locks():
    estimator = Estimator("rss", num_classes=10)
    low, high = (v / 1e6 for v in estimator.flops_range())
    targets, tolerance = rss_targets_mflops(estimator), rss_tolerance_mflops(estimator)
    assert targets == list(RSS_PAPER_TARGETS_MFLOPS) == [4, 6, 8, 10, 12, 14] and tolerance == 0.5
    # Estimator.flops counts multiply-adds (OFA's MFLOPs): the paper's targets lie in the range.
    assert low - tolerance <= 4 and 14 <= high and 2 * low > 4 + tolerance
    for target, lock, seed in zip(targets, expand_locks(6), range(6)):
        codes = sample_near_target(estimator, 5, target, tolerance, np.random.default_rng(seed), expand=lock)
        assert np.all(np.abs(estimator.flops(codes) / 1e6 - target) <= tolerance)
    assert expand_locks(6) == ["min", "free", "free", "free", "free", "max"]
    assert expand_locks(1) == ["free"] and expand_locks(3, lock_extremes=False) == ["free"] * 3


def test_other_spaces_get_six_targets_from_the_smallest_subnet_in_sixths_of_the_range():
    estimator = Estimator("digits", num_classes=10)
    low, high = (v / 1e6 for v in estimator.flops_range())
    targets = rss_targets_mflops(estimator)
    assert len(targets) == 6 and targets[0] == pytest.approx(low) and targets[-1] < high
    assert np.allclose(np.diff(targets), (high - low) / 6)
    assert rss_tolerance_mflops(estimator) == pytest.approx((high - low) / 24)


def test_sampling_is_deterministic_and_an_unreachable_target_names_target_tolerance_and_draws():
    estimator = Estimator(tiny_space("layer"), num_classes=10)
    low, high = (v / 1e6 for v in estimator.flops_range())
    mid = (low + high) / 2
    a = sample_near_target(estimator, 50, mid, (high - low) / 8, np.random.default_rng(3))
    b = sample_near_target(estimator, 50, mid, (high - low) / 8, np.random.default_rng(3))
    assert np.array_equal(a, b)
    # The largest subnet is out of reach with every expand ratio at its minimum.
    with pytest.raises(ValueError, match=r"only 0 of 2 subnets within ±1e-06 MFLOPs of the target .* after 3000 "):
        sample_near_target(estimator, 2, high, 1e-6, np.random.default_rng(0), expand="min", max_draws=3000)
    assert sample_near_target(estimator, 0, mid, 0.1, np.random.default_rng(0)).shape == (0, a.shape[1])
    with pytest.raises(ValueError, match="max_draws must be a positive integer"):
        sample_near_target(estimator, 1, mid, 0.1, np.random.default_rng(0), max_draws=0)
    with pytest.raises(ValueError, match="expand must be one of"):
        per_layer_uniform_codes(estimator.space, 2, np.random.default_rng(0), "widest")
