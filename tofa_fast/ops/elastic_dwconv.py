"""Elastic depthwise convolution (SPEC §4): centre-sliced, optionally transformed, K×K filters.

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

The operator ``tofa_fast::elastic_dwconv2d`` is a ``torch.library`` custom op (schema, fake kernel,
autograd), so ``torch.compile`` and ``torch.library.opcheck`` see one opaque op. Its implementation
asks the dispatch table (:mod:`tofa_fast.ops.elastic_dwconv_dispatch`) which backend serves the call:
the C++ kernel on the CPU, the CUDA or Triton kernels on GPUs, and :func:`elastic_dwconv2d_reference`
(slice + transform + ``F.conv2d``, what OFA does) wherever nothing compiled applies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "active_filter_backward_reference",
    "active_filter_reference",
    "check_elastic_dwconv_args",
    "elastic_dwconv2d",
    "elastic_dwconv2d_reference",
    "output_memory_format",
]


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


def active_filter_backward_reference(
    grad_filter: torch.Tensor, weight: torch.Tensor, transforms: Sequence[torch.Tensor] | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Chain rule of :func:`active_filter_reference` written out (the module docstring's backward).

    Args:
        grad_filter: (C, 1, k, k) gradient of the first C active filters, C ≤ C_max.
        weight: (C_max, 1, K, K).
        transforms: the chain used in the forward.

    Returns:
        (grad_weight of shape (C_max, 1, K, K), zero outside the window read and channels ≥ C;
        one gradient per transform matrix).
    """
    channels, size = grad_filter.shape[0], grad_filter.shape[-1]
    transforms = list(transforms or [])
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

    The transform chain must be a strictly decreasing sequence of odd target sizes below K ending at
    ``kernel_size`` (OFA's 7→5→3 is the usual one); the compiled kernels check the same in C++.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
        raise ValueError(f"weight must have shape (C_max, 1, K, K) with K odd, got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} does not match x dtype {x.dtype}")
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


def _empty_like_grad(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((0,))


@torch.library.custom_op("tofa_fast::elastic_dwconv2d", mutates_args=())
def _elastic_dwconv2d_op(
    x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, transforms: list[torch.Tensor]
) -> torch.Tensor:
    from .elastic_dwconv_dispatch import select_backend

    check_elastic_dwconv_args(x, weight, kernel_size, stride, transforms)
    return select_backend(x, weight, kernel_size, stride, transforms).forward(
        x, weight, kernel_size, stride, transforms
    )


@_elastic_dwconv2d_op.register_fake
def _(x, weight, kernel_size, stride, transforms):
    check_elastic_dwconv_args(x, weight, kernel_size, stride, transforms)
    n, c, h, w = x.shape
    pad = kernel_size // 2
    out_h = (h + 2 * pad - kernel_size) // stride + 1
    out_w = (w + 2 * pad - kernel_size) // stride + 1
    return torch.empty((n, c, out_h, out_w), dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


@torch.library.custom_op("tofa_fast::elastic_dwconv2d_backward", mutates_args=())
def _elastic_dwconv2d_backward_op(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    kernel_size: int,
    stride: int,
    transforms: list[torch.Tensor],
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Gradients (x, full weight, transforms); entries masked off in ``output_mask`` are empty (0,)."""
    from .elastic_dwconv_dispatch import select_backend

    backend = select_backend(x, weight, kernel_size, stride, transforms)
    return backend.backward(grad_output, x, weight, kernel_size, stride, transforms, output_mask)


@_elastic_dwconv2d_backward_op.register_fake
def _(grad_output, x, weight, kernel_size, stride, transforms, output_mask):
    grad_x = torch.empty_like(x, memory_format=output_memory_format(x)) if output_mask[0] else _empty_like_grad(x)
    grad_weight = (
        torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] else _empty_like_grad(x)
    )
    grad_transforms = [
        torch.empty_like(m, memory_format=torch.contiguous_format) if output_mask[2] else _empty_like_grad(x)
        for m in transforms
    ]
    return grad_x, grad_weight, grad_transforms


def _setup_context(ctx, inputs, output):
    x, weight, kernel_size, stride, transforms = inputs
    ctx.kernel_size, ctx.stride = kernel_size, stride
    ctx.save_for_backward(x, weight, *transforms)


def _backward(ctx, grad_output):
    x, weight, *transforms = ctx.saved_tensors
    needs_x, needs_weight, _, _, needs_transforms = ctx.needs_input_grad
    needs_any_transform = any(needs_transforms)
    mask = [bool(needs_x), bool(needs_weight), needs_any_transform]
    grad_x, grad_weight, grad_transforms = _elastic_dwconv2d_backward_op(
        grad_output,
        x,
        weight,
        ctx.kernel_size,
        ctx.stride,
        transforms,
        mask,
    )
    return (
        grad_x if needs_x else None,
        grad_weight if needs_weight else None,
        None,
        None,
        [g if need else None for g, need in zip(grad_transforms, needs_transforms)],
    )


_elastic_dwconv2d_op.register_autograd(_backward, setup_context=_setup_context)


def elastic_dwconv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    transforms: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Depthwise conv of ``x`` (N, C, H, W) with the active k×k filter of ``weight`` (C_max, 1, K, K).

    Args:
        x: input, C ≤ C_max channels; NCHW or channels_last (the output keeps the layout).
        weight: full supernet depthwise weight, K odd.
        kernel_size: active odd kernel size k ≤ K.
        stride: 1 or 2 (any positive stride works; the compiled CPU kernel serves 1 and 2);
            padding is k // 2 ("same").
        transforms: ``None`` or the list of OFA kernel-transformation matrices from K down to k
            (each t²×t² for the successive target sizes t, the last one t = k).

    Returns:
        (N, C, H_out, W_out) with H_out = (H + 2(k//2) − k) // stride + 1.

    Gradients flow to ``x``, to the full ``weight`` (zero outside the active window and channels) and
    to every transform matrix (first order: the backward is itself an opaque op).
    """
    check_elastic_dwconv_args(x, weight, kernel_size, stride, transforms)
    return _elastic_dwconv2d_op(x, weight, kernel_size, stride, list(transforms) if transforms else [])
