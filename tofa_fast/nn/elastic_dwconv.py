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
from .padding import conv_of, static_conv2d, tf_same_from_symmetric


class ElasticDepthwiseConv2d(nn.Module):
    """Depthwise K×K convolution (K = max kernel) serving every kernel size of ``kernel_sizes``.

    With ``transform=True`` it owns OFA's kernel-transformation matrices, one per consecutive pair of
    the sorted kernel sizes (``transform_7to5`` of shape 25×25, ``transform_5to3`` of 9×9, …),
    initialised to the identity (SPEC §3). ``padding="tf_same"`` pads strided convolutions the way
    TensorFlow does (:mod:`tofa_fast.nn.padding`).

    Shapes: weight (max_channels, 1, K, K); x (N, C ≤ max_channels, H, W) → (N, C, H', W').
    """

    def __init__(
        self,
        max_channels: int,
        kernel_sizes: Sequence[int],
        stride: int = 1,
        transform: bool = False,
        padding: str = "symmetric",
    ):
        super().__init__()
        self.kernel_sizes = tuple(sorted(kernel_sizes))
        self.max_channels, self.stride, self.padding = max_channels, stride, padding
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
        transforms = self.transforms_for(kernel_size)

        def conv(t: torch.Tensor) -> torch.Tensor:
            return elastic_dwconv2d(t, self.weight, kernel_size, self.stride, transforms)

        return tf_same_from_symmetric(conv, x, kernel_size, self.stride) if self.padding == "tf_same" else conv(x)

    @torch.no_grad()
    def active_filter(self, channels: int, kernel_size: int) -> torch.Tensor:
        """The (channels, 1, k, k) filter a subnet uses, transforms baked in."""
        return active_filter_reference(self.weight, kernel_size, self.transforms_for(kernel_size))[:channels]

    def extract(self, channels: int, kernel_size: int) -> nn.Module:
        """An ``nn.Conv2d`` (after a :class:`~tofa_fast.nn.padding.TFSamePad2d` for strided
        ``tf_same`` convs) holding the active filter."""
        layers = static_conv2d(channels, channels, kernel_size, self.stride, groups=channels, padding=self.padding)
        with torch.no_grad():
            conv_of(layers).weight.copy_(self.active_filter(channels, kernel_size))
        return layers

    def extra_repr(self) -> str:
        extra = f", padding={self.padding}" if self.padding != "symmetric" else ""
        return (
            f"max_channels={self.max_channels}, kernel_sizes={list(self.kernel_sizes)}, stride={self.stride}, "
            f"transform={bool(self.transform_names)}" + extra
        )
