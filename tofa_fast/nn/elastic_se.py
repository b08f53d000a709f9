"""Elastic squeeze-and-excite (MobileNetV3 form): ReLU bottleneck, hard-sigmoid gate.

A block with C active channels uses a bottleneck of ``make_divisible(C // reduction, divisor)``
channels (OFA's ``DynamicSE``), the prefixes of the max reduce/expand 1×1 convolutions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..spaces import make_divisible
from .elastic_conv import ElasticConv2d


class ElasticSqueezeExcite(nn.Module):
    """Shapes: x (N, C ≤ max_channels, H, W) → same shape."""

    def __init__(self, max_channels: int, reduction: int = 4, divisor: int = 8):
        super().__init__()
        self.reduction, self.divisor = reduction, divisor
        max_mid = self.mid_channels(max_channels)
        self.reduce = ElasticConv2d(max_channels, max_mid, 1, bias=True)
        self.expand = ElasticConv2d(max_mid, max_channels, 1, bias=True)

    def mid_channels(self, channels: int) -> int:
        return make_divisible(channels // self.reduction, self.divisor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        y = x.mean((2, 3), keepdim=True)
        y = F.relu(self.reduce(y, self.mid_channels(c)))
        y = F.hardsigmoid(self.expand(y, c))
        return x * y

    def extract(self, channels: int) -> SqueezeExcite:
        mid = self.mid_channels(channels)
        return SqueezeExcite(self.reduce.extract(channels, mid), self.expand.extract(mid, channels))


class SqueezeExcite(nn.Module):
    """Static squeeze-excite of an extracted subnet: plain ``nn.Conv2d`` layers only."""

    def __init__(self, reduce: nn.Conv2d, expand: nn.Conv2d):
        super().__init__()
        self.reduce, self.expand = reduce, expand
        self.act = nn.ReLU()
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.expand(self.act(self.reduce(y))))
