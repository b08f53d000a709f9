"""The ``tofa_fast::elastic_dwconv2d`` operator (SPEC §4): schema, fake kernel, autograd, autocast.

The math, the precision rule and the pure-PyTorch reference live in :mod:`.elastic_dwconv_reference`;
which backend computes a call (the C++ kernel on the CPU, the CUDA or Triton kernels on GPUs, the
reference wherever nothing compiled applies) is decided by :mod:`.elastic_dwconv_dispatch`. Modules
depend one way: reference ← dispatch ← this operator.

It is a ``torch.library`` custom op, so ``torch.compile`` and ``torch.library.opcheck`` see one
opaque op. Under ``torch.autocast`` (CPU and CUDA) its autocast kernel casts x to the autocast dtype
and leaves weight and transforms as they are: with fp32 master weights the active filter is formed
in fp32 and cast to the compute dtype, and the gradients of weight and transforms come back in fp32.
The same mixed-precision call works without autocast (x bfloat16/float16, weight float32).

In plain eager mode :func:`elastic_dwconv2d` calls the selected backend through
:class:`_EagerElasticDwconv2d` instead (:mod:`.eager_path`: the op's Python dispatch costs more than a
small kernel); it applies the same autocast rule and the same backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from .eager_path import takes_eager_path
from .elastic_dwconv_dispatch import ElasticDwconvBackend, pinned_backend, select_backend, use_backend
from .elastic_dwconv_reference import check_elastic_dwconv_args, output_memory_format

__all__ = ["elastic_dwconv2d"]

# Device type → its autocast dispatch key.
AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def _empty_like_grad(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((0,))


@torch.library.custom_op("tofa_fast::elastic_dwconv2d", mutates_args=())
def _elastic_dwconv2d_op(
    x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, transforms: list[torch.Tensor]
) -> torch.Tensor:
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
    """Gradients (x, full weight, transforms), each in its input's dtype; entries masked off in
    ``output_mask`` are empty (0,)."""
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
    # A pin (use_backend) is a context variable, and the autograd engine runs CUDA backward nodes on
    # its own device threads, where the pin is unset: the backward re-enters the forward's pin.
    ctx.pinned_backend = pinned_backend()
    ctx.save_for_backward(x, weight, *transforms)


def _backward_mask(needs_x: bool, needs_weight: bool, needs_transforms) -> list[bool]:
    return [bool(needs_x), bool(needs_weight), any(needs_transforms)]


def _backward(ctx, grad_output):
    x, weight, *transforms = ctx.saved_tensors
    needs_x, needs_weight, _, _, needs_transforms = ctx.needs_input_grad
    mask = _backward_mask(needs_x, needs_weight, needs_transforms)
    with use_backend(ctx.pinned_backend) if ctx.pinned_backend else contextlib.nullcontext():
        grad_x, grad_weight, grad_transforms = _elastic_dwconv2d_backward_op(
            grad_output, x, weight, ctx.kernel_size, ctx.stride, transforms, mask
        )
    return (
        grad_x if needs_x else None,
        grad_weight if needs_weight else None,
        None,
        None,
        [g if need else None for g, need in zip(grad_transforms, needs_transforms)],
    )


_elastic_dwconv2d_op.register_autograd(_backward, setup_context=_setup_context)


# ---- autocast ----------------------------------------------------------------------------------
# torch.library.register_autocast casts every floating input to one dtype fixed at registration,
# which would run the transform chain in bf16/fp16 and hand back low-precision weight gradients.
# These kernels cast x alone, to the autocast dtype of the moment, and run the op (forward or
# backward) with autocast off, so nothing inside a backend is autocast a second time.


def _autocast_forward(device_type: str):
    def kernel(x, weight, kernel_size, stride, transforms):
        # Like autocast's own casts: every floating dtype but float64 goes to the autocast dtype.
        if x.is_floating_point() and x.dtype != torch.float64:
            x = x.to(torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            return _elastic_dwconv2d_op(x, weight, kernel_size, stride, transforms)

    return kernel


def _autocast_backward(device_type: str):
    # Gradients keep their inputs' dtypes; only the backends must not see autocast (a backward run
    # inside an autocast region would otherwise take the reference's chain rule to bf16/fp16).
    def kernel(grad_output, x, weight, kernel_size, stride, transforms, output_mask):
        with torch.autocast(device_type, enabled=False):
            return _elastic_dwconv2d_backward_op(grad_output, x, weight, kernel_size, stride, transforms, output_mask)

    return kernel


for _device_type, _key in AUTOCAST_KEYS.items():
    torch.library.impl("tofa_fast::elastic_dwconv2d", _key, _autocast_forward(_device_type))
    torch.library.impl("tofa_fast::elastic_dwconv2d_backward", _key, _autocast_backward(_device_type))


# ---- the eager path (eager_path.py) ---------------------------------------------------------------


class _EagerElasticDwconv2d(torch.autograd.Function):
    """The op's forward and backward on one backend, without the custom op's dispatch; transforms
    are trailing arguments (autograd sees tensors only at the top level)."""

    @staticmethod
    def forward(ctx, backend: ElasticDwconvBackend, x, weight, kernel_size, stride, *transforms):
        ctx.backend, ctx.kernel_size, ctx.stride = backend, kernel_size, stride
        ctx.save_for_backward(x, weight, *transforms)
        return backend.forward(x, weight, kernel_size, stride, list(transforms))

    @staticmethod
    @torch.autograd.function.once_differentiable  # first order, as the op
    def backward(ctx, grad_output):
        x, weight, *transforms = ctx.saved_tensors
        _, needs_x, needs_weight, _, _, *needs_transforms = ctx.needs_input_grad
        mask = _backward_mask(needs_x, needs_weight, needs_transforms)
        # As the op's autocast backward kernel: a backward run inside an autocast region computes as
        # outside it.
        with _autocast_off(x.device.type):
            grad_x, grad_weight, grad_transforms = ctx.backend.backward(
                grad_output, x, weight, ctx.kernel_size, ctx.stride, transforms, mask
            )
        return (
            None,
            grad_x if needs_x else None,
            grad_weight if needs_weight else None,
            None,
            None,
            *(g if need else None for g, need in zip(grad_transforms, needs_transforms)),
        )


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``device_type`` (a no-op context where it is off already)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _eager_elastic_dwconv2d(x, weight, kernel_size, stride, transforms) -> torch.Tensor:
    device_type = x.device.type
    # The op's autocast forward kernel, written out.
    if torch.is_autocast_enabled(device_type) and x.is_floating_point() and x.dtype != torch.float64:
        x = x.to(torch.get_autocast_dtype(device_type))
    with _autocast_off(device_type):
        backend = select_backend(x, weight, kernel_size, stride, transforms)
        return _EagerElasticDwconv2d.apply(backend, x, weight, kernel_size, stride, *transforms)


def elastic_dwconv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    transforms: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Depthwise conv of ``x`` (N, C, H, W) with the active k×k filter of ``weight`` (C_max, 1, K, K).

    Args:
        x: input, C ≤ C_max channels; NCHW or channels_last (the output keeps the layout). Its dtype
            is the compute dtype; under ``torch.autocast`` it is cast to the autocast dtype first.
        weight: full supernet depthwise weight, K odd; x's dtype, or float32 with a bfloat16/float16
            x (mixed precision: the active filter is formed in float32, then cast to x's dtype).
        kernel_size: active odd kernel size k ≤ K.
        stride: 1 or 2 (any positive stride works; the compiled CPU kernel serves 1 and 2);
            padding is k // 2 ("same").
        transforms: ``None`` or the list of OFA kernel-transformation matrices from K down to k
            (each t²×t² for the successive target sizes t, the last one t = k), in the weight's dtype.

    Returns:
        (N, C, H_out, W_out) in x's (compute) dtype, with H_out = (H + 2(k//2) − k) // stride + 1.

    Gradients flow to ``x``, to the full ``weight`` (zero outside the active window and channels) and
    to every transform matrix, each in its own dtype (first order: the backward is itself an opaque op).
    """
    check_elastic_dwconv_args(x, weight, kernel_size, stride, transforms)
    transforms = list(transforms) if transforms else []
    if takes_eager_path(x, weight, *transforms):
        return _eager_elastic_dwconv2d(x, weight, kernel_size, stride, transforms)
    return _elastic_dwconv2d_op(x, weight, kernel_size, stride, transforms)
