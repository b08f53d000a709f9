"""An MBConv's expansion batch norm + activation, fused into its depthwise convolution.

``depthwise(act(bn(y)))`` for the expansion output y: one call of :func:`tofa_fast.ops.bn_act_dwconv2d`
(the normalisation and activation applied as the depthwise kernel loads y, so ``act(bn(y))`` — a
tensor the size of the expansion — is never written nor kept for the backward) where that op serves
the call, else the two modules one after the other. Same values, gradients and running-statistics
updates either way, up to rounding (tests/test_bn_act_dwconv.py). The fused path takes the same size
rule as the batch norm's own fused kernel (``ElasticBatchNorm2d.fused_activation_name``). A batch norm
or convolution with hooks (``recalibrate_bn``'s, a user's) is called as a module, so its hooks see what
they expect. The sequential passes (``ElasticMBConv.forward``) take this seam, and so does the shared-prefix
tree for an expansion with a single depthwise child (nn/shared_prefix.py); where the tree's depthwise
nodes read a shared expansion as a channel prefix (not a channels-last tensor the kernels take), and in
the packed step, the two ops run, so step modes agree up to rounding, as the step-mode tests check.

:func:`expand_bn_act_dwconv` takes the 1×1 expansion before them in too, where it is a matrix product on
the rows of a channels-last map (``ElasticConv2d``'s CPU path): the op then computes the expansion
itself, and its backward forms the batch norm's input gradient and the expansion's two gradients in one
pass (``ops/bn_act_dwconv.py``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as nn_module

from ..ops import bn_act_dwconv as fused_op
from . import elastic_conv
from .elastic_batchnorm import ElasticBatchNorm2d
from .elastic_conv import ElasticConv2d
from .elastic_dwconv import ElasticDepthwiseConv2d
from .prefix import prefix

#: False runs the batch norm + activation and the depthwise convolution as two ops everywhere: the
#: baseline of bench/test_bench_sequential_step.py's interleaved comparison.
FUSE_BN_ACT_INTO_DWCONV = True
#: False leaves the expansion out of the fused op (its backward then takes the batch norm's grad_x pass
#: and two matrix products): the baseline of the same bench's interleaved comparison.
FUSE_EXPANSION_BACKWARD = True


def expand_bn_act_dwconv(
    expand_conv: ElasticConv2d,
    bn: ElasticBatchNorm2d,
    activation: nn.Module | None,
    dwconv: ElasticDepthwiseConv2d,
    x: torch.Tensor,
    mid_channels: int,
    kernel_size: int,
    batch_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``dwconv(activation(bn(expand_conv(x, mid_channels))), kernel_size)``: an MBConv's expansion and
    the depthwise convolution it feeds, the expansion inside the fused op where it serves (module
    docstring). ``batch_stats``: as ``ElasticBatchNorm2d.forward``'s (the shared-prefix tree's)."""
    transforms = dwconv.transforms_for(kernel_size) or []
    # x stands in for the expansion's output y in the checks: the same pixels, dtype, device and layout.
    name = _fused_activation_name(bn, activation, dwconv, x, kernel_size, transforms)
    if name is None:  # the layer takes no fused kernel: the modules, one after the other
        return dwconv(bn(expand_conv(x, mid_channels), activation, batch_stats=batch_stats), kernel_size)
    weight = _expansion_matrix(expand_conv, x, mid_channels)
    if weight is not None and fused_op.expansion_refusal(x, weight) is None:
        return _fused(bn, dwconv, x, kernel_size, transforms, name, weight, batch_stats)
    return bn_act_dwconv(bn, activation, dwconv, expand_conv(x, mid_channels), kernel_size, batch_stats)


def _expansion_matrix(expand_conv: ElasticConv2d, x: torch.Tensor, mid_channels: int) -> torch.Tensor | None:
    """The (mid, in) weight matrix when the expansion is one matrix product on x's rows and nothing
    (a bias, a hook) asks for it to run as its own module, else None."""
    if not FUSE_EXPANSION_BACKWARD:
        return None
    if expand_conv.kernel_size != 1 or expand_conv.stride != 1 or expand_conv.bias is not None:
        return None
    if not elastic_conv.pointwise_as_gemm(x) or _has_hooks(expand_conv):
        return None
    return expand_conv.pointwise_matrix(mid_channels, x.shape[1])


def bn_act_dwconv(
    bn: ElasticBatchNorm2d,
    activation: nn.Module | None,
    dwconv: ElasticDepthwiseConv2d,
    y: torch.Tensor,
    kernel_size: int,
    batch_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``dwconv(activation(bn(y)), kernel_size)``, fused where the kernels serve it (module docstring).
    ``batch_stats``: as ``ElasticBatchNorm2d.forward``'s."""
    transforms = dwconv.transforms_for(kernel_size) or []
    name = _fused_activation_name(bn, activation, dwconv, y, kernel_size, transforms)
    if name is not None:
        return _fused(bn, dwconv, y, kernel_size, transforms, name, None, batch_stats)
    return dwconv(bn(y, activation, batch_stats=batch_stats), kernel_size)


def _fused(bn, dwconv, x, kernel_size, transforms, name, expansion_weight=None, batch_stats=None) -> torch.Tensor:
    c = x.shape[1] if expansion_weight is None else expansion_weight.shape[0]
    running_mean, running_var, factor = bn.running_stat_args(c, batch_stats)
    return fused_op.bn_act_dwconv2d(
        x,
        prefix(bn.weight, c),
        prefix(bn.bias, c),
        running_mean,
        running_var,
        bn.training,
        factor,
        bn.eps,
        name,
        dwconv.weight,
        kernel_size,
        dwconv.stride,
        transforms,
        expansion_weight,
    )


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own or global ones), as ``Module.__call__`` tests."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or nn_module._global_forward_hooks
        or nn_module._global_forward_pre_hooks
        or nn_module._global_backward_hooks
        or nn_module._global_backward_pre_hooks
    )


def _fused_activation_name(bn, activation, dwconv, y, kernel_size, transforms) -> str | None:
    """The fused op's name for ``activation`` when the fused op serves this call, else None."""
    if not FUSE_BN_ACT_INTO_DWCONV or dwconv.padding != "symmetric":
        return None
    # A hook on either module must see it called with its input and output (recalibrate_bn's
    # statistics hooks, a user's): the fused path has no batch norm output to show it.
    if _has_hooks(bn) or _has_hooks(dwconv):
        return None
    name = bn.fused_activation_name(y, activation)  # None: not the batch norm's fused kernel either
    if name is None:
        return None
    refusal = fused_op.fusion_refusal(y, bn.weight, name, dwconv.weight, kernel_size, dwconv.stride, transforms)
    return name if refusal is None else None
