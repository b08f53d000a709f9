"""Inverted-residual (MBConv) layer: elastic form for the supernet, static form for extracted subnets.

    x ─► [1×1 expand conv ─ BN ─ act] ─► k×k depthwise ─ BN ─ act ─► [SE] ─► 1×1 project ─ BN ─► (+ x)

The expansion conv exists only when the stage has an expand ratio above 1 (OFA rule). The middle
width of a layer with C_in active inputs and expand ratio e is ``make_divisible(round(C_in·e), 8)``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..spaces import SearchSpace, make_divisible
from .activations import build_activation
from .bn_act_dwconv import expand_bn_act_dwconv
from .elastic_batchnorm import ElasticBatchNorm2d
from .elastic_conv import ElasticConv2d
from .elastic_dwconv import ElasticDepthwiseConv2d
from .elastic_se import ElasticSqueezeExcite


def drop_connect_mask(rate: float, samples: int, like: torch.Tensor) -> torch.Tensor:
    """Which samples keep their residual branch under drop-connect at ``rate``: (samples,) ones and
    zeros in ``like``'s dtype and device, one Bernoulli draw per sample in sample order (so every
    step mode draws the same masks from the same generator state)."""
    return like.new_empty(samples).bernoulli_(1.0 - rate)


def drop_connect_add(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, rate: float) -> torch.Tensor:
    """``x + y · mask / (1 - rate)``: the residual sum with the branch ``y`` dropped where ``mask``
    (broadcast against y) is 0 and rescaled where it is 1 (OFA's ``drop_connect``).

    One ``addcmul`` pass, the scalar applied in the op's float math (bfloat16 y included), where
    ``x + y * mask / keep`` makes three passes and two temporaries forward and two passes backward."""
    return torch.addcmul(x, y, mask, value=1.0 / (1.0 - rate))


class ElasticMBConv(nn.Module):
    """One elastic MBConv layer of ``space.stages[stage_index]``.

    Active choices (kernel, expand, output width) are set by :meth:`set_active`; the input width is
    read from the input tensor. Shapes: x (N, C_in ≤ max_in, H, W) → (N, width, H/stride, W/stride).
    """

    def __init__(self, space: SearchSpace, stage_index: int, layer_index: int, max_in: int):
        super().__init__()
        stage = space.stages[stage_index]
        self.stage_index, self.layer_index = stage_index, layer_index
        self.stride = stage.stride if layer_index == 0 else 1
        self.divisor = space.channel_divisor
        self.expand_ratios = stage.expand_choices(layer_index)
        self.residual = space.has_residual(stage_index, layer_index)
        # Stochastic depth on residual branches during training (EfficientNet's "drop connect").
        self.drop_connect_rate = 0.0
        self.max_in, self.max_out = max_in, max(stage.widths)
        self.max_mid = space.middle_channels(stage_index, max_in, max(self.expand_ratios))
        bn = dict(eps=space.bn_eps, momentum=space.bn_momentum)
        self.act = build_activation(stage.act)
        if stage.has_expansion:
            self.expand_conv = ElasticConv2d(max_in, self.max_mid, 1)
            self.expand_bn = ElasticBatchNorm2d(self.max_mid, **bn)
        else:
            self.expand_conv = self.expand_bn = None
        self.dw_conv = ElasticDepthwiseConv2d(
            self.max_mid, stage.kernels, self.stride, space.kernel_transform, space.padding
        )
        self.dw_bn = ElasticBatchNorm2d(self.max_mid, **bn)
        self.se = ElasticSqueezeExcite(self.max_mid, space.se_reduction, space.channel_divisor) if stage.se else None
        self.project_conv = ElasticConv2d(self.max_mid, self.max_out, 1)
        self.project_bn = ElasticBatchNorm2d(self.max_out, **bn)
        self.set_active(max(stage.kernels), max(self.expand_ratios), self.max_out)

    def set_active(self, kernel: int, expand: float, width: int) -> None:
        self.active_kernel, self.active_expand, self.active_width = kernel, expand, width

    def middle_channels(self, in_channels: int, expand: float | None = None) -> int:
        if self.expand_conv is None:
            return in_channels
        e = self.active_expand if expand is None else expand
        return make_divisible(round(in_channels * e), self.divisor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.expand_conv is not None:
            # The expansion's batch norm + activation run as the depthwise kernel loads its tiles, and the
            # expansion's backward takes the batch norm's.
            y = expand_bn_act_dwconv(
                self.expand_conv,
                self.expand_bn,
                self.act,
                self.dw_conv,
                x,
                self.middle_channels(x.shape[1]),
                self.active_kernel,
            )
        else:
            y = self.dw_conv(x, self.active_kernel)
        y = self.dw_bn(y, self.act)
        if self.se is not None:
            y = self.se(y)
        y = self.project_bn(self.project_conv(y, self.active_width))
        if not self.residual:
            return y
        if self.training and self.drop_connect_rate > 0:
            mask = drop_connect_mask(self.drop_connect_rate, y.shape[0], y)
            return drop_connect_add(x, y, mask.view(-1, 1, 1, 1), self.drop_connect_rate)
        return x + y

    def extract(self, in_channels: int) -> MBConvBlock:
        """A static copy of this layer for ``in_channels`` inputs and the active choices."""
        mid = self.middle_channels(in_channels)
        expand = None
        if self.expand_conv is not None:
            expand = nn.Sequential(
                self.expand_conv.extract(in_channels, mid), self.expand_bn.extract(mid), _copy(self.act)
            )
        depthwise = [self.dw_conv.extract(mid, self.active_kernel), self.dw_bn.extract(mid), _copy(self.act)]
        if self.se is not None:
            depthwise.append(self.se.extract(mid))
        project = nn.Sequential(
            self.project_conv.extract(mid, self.active_width), self.project_bn.extract(self.active_width)
        )
        return MBConvBlock(expand, nn.Sequential(*depthwise), project, self.residual)

    @torch.no_grad()
    def sort_middle_channels(self, expand_stage: int = 0, expand_choices: int | None = None) -> None:
        """Permute middle channels by importance (L1 norm of the projection weight), OFA's
        ``re_organize_middle_weights``: the function the full net computes is unchanged, and every
        width prefix now keeps the most important channels.

        ``expand_stage`` > 0 reproduces OFA's progressive-shrinking variant: channels beyond the
        width of the ``expand_stage``-th largest expand ratio are ranked in bands, so that a band that
        smaller subnets already use stays in front of the bands they do not. The ratios are the
        layer's ``expand_choices`` largest (default: all of them), as OFA ranks by the expand list of
        the network of the current phase.
        Layers without an expansion conv have no middle channels of their own and are left alone.
        """
        if self.expand_conv is None:
            return
        importance = self.project_conv.weight.abs().sum(dim=(0, 2, 3))
        if expand_stage > 0:
            ratios = sorted(self.expand_ratios, reverse=True)[:expand_choices]
            # A layer with fewer ratios than the stage asks for (per-layer expand choices) has fewer
            # bands: the last one it has is the smallest prefix any of its subnets uses.
            expand_stage = min(expand_stage, len(ratios) - 1)
            targets = [make_divisible(round(self.max_in * e), self.divisor) for e in ratios]
            right, base = len(importance), -len(targets) * 1e5
            for i in range(expand_stage + 1):
                left = targets[i]
                importance[left:right] += base
                base += 1e5
                right = left
        order = torch.sort(importance, dim=0, descending=True).indices
        self.project_conv.weight.copy_(self.project_conv.weight[:, order])
        _permute_bn(self.dw_bn, order)
        self.dw_conv.weight.copy_(self.dw_conv.weight[order])
        if self.se is not None:
            se = self.se
            se.expand.weight.copy_(se.expand.weight[order])
            se.expand.bias.copy_(se.expand.bias[order])
            se.reduce.weight.copy_(se.reduce.weight[:, order])
            se_order = torch.sort(se.expand.weight.abs().sum(dim=(0, 2, 3)), dim=0, descending=True).indices
            se.expand.weight.copy_(se.expand.weight[:, se_order])
            se.reduce.weight.copy_(se.reduce.weight[se_order])
            se.reduce.bias.copy_(se.reduce.bias[se_order])
        _permute_bn(self.expand_bn, order)
        self.expand_conv.weight.copy_(self.expand_conv.weight[order])

    def extra_repr(self) -> str:
        return f"stride={self.stride}, residual={self.residual}"


class MBConvBlock(nn.Module):
    """Static MBConv layer of an extracted subnet: plain PyTorch layers only."""

    def __init__(self, expand: nn.Sequential | None, depthwise: nn.Sequential, project: nn.Sequential, residual: bool):
        super().__init__()
        self.expand, self.depthwise, self.project = expand, depthwise, project
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


def _permute_bn(bn: ElasticBatchNorm2d, order: torch.Tensor) -> None:
    n = order.numel()
    for tensor in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        tensor[:n].copy_(tensor[:n][order])


def _copy(module: nn.Module) -> nn.Module:
    return type(module)()
