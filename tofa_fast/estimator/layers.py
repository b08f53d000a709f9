"""The three kinds of layer a subnet is made of, with their exact FLOPs and parameter counts.

A subnet extracted by :meth:`tofa_fast.Supernet.extract` is a stem, a chain of MBConv blocks and a
head (see ``tofa_fast/nn/supernet.py``). Each config below describes one of them by the shapes it
sees, which is all that FLOPs, parameters and (on a given device) latency depend on.

FLOPs follow ``fvcore.nn.FlopCountAnalysis`` on the extracted eval-mode subnet at batch 1, which counts
one multiply-add as one flop and, of the ops a subnet runs, only these (measured with
``analysis.by_operator()`` / ``unsupported_ops()`` on every preset, fvcore 0.1.5):

* ``aten::_convolution`` — ``C_out · C_in/groups · k² · H_out · W_out`` (bias ignored);
* ``aten::batch_norm`` in eval mode with affine parameters — ``2 · C · H · W``;
* ``aten::adaptive_avg_pool2d`` (the head's global pool) — ``C · H · W`` (its input size);
* ``aten::linear`` — ``in_features · out_features``.

It skips ``aten::mean`` (the squeeze-excite pool), ``mul`` (the SE gate), ``add`` (residuals) and
every activation (ReLU, hard-swish, hard-sigmoid), so they contribute nothing here either.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..spaces import SearchSpace


def conv_output_size(size: int, kernel: int, stride: int) -> int:
    """Output side of a conv with "same" padding ``kernel // 2`` (odd kernels): ``ceil(size / stride)``."""
    padding = kernel // 2
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True)
class StemConfig:
    """Stem: ``kernel``×``kernel`` conv (no bias) + BN + activation, ``size`` is the input side."""

    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    size: int
    act: str

    @property
    def out_size(self) -> int:
        return conv_output_size(self.size, self.kernel, self.stride)

    def flops(self) -> int:
        hw = self.out_size**2
        return self.out_channels * self.in_channels * self.kernel**2 * hw + 2 * self.out_channels * hw

    def params(self) -> int:
        return self.out_channels * self.in_channels * self.kernel**2 + 2 * self.out_channels

    @property
    def key(self) -> str:
        return (
            f"stem:in={self.in_channels},out={self.out_channels},k={self.kernel},s={self.stride},"
            f"hw={self.size},act={self.act}"
        )


@dataclass(frozen=True)
class MBConvConfig:
    """One MBConv block: [1×1 expand + BN + act] → k×k depthwise + BN + act → [SE] → 1×1 project + BN
    [+ input]. ``size`` is the input side; ``se_channels`` is 0 without squeeze-excite."""

    in_channels: int
    mid_channels: int
    out_channels: int
    kernel: int
    stride: int
    size: int
    expand_conv: bool
    se_channels: int
    act: str
    residual: bool

    @property
    def out_size(self) -> int:
        return conv_output_size(self.size, self.kernel, self.stride)

    def flops(self) -> int:
        hw_in, hw_out, mid = self.size**2, self.out_size**2, self.mid_channels
        total = 0
        if self.expand_conv:
            total += mid * self.in_channels * hw_in + 2 * mid * hw_in
        total += mid * self.kernel**2 * hw_out + 2 * mid * hw_out
        # SE: the two 1×1 convs run on a 1×1 map; fvcore ignores the mean, the gate and the product.
        total += 2 * mid * self.se_channels
        total += self.out_channels * mid * hw_out + 2 * self.out_channels * hw_out
        return total

    def params(self) -> int:
        mid = self.mid_channels
        total = 0
        if self.expand_conv:
            total += self.in_channels * mid + 2 * mid
        total += mid * self.kernel**2 + 2 * mid
        if self.se_channels:
            total += 2 * mid * self.se_channels + self.se_channels + mid  # both SE convs have a bias
        total += mid * self.out_channels + 2 * self.out_channels
        return total

    @property
    def key(self) -> str:
        return (
            f"mbconv:in={self.in_channels},mid={self.mid_channels},out={self.out_channels},k={self.kernel},"
            f"s={self.stride},hw={self.size},expand={int(self.expand_conv)},se={self.se_channels},"
            f"act={self.act},res={int(self.residual)}"
        )


