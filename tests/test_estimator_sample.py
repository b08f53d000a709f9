"""Estimator.sample: uniform among all subnets in a FLOPs band (chi-square on enumerable spaces),
exact range, clear errors for empty bands."""

from __future__ import annotations

from itertools import product

import numpy as np
import pytest
from scipy.stats import chisquare

import tofa_fast
from tofa_fast.estimator import Estimator
from tofa_fast.spaces import Arch, HeadSpec, SearchSpace, StageArch, StageSpec, StemSpec

# Per-layer expand choices (StageSpec.layer_expands, used by torchvision conversions), when the
# spaces module has them.
LAYER_EXPANDS = "layer_expands" in StageSpec.__dataclass_fields__


def tiny_space(kind: str) -> SearchSpace:
    """Small enough to enumerate (12 800 / 2 048 / 5 408 subnets), with every feature the DP must
    carry: elastic widths feeding the next stage, two resolutions, depth choices, SE, two head
    widths; ``narrowed``: layer granularity with per-layer expand choices."""
    narrowed = {"layer_expands": ((2, 3), (3, 4))} if kind == "narrowed" else {}
    return SearchSpace(
        name=f"tiny_{kind}",
        resolutions=(16, 24),
        stem=StemSpec((8, 16), stride=2),
        stages=(
            StageSpec((8, 16), (1, 2), (3, 5), (2, 3, 4), stride=1, act="relu", **narrowed),
            StageSpec((16, 24), (1, 2), (3, 5), (2, 4), stride=2, se=True, act="hswish"),
        ),
        head=HeadSpec((32, 48), expand=2),
        granularity="stage" if kind == "stage" else "layer",
    )


def expand_choices(stage: StageSpec, layer: int) -> tuple:
    return stage.expand_choices(layer) if LAYER_EXPANDS else stage.expands


def all_archs(space: SearchSpace) -> list[Arch]:
    def stage_choices(stage: StageSpec):
        for width, depth in product(stage.widths, stage.depths):
            if space.granularity == "stage":
                for k, e in product(stage.kernels, stage.expands):
                    yield StageArch(width, depth, (k,) * depth, (e,) * depth)
            else:
                for ks in product(stage.kernels, repeat=depth):
                    for es in product(*(expand_choices(stage, j) for j in range(depth))):
                        yield StageArch(width, depth, ks, es)

    per_stage = [list(stage_choices(st)) for st in space.stages]
    return [
        Arch(r, s, tuple(stages), h)
        for r, s, h in product(space.resolutions, space.stem.widths, space.head.widths)
        for stages in product(*per_stage)
    ]


@pytest.fixture(
    scope="module",
    params=[
        "layer",
        "stage",
        pytest.param("narrowed", marks=pytest.mark.skipif(not LAYER_EXPANDS, reason="no StageSpec.layer_expands")),
    ],
)
def enumerated(request):
    space = tiny_space(request.param)
    archs = all_archs(space)
    assert len(archs) == space.num_archs()
    est = Estimator(space, num_classes=10)
    return est, space.encode(archs)


def band_with(flops: np.ndarray, count: int, start_quantile: float) -> tuple[int, int]:
    """A band [lo, hi] holding about ``count`` subnets, starting near a quantile of the FLOPs."""
    values = np.sort(flops)
    i = int(start_quantile * len(values))
    return int(values[i]), int(values[min(i + count, len(values) - 1)])


@pytest.mark.parametrize(
    ("count", "quantile"),
    [(150, 0.3), (40, 0.7), (1, 0.5)],
    ids=["wide-band-rejection", "narrow-band", "two-values"],
)
def test_samples_are_uniform_over_the_band(enumerated, count, quantile):
    est, codes = enumerated
    flops = est.flops(codes)
    lo, hi = band_with(flops, count, quantile)
    inside = codes[(flops >= lo) & (flops <= hi)]
    draws_per_arch = 120
    n = draws_per_arch * len(inside)
    sampled = est.sample(n, lo, hi, seed=7, as_codes=True)
    assert sampled.shape == (n, est.space.code_length)
    assert ((est.flops(sampled) >= lo) & (est.flops(sampled) <= hi)).all()
    index = {row.tobytes(): i for i, row in enumerate(inside)}
    hits = np.bincount([index[row.tobytes()] for row in sampled], minlength=len(inside))
    assert (hits > 0).all(), "some subnets of the band are never drawn"
    if len(inside) > 1:
        assert chisquare(hits).pvalue > 1e-4, hits


