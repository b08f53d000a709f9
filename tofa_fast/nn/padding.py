"""TensorFlow ``SAME`` padding for strided convolutions (``SearchSpace.padding == "tf_same"``).

TensorFlow pads a k×k, stride-s convolution of an n-pixel side by ``p = max((⌈n/s⌉ − 1)·s + k − n, 0)``
in total, ``p // 2`` before and the rest after; PyTorch pads ``k // 2`` on both sides. For odd k the
two agree except at stride 2 on an even side, where TensorFlow pads one pixel less before (and the
output side, ⌈n/s⌉, is the same). Networks trained in TensorFlow (EfficientNet-Lite) need the former.

The supernet keeps its symmetric-padding kernels (the elastic depthwise op pads ``k // 2``) and gets
TensorFlow's result from them (:func:`tf_same_from_symmetric`): one extra zero row (column) before
an even side shifts every window by two pixels — one output step —, so output ``o + 1`` of the
symmetric conv is TensorFlow's output ``o`` (windows ``[2o − p + 1, 2o + p + 1]`` with ``p = k // 2``
for every odd k, so kernel elasticity is unaffected); the first output row (column) is dropped.
Extracted subnets use :class:`TFSamePad2d` + an unpadded ``nn.Conv2d``, the textbook form.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def tf_same_pads(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of one side of ``size`` pixels under TensorFlow's ``SAME`` rule."""
    total = max((-(-size // stride) - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


def tf_same_from_symmetric(
    conv: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, kernel_size: int, stride: int
) -> torch.Tensor:
    """TensorFlow's ``SAME`` convolution of ``x`` (N, C, H, W) computed by ``conv``, a convolution of
    odd ``kernel_size``, stride ``stride`` and symmetric ``k // 2`` padding (module docstring).

    Stride 1 needs nothing (both rules pad ``k // 2``), nor do odd sides or 1×1 kernels (no padding
    either way); an even side at stride 2 gets one zero before it and loses the first output row
    (column).
    """
    if stride == 1 or kernel_size == 1:
        return conv(x)
    if stride != 2:
        raise ValueError(f"tf_same padding is implemented for strides 1 and 2, got stride {stride}")
    top, left = 1 - x.shape[-2] % 2, 1 - x.shape[-1] % 2
    if not (top or left):
        return conv(x)
    return conv(F.pad(x, (left, 0, top, 0)))[..., top:, left:]


class TFSamePad2d(nn.Module):
    """Zero padding of TensorFlow's ``SAME`` rule for a ``kernel_size``×``kernel_size``, ``stride``
    convolution, computed from the input's size (so a subnet runs at any resolution).

    Shapes: x (N, C, H, W) → (N, C, H + pad_h, W + pad_w).
    """

    def __init__(self, kernel_size: int, stride: int):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = tf_same_pads(x.shape[-2], self.kernel_size, self.stride)
        left, right = tf_same_pads(x.shape[-1], self.kernel_size, self.stride)
        return F.pad(x, (left, right, top, bottom))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


def static_conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    bias: bool = False,
    padding: str = "symmetric",
) -> nn.Module:
    """The plain layers of a "same"-padded conv: ``nn.Conv2d`` with padding ``k // 2``, or, for
    ``padding="tf_same"`` at stride > 1, :class:`TFSamePad2d` followed by an unpadded ``nn.Conv2d``."""
    if padding == "tf_same" and stride > 1:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, 0, groups=groups, bias=bias)
        return nn.Sequential(TFSamePad2d(kernel_size, stride), conv)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias)


def conv_of(module: nn.Module) -> nn.Conv2d:
    """The ``nn.Conv2d`` inside what :func:`static_conv2d` built."""
    return module[-1] if isinstance(module, nn.Sequential) else module