@dataclass(frozen=True)
class HeadConfig:
    """Head: 1×1 conv to ``final_channels`` + BN + act, global average pool, 1×1 feature-mix conv to
    ``head_channels`` (bias only with ``feature_mix_bias``) + act, flatten, dropout, linear classifier.
    ``size`` is the input side. Without ``feature_mix`` (MobileNetV2, EfficientNet) there is no
    feature-mix conv: ``head_channels`` equals ``final_channels`` and the classifier reads the pool."""

    in_channels: int
    final_channels: int
    head_channels: int
    num_classes: int
    size: int
    act: str
    feature_mix_bias: bool = False
    feature_mix: bool = True

    def flops(self) -> int:
        hw, final = self.size**2, self.final_channels
        mix = self.head_channels * final if self.feature_mix else 0
        return (
            final * self.in_channels * hw
            + 2 * final * hw
            + final * hw  # adaptive_avg_pool2d counts its input elements
            + mix
            + self.num_classes * self.head_channels
        )

    def params(self) -> int:
        final = self.final_channels
        mix = final * self.head_channels + (self.head_channels if self.feature_mix_bias else 0)
        return (
            self.in_channels * final
            + 2 * final
            + (mix if self.feature_mix else 0)
            + self.head_channels * self.num_classes
            + self.num_classes
        )

    @property
    def key(self) -> str:
        # Heads with a feature-mix conv keep the keys of latency tables written before the option.
        mix = "" if self.feature_mix else ",mix=0"
        return (
            f"head:in={self.in_channels},final={self.final_channels},head={self.head_channels},"
            f"classes={self.num_classes},hw={self.size},act={self.act},bias={int(self.feature_mix_bias)}{mix}"
        )


LayerConfig = StemConfig | MBConvConfig | HeadConfig


# ----------------------------------------------------------------------------------------------
# Configs of a space, position by position
# ----------------------------------------------------------------------------------------------


def stem_config(space: SearchSpace, resolution: int, width: int) -> StemConfig:
    stem = space.stem
    return StemConfig(space.in_channels, width, stem.kernel, stem.stride, resolution, stem.act)


def stage_input_sizes(space: SearchSpace, resolution: int) -> list[int]:
    """Feature-map side entering each stage (strides only; conv output sides do not depend on k)."""
    size = conv_output_size(resolution, space.stem.kernel, space.stem.stride)
    sizes = []
    for stage in space.stages:
        sizes.append(size)
        size = conv_output_size(size, 1, stage.stride)
    return sizes + [size]


def mbconv_config(
    space: SearchSpace,
    stage_index: int,
    layer_index: int,
    size: int,
    in_channels: int,
    width: int,
    kernel: int,
    expand: float,
) -> MBConvConfig:
    """The block at ``stages[stage_index][layer_index]`` with the given choices; ``size`` is the side
    of the map entering the *stage* (the first layer may stride it)."""
    stage = space.stages[stage_index]
    stride = stage.stride if layer_index == 0 else 1
    if layer_index > 0:
        size = conv_output_size(size, 1, stage.stride)
        in_channels = width
    mid = space.middle_channels(stage_index, in_channels, expand)
    return MBConvConfig(
        in_channels=in_channels,
        mid_channels=mid,
        out_channels=width,
        kernel=kernel,
        stride=stride,
        size=size,
        expand_conv=stage.has_expansion,
        se_channels=space.se_channels(mid) if stage.se else 0,
        act=stage.act,
        residual=space.has_residual(stage_index, layer_index),
    )


def head_config(space: SearchSpace, resolution: int, last_width: int, head_width: int, num_classes: int) -> HeadConfig:
    size = stage_input_sizes(space, resolution)[-1]
    return HeadConfig(
        last_width,
        space.final_channels(last_width, head_width),
        head_width,
        num_classes,
        size,
        space.head.act,
        space.head.feature_mix_bias,
        space.head.feature_mix,
    )


def arch_layers(space: SearchSpace, arch, num_classes: int) -> list[LayerConfig]:
    """The layers of the subnet ``Supernet(space, num_classes).extract(arch)``, in order.

    The pure-Python reference of the estimator: ``sum(c.flops() for c in arch_layers(...))`` is what
    the table lookups must reproduce.
    """
    arch = space.check(arch)
    sizes = stage_input_sizes(space, arch.resolution)
    layers: list[LayerConfig] = [stem_config(space, arch.resolution, arch.stem)]
    width = arch.stem
    for s, stage_arch in enumerate(arch.stages):
        for j in range(stage_arch.depth):
            layers.append(
                mbconv_config(
                    space, s, j, sizes[s], width, stage_arch.width, stage_arch.kernel[j], stage_arch.expand[j]
                )
            )
        width = stage_arch.width
    layers.append(head_config(space, arch.resolution, width, arch.head, num_classes))
    return layers