def test_quantised_and_exact_paths_are_both_exercised(enumerated):
    est, codes = enumerated
    sampler = est._band_sampler()
    flops = np.sort(est.flops(codes))
    assert sampler._quantum(int(flops[0]), int(flops[-1])) > 1  # wide band: rejection at the edges
    assert sampler._quantum(int(flops[100]), int(flops[100]) + 1) == 1  # narrow band: exact DP


def test_flops_range_is_exact(enumerated):
    est, codes = enumerated
    flops = est.flops(codes)
    assert est.flops_range() == (int(flops.min()), int(flops.max()))


def test_unbounded_sample_covers_the_space_uniformly(enumerated):
    est, codes = enumerated
    sampled = est.sample(20 * len(codes), seed=3, as_codes=True)
    index = {row.tobytes(): i for i, row in enumerate(codes)}
    hits = np.bincount([index[row.tobytes()] for row in sampled], minlength=len(codes))
    assert chisquare(hits).pvalue > 1e-4


def test_same_seed_same_subnets():
    est = Estimator("digits", 10)
    a = est.sample(50, 3e6, 5e6, seed=11)
    assert a == est.sample(50, 3e6, 5e6, seed=11)
    assert a != est.sample(50, 3e6, 5e6, seed=12)
    assert all(isinstance(x, Arch) for x in a)


@pytest.mark.parametrize("preset", ["tofa", "ofa_mbv3", "rss", "digits"])
def test_presets_sample_inside_narrow_bands(preset):
    est = Estimator(preset)
    low, high = est.flops_range()
    for target in np.linspace(low, high, 5)[1:-1]:
        lo, hi = target * 0.995, target * 1.005
        codes = est.sample(300, lo, hi, seed=int(target), as_codes=True)
        flops = est.flops(codes)
        assert (flops >= lo).all() and (flops <= hi).all()
        assert len(np.unique(codes, axis=0)) > 250


def test_tofa_space_respects_the_papers_200_to_2500_mflops():
    low, high = Estimator("tofa").flops_range()
    assert 200e6 < low and high < 2500e6


def test_empty_band_names_the_space_range(enumerated):
    est, codes = enumerated
    low, high = est.flops_range()
    with pytest.raises(ValueError, match=rf"spans \[{low}, {high}\] FLOPs"):
        est.sample(5, high + 1, high + 1000)
    with pytest.raises(ValueError, match=rf"spans \[{low}, {high}\] FLOPs"):
        est.sample(5, 0, low - 1)
    # A band inside the range that falls between two consecutive FLOPs values.
    values = np.unique(est.flops(codes))
    gap = int(np.argmax(np.diff(values)))
    with pytest.raises(ValueError, match="no subnet of space 'tiny_"):
        est.sample(5, values[gap] + 1, values[gap + 1] - 1)


def test_bad_sample_arguments():
    est = Estimator("digits", 10)
    with pytest.raises(ValueError, match="must not exceed"):
        est.sample(3, 5e6, 4e6)
    with pytest.raises(ValueError, match="non-negative integer"):
        est.sample(-1)
    with pytest.raises(ValueError, match="finite number"):
        est.sample(3, float("nan"), 4e6)
    assert est.sample(0) == []


def test_full_space_sampling_is_fast_for_the_big_presets():
    space = tofa_fast.spaces.get("ofa_mbv3")
    est = Estimator(space)
    codes = est.sample(5000, seed=0, as_codes=True)
    # Uniform over subnets, not over choices: deeper stages hold almost all subnets of ofa_mbv3.
    depth_index = codes[:, [space.code_length - 2 * 4 - 2 + 1]]
    assert (depth_index == 2).mean() > 0.85
