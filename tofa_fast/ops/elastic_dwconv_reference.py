"""Elastic depthwise convolution (SPEC §4): the pure-PyTorch reference, the argument rules, the layout rule.

Math. With ``weight`` of shape (C_max, 1, K, K) and an active kernel size k ≤ K, the active filter
of channel c is obtained by walking down the kernel sizes: start from the full K×K filter; for each
transform matrix M (shape t²×t²) take the centred t×t window of the current filter, flatten it,
and replace it by ``F.linear(window, M)`` (i.e. ``window @ M.T``). Without transforms the active
filter is simply the centred k×k window. The output is the depthwise convolution of
``x`` (N, C, H, W), C ≤ C_max, with the first C active filters, stride ``stride`` and padding k//2.

Backward. With G = dL/d(active filter) (the depthwise conv's weight gradient, C×k×k), walking the
chain back from k: for the step ``out = window @ M.T`` of target size t,
``dM = Σ_c g_cᵀ window_c`` (t²×t²) and ``d window = g @ M``, which is scattered into the centre of
a zero filter of the previous size. The weight gradient is the last of these, zero outside the
centred window actually read and for channels ≥ C.

Precision. ``x`` sets the compute dtype. ``weight`` and ``transforms`` share one dtype: x's, or
float32 when x is bfloat16/float16 (mixed precision: fp32 master weights, as under
``torch.autocast``). The active filter is formed in the weight's dtype and cast to the compute dtype
for the convolution; the gradients of weight and transforms come back in their own dtype.

This module is the oracle of every backend (:mod:`.elastic_dwconv_dispatch`) and depends on none of
them; the operator itself is registered in :mod:`.elastic_dwconv`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "MIXED_PRECISION_DTYPES",
    "active_filter_backward_reference",
    "active_filter_reference",
    "check_elastic_dwconv_args",
    "elastic_dwconv2d_reference",
    "output_memory_format",
]

# Compute dtypes of x that may run with float32 weight and transforms (autocast's fp32 master weights).
MIXED_PRECISION_DTYPES = (torch.bfloat16, torch.float16)


def _centre(filters: torch.Tensor, size: int) -> torch.Tensor:
    start = (filters.shape[-1] - size) // 2
    return filters[..., start : start + size, start : start + size]


def _in_weight_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off around the transform chain: under autocast, F.linear would run it in bf16/fp16,
    and the active filter is defined in the weight's dtype (fp32 master weights)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def active_filter_reference(
    weight: torch.Tensor, kernel_size: int, transforms: Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    """The (C_max, 1, k, k) active filter in the weight's dtype: centre slice, or the transform chain."""
    if not transforms:
        return _centre(weight, kernel_size)
    filters = weight
    with _in_weight_precision(weight.device):
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
    """Pure-PyTorch reference (slice + transform + ``F.conv2d``, what OFA does); the test oracle.

    The active filter is formed in the weight's dtype, then cast to x's (a no-op unless mixed precision).
    """
    channels = x.shape[1]
    filters = active_filter_reference(weight, kernel_size, transforms)[:channels].to(x.dtype)
    return F.conv2d(x, filters, None, stride, kernel_size // 2, 1, channels)


def active_filter_backward_reference(
    grad_filter: torch.Tensor, weight: torch.Tensor, transforms: Sequence[torch.Tensor] | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Chain rule of :func:`active_filter_reference` written out (the module docstring's backward).

    Args:
        grad_filter: (C, 1, k, k) gradient of the first C active filters, C ≤ C_max, in the weight's dtype.
        weight: (C_max, 1, K, K).
        transforms: the chain used in the forward.

    Returns:
        (grad_weight of shape (C_max, 1, K, K), zero outside the window read and channels ≥ C;
        one gradient per transform matrix), in the weight's dtype.
    """
    with _in_weight_precision(weight.device):
        return _active_filter_backward(grad_filter, weight, list(transforms or []))


def _active_filter_backward(
    grad_filter: torch.Tensor, weight: torch.Tensor, transforms: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    channels, size = grad_filter.shape[0], grad_filter.shape[-1]
    windows = []
    filters = weight[:channels]
    for matrix in transforms:
        target = _transform_size(matrix)
        windows.append(_centre(filters, target).reshape(channels, target * target))
        filters = F.linear(windows[-1], matrix).reshape(channels, 1, target, target)
    grad = grad_filter.reshape(channels, size * size)
    grad_transforms: list[torch.Tensor] = [grad] * len(transforms)
    for i in reversed(range(len(transforms))):
        grad_transforms[i] = grad.T @ windows[i]
        previous = weight.shape[-1] if i == 0 else _transform_size(transforms[i - 1])
        padded = grad.new_zeros((channels, 1, previous, previous))
        _centre(padded, size).copy_((grad @ transforms[i]).reshape(channels, 1, size, size))
        grad, size = padded.reshape(channels, previous * previous), previous
    grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    _centre(grad_weight[:channels], size).copy_(grad.reshape(channels, 1, size, size))
    return grad_weight, grad_transforms


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when ``x`` is laid out so (and not also NCHW-contiguous), else contiguous.

    Every backend returns its output (and the input gradient) in this format, so the fake kernel can
    predict strides exactly.
    """
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _transform_size(matrix: torch.Tensor) -> int:
    """The target size t of a t²×t² matrix, or 0 when it is not of that shape."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        return 0
    t = int(round(matrix.shape[0] ** 0.5))
    return t if t * t == matrix.shape[0] else 0


def check_elastic_dwconv_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    kernel_size: int,
    stride: int,
    transforms: Sequence[torch.Tensor] | None,
) -> None:
    """Raise ``ValueError``/``TypeError`` naming the offending argument (SPEC §12).

    dtypes: weight and transforms share one, x's or float32 when x is bfloat16/float16 (the module
    docstring's precision rule).

    The transform chain must be a strictly decreasing sequence of odd target sizes below K ending at
    ``kernel_size`` (OFA's 7→5→3 is the usual one); the compiled kernels check the same in C++.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    for name, t in (("x", x), ("weight", weight)):
        if t.is_nested or t.layout != torch.strided:
            raise ValueError(
                f"{name} must be a dense (strided) tensor, got a {'nested' if t.is_nested else t.layout} one"
            )
    if isinstance(transforms, torch.Tensor):
        raise TypeError("transforms must be None or a sequence of tensors (a list of matrices), got one tensor")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
        raise ValueError(f"weight must have shape (C_max, 1, K, K) with K odd, got {tuple(weight.shape)}")
    if weight.dtype != x.dtype and not (x.dtype in MIXED_PRECISION_DTYPES and weight.dtype == torch.float32):
        raise ValueError(
            f"weight dtype {weight.dtype} does not match x dtype {x.dtype} (a float32 weight also serves "
            "bfloat16/float16 x: mixed precision)"
        )
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    c_max, big = weight.shape[0], weight.shape[2]
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise TypeError(f"kernel_size must be an int, got {type(kernel_size).__name__}")
    if kernel_size < 1 or kernel_size % 2 == 0 or kernel_size > big:
        raise ValueError(
            f"kernel_size must be odd and between 1 and K={big} (the weight's kernel size), got {kernel_size}"
        )
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if x.shape[1] < 1 or x.shape[1] > c_max:
        raise ValueError(f"x has C={x.shape[1]} channels; it must have 1 ≤ C ≤ C_max={c_max} (weight.shape[0])")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"x must have non-empty spatial dims, got shape {tuple(x.shape)}")
    if not transforms:
        return
    if not isinstance(transforms, Sequence) or not all(isinstance(m, torch.Tensor) for m in transforms):
        raise TypeError("transforms must be None or a sequence of tensors")
    for i, matrix in enumerate(transforms):
        if matrix.is_nested or matrix.layout != torch.strided:
            raise ValueError(f"transforms[{i}] must be a dense (strided) tensor, got a {matrix.layout} one")
    previous = big
    for i, matrix in enumerate(transforms):
        t = _transform_size(matrix)
        if t == 0 or t % 2 == 0 or t >= previous:
            raise ValueError(
                f"transforms[{i}] must be a t²×t² matrix with t odd and below the previous size {previous}, "
                f"got shape {tuple(matrix.shape)}"
            )
        if matrix.dtype != weight.dtype:
            raise ValueError(f"transforms[{i}] dtype {matrix.dtype} does not match weight dtype {weight.dtype}")
        if matrix.device != weight.device:
            raise ValueError(f"transforms[{i}] is on {matrix.device} but weight is on {weight.device}")
        previous = t
    if previous != kernel_size:
        chain = "→".join(str(s) for s in [big] + [_transform_size(m) for m in transforms])
        raise ValueError(
            f"transforms must lead from K={big} down to kernel_size={kernel_size} "
            f"(e.g. {(kernel_size + 2) ** 2}×{(kernel_size + 2) ** 2} … for OFA's chain), got the chain {chain}"
        )
