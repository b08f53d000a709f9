"""Elastic dense convolution and linear layers: the first C_out × C_in block of the max weight."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .padding import conv_of, static_conv2d, tf_same_from_symmetric
from .prefix import prefix

#: False sends every 1×1 convolution of a multi-pixel map through F.conv2d (mkldnn on the CPU): the
#: baseline of bench/test_bench_sequential_step.py's interleaved comparison.
POINTWISE_AS_GEMM = True


def pointwise_as_gemm(x: torch.Tensor) -> bool:
    """Whether a 1×1 stride-1 convolution of ``x`` runs as a matrix product on its rows: a
    channels-last CPU tensor (its (N·H·W, C) view is free)."""
    return (
        POINTWISE_AS_GEMM
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
    )


class ElasticConv2d(nn.Module):
    """Dense k×k convolution whose active input/output channels are prefixes of the max weight.

    The input channel count is read from ``x`` (it is the previous layer's active width); the output
    channel count is passed by the caller. Padding is ``kernel_size // 2``, or TensorFlow's ``SAME``
    with ``padding="tf_same"`` (see :mod:`tofa_fast.nn.padding`).

    Shapes: weight (max_out, max_in, k, k); x (N, C_in ≤ max_in, H, W) → (N, C_out, H', W').
    """

    def __init__(
        self,
        max_in: int,
        max_out: int,
        kernel_size: int = 1,
        stride: int = 1,
        bias: bool = False,
        padding: str = "symmetric",
    ):
        super().__init__()
        self.max_in, self.max_out = max_in, max_out
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.weight = nn.Parameter(torch.empty(max_out, max_in, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(max_out)) if bias else None
        # Same initialisation as nn.Conv2d, so a maxnet trained from scratch behaves like a plain net.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, out_channels: int) -> torch.Tensor:
        c_in = x.shape[1]
        bias = prefix(self.bias, out_channels) if self.bias is not None else None
        if self.kernel_size == 1 and x.shape[-2:] == (1, 1):
            # A 1×1 convolution of a 1×1 map (the squeeze-excite gates, a pooled head) is a matrix
            # product: F.linear's GEMM, without the convolution's per-call set-up (mkldnn's costs
            # more than the arithmetic here: ≈ 1.8× on the 2-core CPU, forward + backward).
            y = F.linear(x.flatten(1), self.pointwise_matrix(out_channels, c_in), bias)
            return y[:, :, None, None]
        if self.kernel_size == 1 and self.stride == 1 and pointwise_as_gemm(x):
            # A channels-last map is an (N·H·W, C) row-major matrix, so the 1×1 convolution is one
            # GEMM on a view, forward and backward (F.linear; the packed step's pointwise() is the
            # same). On the 2-core CPU, interleaved round by round against mkldnn's convolution
            # (median per-round ratio; bench/test_bench_sequential_step.py and the A/B before it):
            # 1.00–1.07× the default run's sequential step (five runs), 1.03–1.10× the ofa_mbv3
            # 128 px step (four runs); mkldnn's backward of a 1×1 convolution costs more than the two
            # matrix products. CUDA keeps cuDNN (not measured there).
            n, _, h, w = x.shape
            rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c_in)
            y = F.linear(rows, self.pointwise_matrix(out_channels, c_in), bias)
            return y.view(n, h, w, out_channels).permute(0, 3, 1, 2)
        weight = prefix(self.weight, out_channels, c_in)

        def conv(t: torch.Tensor) -> torch.Tensor:
            return F.conv2d(t, weight, bias, self.stride, self.kernel_size // 2)

        return tf_same_from_symmetric(conv, x, self.kernel_size, self.stride) if self.padding == "tf_same" else conv(x)

    def pointwise_matrix(self, out_channels: int, in_channels: int) -> torch.Tensor:
        """The active (out, in) block of a 1×1 kernel as a matrix: a view of the (max_out, max_in)
        matrix, where indexing the two unit dimensions away would cost the backward two zero-filled
        full-size copies."""
        return prefix(self.weight.flatten(1), out_channels, in_channels)

    def extract(self, in_channels: int, out_channels: int) -> nn.Module:
        """An ``nn.Conv2d`` (preceded by :class:`~tofa_fast.nn.padding.TFSamePad2d` in an
        ``nn.Sequential`` for strided ``tf_same`` convs) with the active weights."""
        layers = static_conv2d(
            in_channels, out_channels, self.kernel_size, self.stride, bias=self.bias is not None, padding=self.padding
        )
        conv = conv_of(layers)
        with torch.no_grad():
            conv.weight.copy_(self.weight[:out_channels, :in_channels])
            if self.bias is not None:
                conv.bias.copy_(self.bias[:out_channels])
        return layers

    def extra_repr(self) -> str:
        extra = f", padding={self.padding}" if self.padding != "symmetric" else ""
        return (
            f"max_in={self.max_in}, max_out={self.max_out}, kernel_size={self.kernel_size}, stride={self.stride}"
            + extra
        )


class ElasticLinear(nn.Module):
    """Linear layer whose input features are a prefix of ``max_in``; outputs are fixed (classes).

    Shapes: weight (out_features, max_in); x (N, C ≤ max_in) → (N, out_features).
    """

    def __init__(self, max_in: int, out_features: int, bias: bool = True):
        super().__init__()
        self.max_in, self.out_features = max_in, out_features
        self.weight = nn.Parameter(torch.empty(out_features, max_in))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(max_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, prefix(self.weight, self.out_features, x.shape[1]), self.bias)

    def extract(self, in_features: int) -> nn.Linear:
        linear = nn.Linear(in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.weight[:, :in_features])
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"max_in={self.max_in}, out_features={self.out_features}"
