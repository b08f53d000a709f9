"""The elastic supernet (SPEC §3) and the static subnets it extracts."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .. import spaces
from ..spaces import Arch, SearchSpace
from . import packed, shared_prefix
from .activations import build_activation
from .elastic_batchnorm import ElasticBatchNorm2d
from .elastic_conv import ElasticConv2d, ElasticLinear
from .mbconv import ElasticMBConv


class Supernet(nn.Module):
    """Weight-sharing supernet over an MBConv :class:`~tofa_fast.spaces.SearchSpace`.

    Holds the weights of the largest subnet. :meth:`set_active` picks the subnet that
    :meth:`forward` computes; :meth:`extract` returns it as a standalone static model.

    Args:
        space: a :class:`SearchSpace` or the name of a preset.
        num_classes: classifier outputs.

    Shapes: ``forward`` takes (N, in_channels, H, W) — the caller resizes images to the active
    arch's resolution (the network is fully convolutional) — and returns (N, num_classes) logits.
    """

    def __init__(self, space: SearchSpace | str, num_classes: int = 1000):
        super().__init__()
        space = spaces.get(space) if isinstance(space, str) else space
        if not isinstance(space, SearchSpace):
            raise TypeError(f"space must be a SearchSpace or a preset name, got {type(space).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.space, self.num_classes = space, num_classes
        bn = dict(eps=space.bn_eps, momentum=space.bn_momentum)

        max_stem = max(space.stem.widths)
        self.stem_conv = ElasticConv2d(
            space.in_channels, max_stem, space.stem.kernel, space.stem.stride, padding=space.padding
        )
        self.stem_bn = ElasticBatchNorm2d(max_stem, **bn)
        self.stem_act = build_activation(space.stem.act)

        stages, max_in = [], max_stem
        for i, stage in enumerate(space.stages):
            layers = []
            for j in range(stage.max_depth):
                layers.append(ElasticMBConv(space, i, j, max_in))
                max_in = max(stage.widths)
            stages.append(nn.ModuleList(layers))
        self.stages = nn.ModuleList(stages)

        max_head = max(space.head.widths)
        max_final = space.final_channels(max_in, max_head)
        self.final_expand_conv = ElasticConv2d(max_in, max_final, 1)
        self.final_expand_bn = ElasticBatchNorm2d(max_final, **bn)
        self.head_act = build_activation(space.head.act)
        # Without a feature-mix conv (MobileNetV2, EfficientNet) the classifier reads the pooled final conv.
        self.feature_mix_conv = (
            ElasticConv2d(max_final, max_head, 1, bias=space.head.feature_mix_bias) if space.head.feature_mix else None
        )
        self.dropout = nn.Dropout(space.head.dropout)
        self.classifier = ElasticLinear(max_head, num_classes)
        self._init_weights()
        self.set_active(space.max_arch())

    def set_regularization(self, dropout: float | None = None, drop_connect: float | None = None) -> None:
        """Training-time regularisation: classifier dropout and residual drop-connect rates."""
        if dropout is not None:
            if not 0.0 <= dropout < 1.0:
                raise ValueError(f"dropout must be in [0, 1), got {dropout}")
            self.dropout.p = dropout
        if drop_connect is not None:
            if not 0.0 <= drop_connect < 1.0:
                raise ValueError(f"drop_connect must be in [0, 1), got {drop_connect}")
            for layers in self.stages:
                for layer in layers:
                    layer.drop_connect_rate = drop_connect

    @contextlib.contextmanager
    def pseudo_label_pass(self) -> Iterator[None]:
        """Within: the forward of a FixMatch teacher (TOFA's pseudo-labels, SPEC §7). Batch norm keeps
        its mode — in training it normalises with batch statistics, as the members do — but updates
        no running statistics (each member updates them once, in its own pass); dropout and residual
        drop-connect are off, so the pseudo-labels and their confidence mask carry no
        regularisation noise."""
        bns = [m for m in self.modules() if isinstance(m, ElasticBatchNorm2d)]
        layers = [layer for stage in self.stages for layer in stage]
        dropout, drop_connect = self.dropout.p, [layer.drop_connect_rate for layer in layers]
        self.dropout.p = 0.0
        for layer in layers:
            layer.drop_connect_rate = 0.0
        for bn in bns:
            bn.update_running_stats = False
        try:
            yield
        finally:
            self.dropout.p = dropout
            for layer, rate in zip(layers, drop_connect):
                layer.drop_connect_rate = rate
            for bn in bns:
                bn.update_running_stats = True

    def _init_weights(self) -> None:
        # MobileNetV3's initialisation (torchvision): He fan-out for convs, small normal for the classifier.
        for module in self.modules():
            if isinstance(module, ElasticConv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, ElasticLinear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)
            elif isinstance(module, ElasticMBConv):
                nn.init.kaiming_normal_(module.dw_conv.weight, mode="fan_out")

    # -- active subnet ------------------------------------------------------------------------

    def set_active(self, arch: Arch | Mapping[str, Any]) -> Arch:
        """Make ``forward`` compute ``arch`` (an :class:`Arch` or its dict form). Returns the Arch."""
        arch = self.space.check(arch)
        for layers, stage_arch in zip(self.stages, arch.stages):
            for j in range(stage_arch.depth):
                layers[j].set_active(stage_arch.kernel[j], stage_arch.expand[j], stage_arch.width)
        self.active_arch = arch
        return arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.space.in_channels, self.stem_conv.weight)
        arch = self.active_arch
        x = self.stem_bn(self.stem_conv(x, arch.stem), self.stem_act)
        for layers, stage_arch in zip(self.stages, arch.stages):
            for layer in layers[: stage_arch.depth]:
                x = layer(x)
        return self.classify(x, arch.head)

    def classify(self, x: torch.Tensor, head_width: int, batch_norm: Callable | None = None) -> torch.Tensor:
        """The head: final 1×1 expand conv + BN + act, global pool, feature-mix conv, dropout,
        classifier. x (N, C, H, W) is the last stage's output; returns (N, num_classes) logits.
        ``batch_norm(bn, y, activation)``, when given, runs the head's batch norm instead of
        ``bn(y, activation)`` (the shared-prefix step records its statistics)."""
        final = self.space.final_channels(x.shape[1], head_width)
        y = self.final_expand_conv(x, final)
        if batch_norm is None:
            x = self.final_expand_bn(y, self.head_act)
        else:
            x = batch_norm(self.final_expand_bn, y, self.head_act)
        x = x.mean((2, 3), keepdim=True)
        if self.feature_mix_conv is not None:
            x = self.head_act(self.feature_mix_conv(x, head_width))
        x = self.dropout(torch.flatten(x, 1))
        return self.classifier(x)

    def forward_many(
        self, inputs: Sequence[torch.Tensor], archs: Sequence[Arch | Mapping[str, Any]]
    ) -> list[torch.Tensor]:
        """Logits (N_i, num_classes) of ``archs[i]`` on ``inputs[i]`` (N_i, in_channels, H_i, W_i), all
        members in one packed pass (:mod:`tofa_fast.nn.packed`): the same values, gradients and BN
        running-statistics updates as ``set_active(archs[i])`` + ``forward(inputs[i])`` one member after
        the other, in fewer, larger calls. Members may differ in every dimension, resolution included.
        The active arch is left unchanged."""
        if len(inputs) != len(archs):
            raise ValueError(f"inputs and archs must have the same length, got {len(inputs)} and {len(archs)}")
        if not inputs:
            raise ValueError("forward_many needs at least one member")
        for x in inputs:
            _check_images(x, self.space.in_channels, self.stem_conv.weight)
        return packed.forward_many(self, list(inputs), [self.space.check(a) for a in archs])

    def backward_many(
        self,
        inputs: Sequence[torch.Tensor],
        archs: Sequence[Arch | Mapping[str, Any]],
        loss_of: Callable[[int, torch.Tensor], torch.Tensor | None],
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> list[torch.Tensor]:
        """Forward ``archs[i]`` on ``inputs[i]`` for every i and back-propagate each member's
        ``loss_of(i, logits_i)`` (None: nothing to back-propagate), computing once what members
        with the same images agree on (:mod:`tofa_fast.nn.shared_prefix`): the same gradients
        and BN running-statistics updates as the members' sequential passes, with the memory of
        the largest one. Returns the logits, detached. ``autocast`` (a context-manager factory,
        e.g. ``lambda: torch.autocast("cuda", torch.bfloat16)``) wraps the forward computations;
        the losses and backward run outside it. The active arch is left unchanged."""
        if len(inputs) != len(archs):
            raise ValueError(f"inputs and archs must have the same length, got {len(inputs)} and {len(archs)}")
        if not inputs:
            raise ValueError("backward_many needs at least one member")
        if not callable(loss_of):
            raise TypeError(f"loss_of must be a callable (i, logits) -> loss, got {type(loss_of).__name__}")
        for x in inputs:
            _check_images(x, self.space.in_channels, self.stem_conv.weight)
        return shared_prefix.backward_many(self, list(inputs), [self.space.check(a) for a in archs], loss_of, autocast)

    # -- extraction and channel sorting -------------------------------------------------------

    def extract(self, arch: Arch | Mapping[str, Any] | None = None) -> Subnet:
        """A standalone :class:`Subnet` of plain PyTorch layers computing ``arch`` (default: the
        active arch). Weights are copied (transforms baked in), so the two never alias."""
        arch = self.active_arch if arch is None else self.space.check(arch)
        previous = self.active_arch
        self.set_active(arch)
        try:
            stem = nn.Sequential(
                self.stem_conv.extract(self.space.in_channels, arch.stem),
                self.stem_bn.extract(arch.stem),
                type(self.stem_act)(),
            )
            blocks, width = [], arch.stem
            for layers, stage_arch in zip(self.stages, arch.stages):
                for layer in layers[: stage_arch.depth]:
                    blocks.append(layer.extract(width))
                    width = stage_arch.width
            final = self.space.final_channels(width, arch.head)
            mix = []
            if self.feature_mix_conv is not None:
                mix = [self.feature_mix_conv.extract(final, arch.head), type(self.head_act)()]
            head = nn.Sequential(
                self.final_expand_conv.extract(width, final),
                self.final_expand_bn.extract(final),
                type(self.head_act)(),
                nn.AdaptiveAvgPool2d(1),
                *mix,
                nn.Flatten(1),
                nn.Dropout(self.space.head.dropout),
                self.classifier.extract(arch.head),
            )
        finally:
            self.set_active(previous)
        subnet = Subnet(stem, nn.Sequential(*blocks), head, str(arch))
        return subnet.train(self.training).to(self.stem_conv.weight.device)

    @torch.no_grad()
    def sort_channels(self, expand_stage: int = 0, expand_choices: int | None = None) -> None:
        """Reorder every layer's middle channels by importance (OFA ``re_organize_middle_weights``
        with ``expand_ratio_stage=expand_stage`` on a network whose expand list is each layer's
        ``expand_choices`` largest ratios); the max subnet's output is unchanged. See
        :meth:`ElasticMBConv.sort_middle_channels`."""
        for layers in self.stages:
            for layer in layers:
                layer.sort_middle_channels(expand_stage, expand_choices)


def _check_images(x: Any, channels: int, weight: torch.Tensor) -> None:
    """SPEC §12: a wrong type, shape, dtype or device is named here, not by a convolution deep inside."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (N, {channels}, H, W), got {type(x).__name__}")
    if x.is_nested or x.layout != torch.strided:
        raise ValueError(f"x must be a dense tensor, got a {'nested' if x.is_nested else x.layout} one")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"x must have shape (N, {channels}, H, W), got {tuple(x.shape)}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"x must have non-empty spatial dims, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the supernet's weights are on {weight.device}")
    # Under autocast the convolutions cast x themselves (bf16 x with float32 master weights is fine).
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(
            f"x has dtype {x.dtype} but the supernet's weights {weight.dtype}; convert one, or run under torch.autocast"
        )


class Subnet(nn.Module):
    """A static subnet extracted from a :class:`Supernet`: stem, MBConv blocks, head.

    ``arch`` holds the canonical string of the arch it was extracted for.
    Shapes: (N, C, r, r) → (N, num_classes).
    """

    def __init__(self, stem: nn.Sequential, blocks: nn.Sequential, head: nn.Sequential, arch: str):
        super().__init__()
        self.stem, self.blocks, self.head = stem, blocks, head
        self.arch = arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))
