"""Elastic depthwise convolution (SPEC §4): centre-sliced, optionally transformed, K×K filters.

Math. With ``weight`` of shape (C_max, 1, K, K) and an active kernel size k ≤ K, the active filter
of channel c is obtained by walking down the kernel sizes: start from the full K×K filter; for each
transform matrix M (shape t²×t²) take the centred t×t window of the current filter, flatten it,
and replace it by ``F.linear(window, M)`` (i.e. ``window @ M.T``). Without transforms the active
filter is simply the centred k×k window. The output is the depthwise convolution of
``x`` (N, C, H, W), C ≤ C_max, with the first C active filters, stride ``stride`` and padding k//2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _centre(filters: torch.Tensor, size: int) -> torch.Tensor:
    start = (filters.shape[-1] - size) // 2
    return filters[..., start : start + size, start : start + size]


def active_filter_reference(
    weight: torch.Tensor, kernel_size: int, transforms: Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    """The (C_max, 1, k, k) active filter: centre slice, or the transform chain when given."""
    if not transforms:
        return _centre(weight, kernel_size)
    filters = weight
    for matrix in transforms:
        target = int(round(matrix.shape[0] ** 0.5))
        window = _centre(filters, target).reshape(weight.shape[0], target * target)
        filters = F.linear(window, matrix).reshape(weight.shape[0], 1, target, target)
    return filters


def elastic_dwconv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    transforms: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Pure-PyTorch reference (slice + transform + ``F.conv2d``, what OFA does); the test oracle."""
    channels = x.shape[1]
    filters = active_filter_reference(weight, kernel_size, transforms)[:channels]
    return F.conv2d(x, filters, None, stride, kernel_size // 2, 1, channels)


def elastic_dwconv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    transforms: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Depthwise conv of ``x`` (N, C, H, W) with the active k×k filter of ``weight`` (C_max, 1, K, K).

    Args:
        x: input, C ≤ C_max channels.
        weight: full supernet depthwise weight, K odd.
        kernel_size: active odd kernel size k ≤ K.
        stride: 1 or 2; padding is k // 2 ("same").
        transforms: ``None`` or the list of OFA kernel-transformation matrices from K down to k
            (each t²×t² for the successive target sizes t, the last one t = k).

    Returns:
        (N, C, H_out, W_out) with H_out = (H + 2(k//2) − k) // stride + 1.
    """
    return elastic_dwconv2d_reference(x, weight, kernel_size, stride, transforms)
