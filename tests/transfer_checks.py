"""Checks every network converted by :mod:`tofa_fast.transfer.mbconv_import` must pass, whatever its
source: the max subnet is the pretrained network, extracted subnets compute what ``set_active``
computes, channel prefixes are importance-sorted, and the estimator / latency profiler describe the
extracted subnets exactly. Imported by the per-source test modules."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import numpy as np
import torch
from conftest import TOLERANCES
from test_estimator_flops import fvcore_flops
from test_transfer_torchvision import rel_err

from tofa_fast.estimator import Estimator, arch_layers
from tofa_fast.estimator.profile import build_layer
from tofa_fast.nn import Supernet
from tofa_fast.spaces import Arch, SearchSpace

RTOL = TOLERANCES[torch.float32][0]


@torch.no_grad()
def max_subnet_error(net: Supernet, oracle: Callable[[torch.Tensor], torch.Tensor], sizes: Iterable[int]) -> float:
    """Largest relative error of the max subnet — supernet and extracted — against ``oracle`` over
    random inputs of each side in ``sizes``; asserts each is within the float32 tolerance."""
    arch = net.space.max_arch()
    net.eval().set_active(arch)
    static = net.extract(arch).eval()
    worst = 0.0
    for size in sizes:
        x = torch.randn(2, 3, size, size)
        expected = oracle(x)
        assert expected.abs().max() > 1e-2, "oracle logits ≈ 0: the comparison would prove nothing"
        errors = [rel_err(net(x), expected), rel_err(static(x), expected)]
        assert max(errors) <= RTOL, (size, errors)
        worst = max(worst, *errors)
    return worst


@torch.no_grad()
def extracted_subnet_error(net: Supernet, count: int, seed: int, odd: bool = True) -> float:
    """Largest relative error of ``extract(arch)`` against ``set_active(arch)`` over the min arch and
    ``count`` random archs, each fed a side of ``arch.resolution + 1`` when ``odd`` (odd sides are
    where padding rules differ); asserts each is within the float32 tolerance."""
    rng = random.Random(seed)
    space = net.space
    archs = [space.min_arch()] + [space.sample(rng) for _ in range(count)]
    worst = 0.0
    net.eval()
    for arch in archs:
        size = arch.resolution + (1 - arch.resolution % 2 if odd else 0)
        x = torch.randn(1, 3, size, size)
        net.set_active(arch)
        expected = net(x)
        assert expected.abs().max() > 1e-3
        err = rel_err(net.extract(arch).eval()(x), expected)
        assert err <= RTOL, str(arch)
        worst = max(worst, err)
    return worst


def _descending(importance: torch.Tensor) -> bool:
    # Sums recomputed after a later permutation of the other dimension may differ in the last bits.
    slack = RTOL * importance.abs().max()
    return bool(torch.all(importance[:-1] >= importance[1:] - slack))


def assert_channels_sorted(net: Supernet) -> None:
    """Middle channels by the projection's L1 norm, elastic stage widths by their readers' L1 norm."""
    for s, stage in enumerate(net.stages):
        for layer in stage:
            if layer.expand_conv is not None:
                assert _descending(layer.project_conv.weight.abs().sum(dim=(0, 2, 3))), f"stage {s} middle channels"
        if len(net.space.stages[s].widths) > 1:
            following = net.stages[s + 1][0].expand_conv if s + 1 < len(net.stages) else net.final_expand_conv
            readers = [layer.expand_conv for layer in stage[1:]] + [following]
            assert _descending(sum(r.weight.abs().sum(dim=(0, 2, 3)) for r in readers)), f"stage {s} widths"


def sample_archs(space: SearchSpace, count: int, seed: int) -> list[Arch]:
    return [space.min_arch(), space.max_arch()] + [space.sample(seed + i) for i in range(count)]


def assert_estimator_matches_extracted(net: Supernet, archs: list[Arch]) -> None:
    """Estimator FLOPs are fvcore's count of the extracted subnet, params its parameter count, and
    the latency profiler builds the very layers ``extract`` does."""
    est = Estimator(net.space, net.num_classes)
    subs = [net.extract(a).eval() for a in archs]
    np.testing.assert_array_equal(est.flops(archs), [fvcore_flops(s, a.resolution) for s, a in zip(subs, archs)])
    np.testing.assert_array_equal(est.params(archs), [sum(p.numel() for p in s.parameters()) for s in subs])
    for sub, arch in zip(subs, archs):
        built = [build_layer(c, net.space) for c in arch_layers(net.space, arch, net.num_classes)]
        assert [repr(m) for m in built] == [repr(m) for m in [sub.stem, *sub.blocks, sub.head]]
