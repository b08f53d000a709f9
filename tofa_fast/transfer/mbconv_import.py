"""Pretrained MBConv networks → supernets whose max subnet *is* the network (SPEC §9), BootstrapNAS-style.

Every source shares this machinery; a reader per source (:mod:`.torchvision_mbv3`,
:mod:`.torchvision_mbv2`, :mod:`.efficientnet_lite`) only describes its network as a
:class:`PretrainedMBConvNet` — the shapes of each part and where its tensors live in the source's
state dict. From that description this module derives the search space, maps the keys, copies the
weights and sorts channels by importance.

The derived space: each run of consecutive inverted-residual blocks with the same output width (and
kernel, activation, squeeze-excite, expansion, stride 1 and a shortcut after the first) becomes one
stage whose largest choices are the pretrained blocks themselves; smaller choices are

* **kernel**: centred windows of the pretrained kernel (5 → {3, 5}; 3 → {3}), no transform matrices;
* **expand**: per layer, the fractions ``expand_fractions`` of that layer's middle width, rounded to
  multiples of 8, written as the expand ratios ``mid / in`` that the channel rule
  ``make_divisible(round(in · e), 8)`` maps back to exactly those widths;
* **depth**: the first ``n − max_depth_drop … n`` blocks of a stage of ``n`` blocks (at least 1);
* **width**: the fractions ``width_fractions`` of a stage's output width (rounded to multiples of 8),
  where every layer reading that width has a 1×1 expansion conv to slice and no shortcut depends on
  it (a stage whose first block adds its input, or whose readers lack an expansion, keeps its width).

Channels are then sorted by importance, so that every prefix keeps the most important ones: middle
channels by the L1 norm of the projection reading them (OFA's ``re_organize_middle_weights``), stage
widths by the L1 norm of every 1×1 conv reading them. Both are permutations applied consistently to
writers and readers, so the max subnet computes exactly what the pretrained network computes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..nn import Supernet
from ..spaces import HeadSpec, SearchSpace, StageSpec, StemSpec, make_divisible
from .state_dict_mapping import check_keys, copy_mapped

BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

#: Resolutions of a derived space unless the caller chooses: OFA's MobileNetV3 range.
DEFAULT_RESOLUTIONS: tuple[int, ...] = tuple(range(128, 225, 4))


@dataclass(frozen=True)
class ConvBN:
    """A bias-free convolution and the batch norm after it: their keys in the source's state dict
    and the conv's shape."""

    conv: str  # key of the conv weight
    bn: str  # key prefix of the BN: ``{bn}.weight``, ``{bn}.running_mean``, …
    in_channels: int
    out_channels: int
    kernel: int
    stride: int

    @classmethod
    def of(cls, conv: nn.Conv2d, conv_key: str, bn_prefix: str) -> ConvBN:
        return cls(conv_key, bn_prefix, conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0])


@dataclass(frozen=True)
class PretrainedBlock:
    """One pretrained inverted-residual block: its convolutions, activation, shortcut and squeeze-excite."""

    expand: ConvBN | None  # None: the depthwise conv reads the input directly
    depthwise: ConvBN
    project: ConvBN
    act: str
    residual: bool
    se_channels: int = 0  # 0 without squeeze-excite
    se: tuple[str, str] | None = None  # key prefixes of the SE reduce and expand convs (weight + bias each)

    @property
    def in_channels(self) -> int:
        return (self.expand or self.depthwise).in_channels

    @property
    def mid_channels(self) -> int:
        return self.depthwise.in_channels

    @property
    def out_channels(self) -> int:
        return self.project.out_channels

    @property
    def kernel(self) -> int:
        return self.depthwise.kernel

    @property
    def stride(self) -> int:
        return self.depthwise.stride


@dataclass(frozen=True)
class PretrainedMBConvNet:
    """A pretrained MBConv network as a reader sees it: stem conv-BN-act, blocks, final 1×1
    conv-BN-act, global pool, optional feature-mix linear + act, dropout, classifier.

    ``feature_mix`` holds the keys of the weight and bias (``None`` without one) of a linear layer on
    the pooled features and its width (MobileNetV3); ``None`` when the classifier reads the pool
    (MobileNetV2, EfficientNet). ``bn`` is the (eps, momentum) every BN shares, ``normalisation`` the
    (mean, std) of [0, 1] images the weights were trained with, ``width_fractions`` the default
    stage-width choices for this kind of network.
    """

    source: str  # how error messages name the network, e.g. "torchvision MobileNetV2"
    default_name: str  # the derived space's name unless the caller gives one
    stem: ConvBN
    stem_act: str
    blocks: tuple[PretrainedBlock, ...]
    final: ConvBN
    head_act: str
    feature_mix: tuple[str, str | None, int] | None
    dropout: float
    classifier: tuple[str, str]  # keys of the classifier's weight and bias
    bn: tuple[float, float]
    padding: str
    normalisation: tuple[tuple[float, ...], tuple[float, ...]]
    width_fractions: tuple[float, ...]

    @property
    def head_channels(self) -> int:
        """The width the classifier reads: the feature mix's, or the final conv's without one."""
        return self.final.out_channels if self.feature_mix is None else self.feature_mix[2]


