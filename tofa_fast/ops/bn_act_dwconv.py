"""Batch norm + activation fused into the depthwise convolution that reads them (SPEC §5: batch norm +
activation fused into the passes around them).

An MBConv layer computes ``dwconv(act(bn(y)))`` on ``y``, the output of its 1×1 expansion: the largest
tensor of the network. Unfused, the batch norm reads y for its statistics, reads it again and writes
``a = act(bn(y))``, and the depthwise convolution reads a — four passes over that size forward, and a
second tensor of it held for the backward. Here the statistics pass stays (``_packed_batch_norm_stats``:
the packed batch norm's first pass, running statistics included) and the depthwise kernel normalises
and activates every input pixel as it loads its tile (``_bn_act_dwconv2d_compiled_forward``,
csrc/ops/cpu/dwconv_tiles.h: ``BnActPrologue``): two passes, and a is never written. Backward, the
depthwise kernel reads y the same way for the filter gradient and, as it writes the input gradient,
takes it through the activation and sums what the batch norm's gradients need (Σ dz, Σ dz·x̂); the
batch norm's backward is then its grad_x pass alone (``_packed_batch_norm_grad_input``): three passes
over that size where the two ops make five (the gradient of a written, then read twice with y).

With ``expansion_weight``, the op also owns the MBConv's 1×1 expansion ``y = x · Wᵀ`` (x the block input,
on its rows; a matrix product, as ``ElasticConv2d`` computes it), so that its backward can fold the batch
norm's grad_x pass into the expansion's: ``_bn_grad_pointwise_backward`` (csrc/ops/cpu/pointwise_tiles.h)
reads dz and y once per row tile, forms the batch norm's input gradient dy in the cache and multiplies it
there into the block input's and the expansion weight's gradients — dy is never written, where unfused it
is written once and read twice more by the two matrix products.

The values are the unfused path's up to rounding: the prologue and the epilogue are the packed batch
norm's passes, operation for operation, on the same statistics; Σ dz and Σ dz·x̂ are summed in another
order (tests/test_bn_act_dwconv.py checks against F.batch_norm + the reference depthwise convolution in
float64 and float32, every activation, stride and mode).

Scope: the C++ CPU kernels, float32 and float64, activations none / relu / relu6 / hswish, on plain
eager calls (:func:`.eager_path.takes_eager_path`). :func:`fusion_refusal` says why a call is not
served; the caller (``nn.mbconv``) then runs the batch norm and the convolution as two ops, which is
also what ``torch.compile`` and the other devices see.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import backends
from . import elastic_dwconv_dispatch as dwconv_dispatch
from . import packed_batch_norm
from .eager_path import takes_eager_path

__all__ = ["ACTIVATIONS", "bn_act_dwconv2d", "describe", "expand", "expansion_refusal", "fusion_refusal"]

#: the activations the prologue computes (the tile kernels' PrologueActivation)
ACTIVATIONS = ("none", "relu", "relu6", "hswish")
DTYPES = (torch.float32, torch.float64)
OPS = (
    "_bn_act_dwconv2d_compiled_forward",
    "_bn_act_dwconv2d_compiled_backward",
    "_packed_batch_norm_stats",
    "_packed_batch_norm_grad_input",
    "_bn_grad_pointwise_backward",
)


def fusion_refusal(
    x: torch.Tensor,
    bn_weight: torch.Tensor,
    activation: str | None,
    dw_weight: torch.Tensor,
    kernel_size: int,
    stride: int,
    transforms: Sequence[torch.Tensor],
    expansion_weight: torch.Tensor | None = None,
) -> str | None:
    """Why :func:`bn_act_dwconv2d` does not serve this call (None: it does). ``activation`` is the
    packed batch norm's name for it, None for one it does not know. With ``expansion_weight``, x is the
    expansion's input (it has y's pixels, dtype, device and layout)."""
    if missing := backends.extension_reasons(*OPS):
        return missing[0]
    if x.device.type != "cpu" or x.dtype not in DTYPES:
        return f"the fused kernels serve float32/float64 CPU tensors, got {x.dtype} on {x.device.type}"
    if torch.is_autocast_enabled("cpu"):
        return "autocast is on (the depthwise op would compute in its dtype)"
    if activation not in ACTIVATIONS:
        return f"activation {activation!r} has no prologue (only {', '.join(ACTIVATIONS)})"
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        return "x is not a channels-last 4-D tensor"
    if expansion_weight is not None and (refusal := expansion_refusal(x, expansion_weight)):
        return refusal
    if not takes_eager_path(x, bn_weight, dw_weight, *transforms):
        return "not a plain eager call"
    # Whatever the two ops would run on (a pinned backend included) must be the C++ kernels.
    if packed_batch_norm.select_backend(x, bn_weight) is not packed_batch_norm.CPP:
        return "the batch norm would not run on its C++ kernel"
    if dwconv_dispatch.select_backend(x, dw_weight, kernel_size, stride, transforms) is not dwconv_dispatch.CPP:
        return "the depthwise convolution would not run on its C++ kernel"
    return None


def expansion_refusal(x: torch.Tensor, expansion_weight: torch.Tensor) -> str | None:
    """Why the op cannot take ``expansion_weight`` as x's expansion, given that it serves the layer
    on the expansion's output (:func:`fusion_refusal`'s checks on the weight alone; None: it can)."""
    if expansion_weight.dtype != x.dtype or expansion_weight.dim() != 2 or expansion_weight.shape[1] != x.shape[1]:
        return f"the expansion weight must be a ({x.shape[1]} input channels)-column matrix of x's dtype"
    if not takes_eager_path(expansion_weight):
        return "not a plain eager call"
    return None


class _BnActDwconv2d(torch.autograd.Function):
    """dwconv(act(bn(y))) with y = x, or y = the 1×1 expansion of x when ``expansion_weight`` is given;
    the batch norm's statistics come from the caller (``layout[-2:]``). x, the expansion weight, the
    batch norm's weight and bias, the depthwise weight and its transforms are the graph inputs."""

    @staticmethod
    def forward(ctx, layout: tuple, x, expansion_weight, bn_weight, bn_bias, dw_weight, *transforms):
        training, activation, kernel_size, stride, save_mean, save_rstd, expanded = layout
        y = x if expanded is None else expanded
        mean, scale, bias = _prologue(bn_weight, bn_bias, save_mean, save_rstd)
        ctx.layout, ctx.prologue = layout[:-1], (mean, scale, bias)  # (C,) each: the backward's prologue too
        ctx.save_for_backward(x, expansion_weight, expanded, bn_weight, bn_bias, dw_weight, *transforms)
        return torch.ops.tofa_fast._bn_act_dwconv2d_compiled_forward(
            y, mean, scale, bias, activation, dw_weight, kernel_size, stride, list(transforms)
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, expansion_weight, expanded, bn_weight, bn_bias, dw_weight, *transforms = ctx.saved_tensors
        y = x if expanded is None else expanded
        training, activation, kernel_size, stride, save_mean, save_rstd = ctx.layout
        _, needs_x, needs_expansion, needs_bn_weight, needs_bn_bias, needs_dw_weight, *needs_transforms = (
            ctx.needs_input_grad
        )
        needs_bn = needs_x or needs_expansion or needs_bn_weight or needs_bn_bias
        mean, scale, bias = ctx.prologue
        # The depthwise backward hands back dz, the gradient of the batch norm's output before the
        # activation, with Σ dz and Σ dz·ŷ: the batch norm's backward is then its grad_x pass alone.
        grad_z, sums, grad_dw_weight, grad_transforms = torch.ops.tofa_fast._bn_act_dwconv2d_compiled_backward(
            grad_out,
            y,
            mean,
            scale,
            bias,
            save_rstd[0],
            bn_weight,
            activation,
            dw_weight,
            kernel_size,
            stride,
            transforms,
            [needs_bn, needs_dw_weight, any(needs_transforms)],
        )
        grad_x = grad_expansion = None
        n, _, h, w = x.shape
        if expansion_weight is not None and (needs_x or needs_expansion):
            # That grad_x pass and the expansion's two matrix products, in one pass over dz and y.
            grad_rows, grad_expansion = torch.ops.tofa_fast._bn_grad_pointwise_backward(
                _rows(grad_z),
                _rows(y),
                _rows(x),
                expansion_weight,
                bn_weight,
                save_mean,
                save_rstd,
                sums,
                training,
                [needs_x, needs_expansion],
            )
            grad_x = grad_rows.view(n, h, w, x.shape[1]).permute(0, 3, 1, 2) if needs_x else None
        elif expansion_weight is None and needs_x:
            grad_rows = torch.ops.tofa_fast._packed_batch_norm_grad_input(
                _rows(grad_z),
                _rows(y),
                [0, n * h * w],
                [y.shape[1]],
                bn_weight,
                save_mean,
                save_rstd,
                sums[None],
                training,
            )
            grad_x = grad_rows.view(n, h, w, y.shape[1]).permute(0, 3, 1, 2)
        return (
            None,
            grad_x,
            grad_expansion if needs_expansion else None,
            sums[1].to(bn_weight.dtype) if needs_bn_weight else None,
            sums[0].to(bn_bias.dtype) if needs_bn_bias else None,
            grad_dw_weight if needs_dw_weight else None,
            *(g if need else None for g, need in zip(grad_transforms, needs_transforms)),
        )


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The (N·H·W, C) row view of a channels-last (N, C, H, W) tensor."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n * h * w, c)


def _prologue(bn_weight, bn_bias, save_mean, save_rstd):
    """mean, weight·rstd and bias in the compute dtype: what the packed batch norm's normalise pass uses."""
    compute = save_mean.dtype
    return save_mean[0], bn_weight.to(compute) * save_rstd[0], bn_bias.to(compute)


def expand(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The 1×1 expansion of a channels-last (N, C, H, W) map by an (E, C) matrix: (N, E, H, W)
    channels-last, one matrix product on the rows (``ElasticConv2d``'s channels-last path)."""
    n, _, h, w = x.shape
    return torch.mm(_rows(x), weight.t()).view(n, h, w, weight.shape[0]).permute(0, 3, 1, 2)


def bn_act_dwconv2d(
    x: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum_factor: float,
    eps: float,
    activation: str,
    dw_weight: torch.Tensor,
    kernel_size: int,
    stride: int,
    transforms: Sequence[torch.Tensor] = (),
    expansion_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``elastic_dwconv2d(act(batch_norm(y)), dw_weight, kernel_size, stride, transforms)`` in two passes
    over y (module docstring), differentiable in x, every weight and the transforms. y is x, or with
    ``expansion_weight`` (E, C) the 1×1 expansion of x (:func:`expand`), whose backward then takes the
    batch norm's input gradient in the same pass.

    The batch norm is ``F.batch_norm``'s on y's channels (``bn_weight``, ``bn_bias``, the running
    statistics: views of y's channel count, updated in place in training with ``momentum_factor``;
    None in training to leave them alone), ``activation`` one of :data:`ACTIVATIONS`. The caller checks
    :func:`fusion_refusal` first (on y, or on x for an expansion: it has y's pixels, dtype and layout):
    this function assumes a call it serves.
    """
    expanded = None
    if expansion_weight is not None:
        with torch.no_grad():  # the Function below is its autograd node
            expanded = expand(x, expansion_weight)
    y = x if expanded is None else expanded
    n, c, h, w = y.shape
    save_mean, save_rstd = torch.ops.tofa_fast._packed_batch_norm_stats(
        _rows(y), [0, n * h * w], [c], running_mean, running_var, training, [momentum_factor], eps, []
    )
    layout = (training, activation, kernel_size, stride, save_mean, save_rstd, expanded)
    return _BnActDwconv2d.apply(layout, x, expansion_weight, bn_weight, bn_bias, dw_weight, *transforms)


def describe() -> str:
    """One line for ``tofa-fast info``: whether the fused kernels are there, and what they serve."""
    if missing := backends.extension_reasons(*OPS):
        return f"two ops ({missing[0]})"
    return (
        "fused into the depthwise kernel's tile loads (C++, CPU; float32/float64 channels-last, activation "
        f"{'/'.join(ACTIVATIONS)}, plain eager calls), with the 1×1 expansion before them, whose backward takes "
        "the batch norm's input gradient in the same pass; elsewhere the separate ops"
    )
