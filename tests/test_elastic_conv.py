"""ElasticConv2d against F.conv2d on the active weight prefix, including its matrix-product path.

A 1×1 convolution of a 1×1 map (squeeze-excite gates, a pooled head) runs as ``F.linear``, and so
does a 1×1 stride-1 convolution of a channels-last CPU map (a matrix product on its (N·H·W, C)
rows); every other call as ``F.conv2d``. All must compute the convolution of the prefix weights:
outputs and gradients (input, full weight — zero outside the prefix —, bias) against F.conv2d in
float64, and a channels-last input gives a channels-last output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tofa_fast.nn.elastic_conv import ElasticConv2d
from tofa_fast.nn.padding import tf_same_from_symmetric


@pytest.mark.parametrize(
    "kernel,stride,size,padding,bias",
    [
        (1, 1, 1, "symmetric", True),  # the matrix-product path
        (1, 2, 1, "tf_same", False),  # the same, strided, TF padding, no bias
        (1, 1, 3, "symmetric", True),  # 1×1 kernel on a larger map: rows × weight (channels-last), F.conv2d
        (1, 1, 7, "tf_same", False),  # the same without bias (TF padding: none at 1×1 stride 1)
        (1, 2, 5, "symmetric", True),  # 1×1 strided: F.conv2d
        (3, 1, 1, "symmetric", True),  # 3×3 kernel on a 1×1 map: F.conv2d (padding matters)
        (3, 2, 5, "tf_same", False),
    ],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_matches_conv2d_of_the_prefix(kernel, stride, size, padding, bias, channels_last):
    torch.manual_seed(kernel * 10 + size)
    conv = ElasticConv2d(13, 11, kernel, stride, bias=bias, padding=padding).double()
    x = torch.randn(5, 9, size, size, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    out_channels = 7
    y = conv(x, out_channels)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    weight = conv.weight.detach().clone().requires_grad_()
    bias_full = conv.bias.detach().clone().requires_grad_() if bias else None
    if padding == "tf_same" and stride > 1:

        def reference_conv(t):
            b = bias_full[:out_channels] if bias else None
            return F.conv2d(t, weight[:out_channels, :9], b, stride, kernel // 2)

        expected = tf_same_from_symmetric(reference_conv, x, kernel, stride)
    else:
        b = bias_full[:out_channels] if bias else None
        expected = F.conv2d(x, weight[:out_channels, :9], b, stride, kernel // 2)
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)

    grad = torch.randn(y.shape, dtype=torch.float64)
    params = [conv.weight] + ([conv.bias] if bias else [])
    got = torch.autograd.grad(y, [x, *params], grad)
    want = torch.autograd.grad(expected, [x, weight] + ([bias_full] if bias else []), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert got[1][out_channels:].abs().sum() == 0 and got[1][:, 9:].abs().sum() == 0


def test_prefix_views_slice_only_what_they_must():
    """nn/prefix.py: a full-range prefix is the parameter itself (no autograd node, no zero-filled
    gradient copy); a partial one is the slice."""
    from tofa_fast.nn.prefix import prefix

    w = torch.randn(6, 5, requires_grad=True)
    assert prefix(w, 6, 5) is w and prefix(w, 6) is w
    torch.testing.assert_close(prefix(w, 4, 5), w[:4])
    torch.testing.assert_close(prefix(w, 6, 2), w[:, :2])
    prefix(w, 4, 3).sum().backward()
    expected = torch.zeros(6, 5)
    expected[:4, :3] = 1
    torch.testing.assert_close(w.grad, expected)


def test_pointwise_weight_is_one_view_not_two_selects():
    """A 1×1 convolution reads its (out, in) block through one reshape view: its backward holds no
    SelectBackward nodes (each zero-fills and copies a full-size gradient)."""
    conv = ElasticConv2d(8, 12, 1)
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    y = conv(x, 12)
    names, stack = set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or type(node).__name__ in names:
            continue
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    assert not any(name.startswith(("SelectBackward", "SliceBackward")) for name in names), names