def group_into_stages(blocks: Sequence[PretrainedBlock]) -> list[list[PretrainedBlock]]:
    """Consecutive blocks that can share a stage: same width, kernel, activation, SE and expansion
    presence, and stride 1 with a shortcut after the first (our stages hold one of each per stage)."""
    stages: list[list[PretrainedBlock]] = []
    for b in blocks:
        head = stages[-1][0] if stages else None
        same = (
            head is not None
            and b.stride == 1
            and b.residual
            and b.in_channels == b.out_channels == head.out_channels
            and (b.kernel, b.act, b.se_channels > 0, b.expand is not None)
            == (head.kernel, head.act, head.se_channels > 0, head.expand is not None)
        )
        if same:
            stages[-1].append(b)
        else:
            stages.append([b])
    return stages


def _expand_choices(b: PretrainedBlock, fractions: Sequence[float]) -> tuple[float, ...]:
    if b.expand is None:
        return (1,)
    mids = {make_divisible(b.mid_channels * f, 8) for f in fractions} | {b.mid_channels}
    # Ratios below 1 would need a narrower middle than the input; our spaces do not allow them.
    return tuple(sorted(m / b.in_channels for m in mids if b.in_channels <= m <= b.mid_channels))


def _elastic_width_ok(groups: list[list[PretrainedBlock]], s: int) -> bool:
    """Whether stage ``s``'s output width can be a prefix: every reader slices it through a 1×1
    expansion (or it is the head's), and no shortcut needs it fixed (module docstring)."""
    group = groups[s]
    if group[0].residual or (len(group) > 1 and group[0].expand is None):
        return False
    if s + 1 == len(groups):
        return True
    reader = groups[s + 1][0]
    return reader.expand is not None and not reader.residual


def _width_choices(width: int, fractions: Sequence[float]) -> tuple[int, ...]:
    return tuple(
        sorted({make_divisible(width * f, 8) for f in fractions if make_divisible(width * f, 8) <= width} | {width})
    )


def _check_fractions(name: str, fractions: Sequence[float]) -> None:
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise ValueError(f"{name} must be a non-empty list of fractions in (0, 1], got {list(fractions)}")


