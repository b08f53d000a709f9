"""The tofa preset satisfies the paper's 200–2500 MFLOPs constraint (fvcore on extracted subnets)."""

from __future__ import annotations

import logging

import pytest
import torch

import tofa_fast


def fvcore_mflops(model: torch.nn.Module, resolution: int) -> float:
    from fvcore.nn import FlopCountAnalysis

    logging.getLogger("fvcore").setLevel(logging.ERROR)
    analysis = FlopCountAnalysis(model.eval(), torch.zeros(1, 3, resolution, resolution))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis.total() / 1e6


@pytest.mark.parametrize("num_classes", [10, 1000])
def test_tofa_subnets_lie_between_200_and_2500_mflops(num_classes):
    space = tofa_fast.spaces.get("tofa")
    net = tofa_fast.Supernet(space, num_classes)
    smallest = fvcore_mflops(net.extract(space.min_arch()), min(space.resolutions))
    largest = fvcore_mflops(net.extract(space.max_arch()), max(space.resolutions))
    assert 200 < smallest < 215, smallest
    assert 2400 < largest < 2500, largest
