"""Elastic depthwise convolution module: the supernet's seam to the fast op.

Everything compute-heavy goes through :func:`tofa_fast.ops.elastic_dwconv2d`, so replacing or
optimising that one op speeds up every depthwise layer of every supernet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..ops import active_filter_reference, elastic_dwconv2d


class ElasticDepthwiseConv2d(nn.Module):
    """Depthwise K×K convolution (K = max kernel) serving every kernel size of ``kernel_sizes``.

    With ``transform=True`` it owns OFA's kernel-transformation matrices, one per consecutive pair of
    the sorted kernel sizes (``transform_7to5`` of shape 25×25, ``transform_5to3`` of 9×9, …),
    initialised to the identity (SPEC §3).

    Shapes: weight (max_channels, 1, K, K); x (N, C ≤ max_channels, H, W) → (N, C, H', W').
    """

    def __init__(self, max_channels: int, kernel_sizes: Sequence[int], stride: int = 1, transform: bool = False):
        super().__init__()
        self.kernel_sizes = tuple(sorted(kernel_sizes))
        self.max_channels, self.stride = max_channels, stride
        big = self.kernel_sizes[-1]
        self.weight = nn.Parameter(torch.empty(max_channels, 1, big, big))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.transform_names: dict[tuple[int, int], str] = {}
        if transform:
            for small, large in zip(self.kernel_sizes[:-1], self.kernel_sizes[1:]):
                name = f"transform_{large}to{small}"
                self.register_parameter(name, nn.Parameter(torch.eye(small * small)))
                self.transform_names[(large, small)] = name

    @property
    def max_kernel_size(self) -> int:
        return self.kernel_sizes[-1]

    def transforms_for(self, kernel_size: int) -> list[torch.Tensor] | None:
        """The chain of matrices from the largest kernel down to ``kernel_size`` (None without)."""
        if not self.transform_names or kernel_size == self.max_kernel_size:
            return None
        chain = []
        for large, small in zip(reversed(self.kernel_sizes[1:]), reversed(self.kernel_sizes[:-1])):
            if large <= kernel_size:
                break
            chain.append(getattr(self, self.transform_names[(large, small)]))
        return chain

    def forward(self, x: torch.Tensor, kernel_size: int) -> torch.Tensor:
        return elastic_dwconv2d(x, self.weight, kernel_size, self.stride, self.transforms_for(kernel_size))

    @torch.no_grad()
    def active_filter(self, channels: int, kernel_size: int) -> torch.Tensor:
        """The (channels, 1, k, k) filter a subnet uses, transforms baked in."""
        return active_filter_reference(self.weight, kernel_size, self.transforms_for(kernel_size))[:channels]

    def extract(self, channels: int, kernel_size: int) -> nn.Conv2d:
        conv = nn.Conv2d(channels, channels, kernel_size, self.stride, kernel_size // 2, groups=channels, bias=False)
        with torch.no_grad():
            conv.weight.copy_(self.active_filter(channels, kernel_size))
        return conv

    def extra_repr(self) -> str:
        return (
            f"max_channels={self.max_channels}, kernel_sizes={list(self.kernel_sizes)}, stride={self.stride}, "
            f"transform={bool(self.transform_names)}"
        )