def derive_space(
    net: PretrainedMBConvNet,
    name: str | None = None,
    resolutions: Sequence[int] = DEFAULT_RESOLUTIONS,
    expand_fractions: Sequence[float] = (0.5, 0.75, 1.0),
    max_depth_drop: int = 2,
    width_fractions: Sequence[float] | None = None,
) -> tuple[SearchSpace, dict[str, str]]:
    """The search space derived from ``net`` (module docstring; ``width_fractions`` ``None`` takes
    ``net.width_fractions``) and the map our state-dict key → the source's key that loads the max
    subnet with the pretrained weights.

    Raises:
        ValueError: options out of range, or a network our channel rules cannot reproduce exactly
            (the message names the block and the widths).
    """
    width_fractions = net.width_fractions if width_fractions is None else width_fractions
    _check_fractions("expand_fractions", expand_fractions)
    _check_fractions("width_fractions", width_fractions)
    if max_depth_drop < 0:
        raise ValueError(f"max_depth_drop must be ≥ 0, got {max_depth_drop}")
    groups = group_into_stages(net.blocks)
    stage_specs, key_map = [], {}
    key_map["stem_conv.weight"] = net.stem.conv
    key_map.update({f"stem_bn.{f}": f"{net.stem.bn}.{f}" for f in BN_FIELDS})
    for s, group in enumerate(groups):
        per_layer = [_expand_choices(b, expand_fractions) for b in group]
        union = tuple(sorted(set().union(*per_layer)))
        n, width = len(group), group[0].out_channels
        elastic = _elastic_width_ok(groups, s)
        stage_specs.append(
            StageSpec(
                widths=_width_choices(width, width_fractions) if elastic else (width,),
                depths=tuple(range(max(1, n - max_depth_drop), n + 1)),
                kernels=tuple(range(3 if group[0].kernel >= 3 else 1, group[0].kernel + 1, 2)),
                expands=union,
                stride=group[0].stride,
                se=group[0].se_channels > 0,
                act=group[0].act,
                layer_expands=None if all(c == union for c in per_layer) else tuple(per_layer),
            )
        )
        for j, b in enumerate(group):
            ours = f"stages.{s}.{j}"
            parts = [("dw", b.depthwise), ("project", b.project)] + ([("expand", b.expand)] if b.expand else [])
            for part, keys in parts:
                key_map[f"{ours}.{part}_conv.weight"] = keys.conv
                key_map.update({f"{ours}.{part}_bn.{f}": f"{keys.bn}.{f}" for f in BN_FIELDS})
            if b.se is not None:
                for conv, theirs in zip(("reduce", "expand"), b.se):
                    for f in ("weight", "bias"):
                        key_map[f"{ours}.se.{conv}.{f}"] = f"{theirs}.{f}"
    key_map["final_expand_conv.weight"] = net.final.conv
    key_map.update({f"final_expand_bn.{f}": f"{net.final.bn}.{f}" for f in BN_FIELDS})
    if net.feature_mix is not None:
        key_map["feature_mix_conv.weight"] = net.feature_mix[0]
        if net.feature_mix[1] is not None:
            key_map["feature_mix_conv.bias"] = net.feature_mix[1]
    key_map["classifier.weight"], key_map["classifier.bias"] = net.classifier

    stem, last = net.stem, net.blocks[-1].out_channels
    space = SearchSpace(
        name=name or net.default_name,
        resolutions=tuple(resolutions),
        stem=StemSpec(widths=(stem.out_channels,), stride=stem.stride, kernel=stem.kernel, act=net.stem_act),
        stages=tuple(stage_specs),
        head=HeadSpec(
            widths=(net.head_channels,),
            expand=net.final.out_channels / last,
            act=net.head_act,
            dropout=net.dropout,
            feature_mix_bias=net.feature_mix is not None and net.feature_mix[1] is not None,
            feature_mix=net.feature_mix is not None,
        ),
        granularity="layer",
        kernel_transform=False,
        in_channels=stem.in_channels,
        bn_eps=net.bn[0],
        bn_momentum=net.bn[1],
        padding=net.padding,
        input_mean=net.normalisation[0],
        input_std=net.normalisation[1],
    )
    _check_expressible(space, net)
    return space, key_map


def _check_expressible(space: SearchSpace, net: PretrainedMBConvNet) -> None:
    """Our channel and shortcut rules must reproduce every pretrained block, or the max subnet would differ."""
    layers = [(s, j) for s, st in enumerate(space.stages) for j in range(st.max_depth)]
    for i, ((s, j), b) in enumerate(zip(layers, net.blocks)):
        where = f"{net.source} block {i}"
        mid = space.middle_channels(s, b.in_channels, b.mid_channels / b.in_channels if b.expand else 1)
        if mid != b.mid_channels:
            raise ValueError(f"{where}: {b.mid_channels} middle channels map to {mid} under our rule")
        if b.se_channels and space.se_channels(b.mid_channels) != b.se_channels:
            raise ValueError(
                f"{where}: squeeze-excite of {b.se_channels} channels on {b.mid_channels}; "
                f"our rule gives {space.se_channels(b.mid_channels)}"
            )
        if space.has_residual(s, j) != b.residual:
            raise ValueError(f"{where}: its shortcut ({b.residual}) is not expressible in the derived stage")
    final = space.final_channels(net.blocks[-1].out_channels, net.head_channels)
    if final != net.final.out_channels:
        raise ValueError(
            f"{net.source}: final conv width {net.final.out_channels} is not expressible (our rule gives {final})"
        )


def convert(
    net: PretrainedMBConvNet,
    state: Mapping[str, torch.Tensor],
    num_classes: int | None = None,
    name: str | None = None,
    resolutions: Sequence[int] = DEFAULT_RESOLUTIONS,
    expand_fractions: Sequence[float] = (0.5, 0.75, 1.0),
    max_depth_drop: int = 2,
    sort_channels: bool = True,
    width_fractions: Sequence[float] | None = None,
) -> Supernet:
    """The supernet on the space :func:`derive_space` derives from ``net``, holding ``state`` (the
    source's state dict); the public converters' arguments are documented there.

    ``num_classes`` ``None`` keeps the pretrained classifier; an int gives a freshly initialised one.
    With ``sort_channels``, middle channels and elastic stage widths are sorted by importance.
    Returns the supernet in eval mode.
    """
    space, key_map = derive_space(net, name, resolutions, expand_fractions, max_depth_drop, width_fractions)
    pretrained_classes = state[net.classifier[0]].shape[0]
    supernet = Supernet(space, num_classes=pretrained_classes if num_classes is None else num_classes)
    what = f"{net.source} → supernet {space.name!r}"
    if set(supernet.state_dict()) != set(key_map):
        raise RuntimeError(f"{what}: the key map does not cover the supernet's state dict (a bug in tofa_fast)")
    check_keys(set(state), set(key_map.values()), what)
    skip = {"classifier.weight", "classifier.bias"} if num_classes is not None else set()
    copy_mapped(supernet, state, key_map, what, skip)
    if sort_channels:
        supernet.sort_channels()
        sort_stage_widths(supernet)
    return supernet.eval()


@torch.no_grad()
def sort_stage_widths(net: Supernet) -> None:
    """Permute the output channels of every elastic-width stage by importance — the L1 norm of the
    1×1 convs reading them (the later layers' expansions and the next stage's, or the head's) —
    in every writer (projections and their BN) and reader alike, so the max subnet is unchanged
    and each width prefix keeps the most read channels."""
    for s, stage in enumerate(net.space.stages):
        if len(stage.widths) == 1:
            continue
        layers = list(net.stages[s])
        following = net.stages[s + 1][0].expand_conv if s + 1 < len(net.stages) else net.final_expand_conv
        readers = [layer.expand_conv for layer in layers[1:]] + [following]
        if any(r is None for r in readers):
            raise ValueError(f"stage {s} has elastic widths but a layer reads them without a 1×1 expansion conv")
        importance = sum(r.weight.abs().sum(dim=(0, 2, 3)) for r in readers)
        order = torch.sort(importance, descending=True, stable=True).indices
        for layer in layers:
            layer.project_conv.weight.copy_(layer.project_conv.weight[order])
            bn = layer.project_bn
            for tensor in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                tensor.copy_(tensor[order])
        for reader in readers:
            reader.weight.copy_(reader.weight[:, order])


def conv_bn_parts(module: nn.Module, where: str) -> tuple[nn.Conv2d, nn.BatchNorm2d, nn.Module | None]:
    """Unpack a ``Conv2d, BatchNorm2d[, activation]`` sequence (torchvision's ``Conv2dNormActivation``),
    checking what every reader relies on: no bias before BN, no dilation, a square kernel."""
    parts = list(module.children()) if isinstance(module, nn.Sequential) else []
    if len(parts) not in (2, 3) or not isinstance(parts[0], nn.Conv2d) or not isinstance(parts[1], nn.BatchNorm2d):
        raise ValueError(f"{where}: expected Conv2d + BatchNorm2d [+ activation], got {module.__class__.__name__}")
    check_conv(parts[0], where)
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def check_conv(conv: nn.Conv2d, where: str, padding: str = "symmetric") -> None:
    """A bias-free, undilated square conv padded the way ``padding`` says (SearchSpace.padding)."""
    if conv.dilation != (1, 1):
        raise ValueError(f"{where}: dilated convolutions (dilation {conv.dilation}) are not supported")
    if conv.bias is not None:
        raise ValueError(f"{where}: convolutions followed by BN must not have a bias")
    k = conv.kernel_size[0]
    expected = (k // 2,) * 2 if padding == "symmetric" else (0, 0)
    if conv.kernel_size[1] != k or tuple(conv.padding) != expected:
        raise ValueError(f"{where}: expected a square kernel with {padding!r} padding, got {conv}")


def activation_name(module: nn.Module | None, where: str, allowed: Sequence[str] = ("relu", "relu6", "hswish")) -> str:
    """``relu`` | ``relu6`` | ``hswish`` (``none`` for ``None``), limited to ``allowed``."""
    names = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hswish"}
    name = "none" if module is None else names.get(type(module))
    if name is None or (module is not None and name not in allowed):
        raise ValueError(f"{where}: unsupported activation {type(module).__name__} (supported: {', '.join(allowed)})")
    return name


def bn_settings(model: nn.Module, source: str) -> tuple[float, float]:
    """(eps, momentum) shared by every BatchNorm2d of ``model`` (our spaces have one setting)."""
    settings = {(bn.eps, bn.momentum) for bn in model.modules() if isinstance(bn, nn.BatchNorm2d)}
    if len(settings) != 1:
        raise ValueError(f"{source}: all BatchNorm2d layers must share eps and momentum, found {sorted(settings)}")
    return settings.pop()
