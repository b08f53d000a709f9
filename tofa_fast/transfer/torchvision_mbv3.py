"""torchvision MobileNetV3 (large / small) → a supernet whose max subnet *is* that network (SPEC §9).

The search space is derived from the model, BootstrapNAS-style: each group of consecutive inverted
residual blocks with the same output width (and kernel, activation, SE, stride 1 after the first)
becomes one stage whose largest choices are the torchvision blocks themselves; smaller choices are

* **kernel**: centred windows of the torchvision kernel (5 → {3, 5}; 3 → {3}), no transform matrices;
* **expand**: per layer, the fractions ``expand_fractions`` of that layer's middle width, rounded to
  multiples of 8, written as the expand ratios ``mid / in`` that our channel rule
  ``make_divisible(round(in · e), 8)`` maps back to exactly those widths (MobileNetV3-Large's
  200/80 = 2.5 and 184/80 = 2.3 included);
* **depth**: the first ``n − max_depth_drop … n`` blocks of a stage of ``n`` blocks (at least 1).

Middle channels are sorted by importance (L1 norm of the projection, OFA's
``re_organize_middle_weights``) after loading, so each smaller expand choice keeps the most important
channels; the max subnet's output is unchanged by the permutation.

torchvision's classifier ``Linear(960→1280) · Hardswish · Dropout · Linear`` on pooled features is our
head's feature-mix 1×1 conv (with a bias: ``HeadSpec.feature_mix_bias``) · act · dropout · classifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..nn import Supernet
from ..spaces import HeadSpec, SearchSpace, StageSpec, StemSpec, make_divisible
from .state_dict_mapping import check_keys, copy_mapped

_BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

#: Resolutions of a derived space unless the caller chooses: OFA's MobileNetV3 range.
DEFAULT_RESOLUTIONS: tuple[int, ...] = tuple(range(128, 225, 4))


@dataclass(frozen=True)
class _Block:
    """What we read off one torchvision ``InvertedResidual``: shapes and the key prefix of each part."""

    in_channels: int
    mid_channels: int
    out_channels: int
    kernel: int
    stride: int
    act: str
    se_channels: int  # 0 without squeeze-excite
    expand: str | None  # key prefixes inside ``model.state_dict()``
    depthwise: str
    se: str | None
    project: str


def _activation_name(module: nn.Module, where: str) -> str:
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.Hardswish):
        return "hswish"
    raise ValueError(f"{where}: unsupported activation {type(module).__name__} (expected ReLU or Hardswish)")


def _conv_bn_act(module: nn.Module, where: str) -> tuple[nn.Conv2d, nn.BatchNorm2d, str]:
    """Unpack a torchvision ``Conv2dNormActivation`` (conv, BN, optional activation)."""
    parts = list(module.children()) if isinstance(module, nn.Sequential) else []
    if len(parts) not in (2, 3) or not isinstance(parts[0], nn.Conv2d) or not isinstance(parts[1], nn.BatchNorm2d):
        raise ValueError(f"{where}: expected Conv2d + BatchNorm2d [+ activation], got {module.__class__.__name__}")
    conv = parts[0]
    if conv.dilation != (1, 1):
        raise ValueError(f"{where}: dilated convolutions (dilation {conv.dilation}) are not supported")
    if conv.bias is not None:
        raise ValueError(f"{where}: convolutions followed by BN must not have a bias")
    if conv.padding != (conv.kernel_size[0] // 2,) * 2 or conv.kernel_size[0] != conv.kernel_size[1]:
        raise ValueError(f"{where}: expected a square kernel with 'same' padding, got {conv}")
    act = _activation_name(parts[2], where) if len(parts) == 3 else "none"
    return conv, parts[1], act


def _read_block(block: nn.Module, prefix: str) -> _Block:
    from torchvision.ops.misc import SqueezeExcitation

    children = list(block.block.named_children())
    se_index = next((i for i, (_, m) in enumerate(children) if isinstance(m, SqueezeExcitation)), None)
    convs = [(name, m) for name, m in children if not isinstance(m, SqueezeExcitation)]
    if len(convs) not in (2, 3):
        raise ValueError(f"{prefix}: expected [expand,] depthwise, [SE,] project; got {len(children)} parts")
    expand = convs[0] if len(convs) == 3 else None
    (dw_name, dw_module), (pj_name, pj_module) = convs[-2], convs[-1]
    dw, _, act = _conv_bn_act(dw_module, f"{prefix}.block.{dw_name}")
    pj, _, pj_act = _conv_bn_act(pj_module, f"{prefix}.block.{pj_name}")
    if dw.groups != dw.in_channels or dw.out_channels != dw.in_channels:
        raise ValueError(f"{prefix}.block.{dw_name}: expected a depthwise conv, got {dw}")
    if pj.kernel_size != (1, 1) or pj_act != "none":
        raise ValueError(f"{prefix}.block.{pj_name}: expected a linear 1×1 projection")
    in_channels = dw.in_channels
    if expand is not None:
        ex, _, ex_act = _conv_bn_act(expand[1], f"{prefix}.block.{expand[0]}")
        if ex.kernel_size != (1, 1) or ex_act != act:
            raise ValueError(f"{prefix}.block.{expand[0]}: expected a 1×1 expansion with the depthwise's activation")
        in_channels = ex.in_channels
    se_channels, se_prefix = 0, None
    if se_index is not None:
        se_name, se = children[se_index]
        if not isinstance(se.activation, nn.ReLU) or not isinstance(se.scale_activation, nn.Hardsigmoid):
            raise ValueError(f"{prefix}.block.{se_name}: only ReLU / Hardsigmoid squeeze-excite is supported")
        se_channels, se_prefix = se.fc1.out_channels, f"{prefix}.block.{se_name}"
    residual = getattr(block, "use_res_connect", None)
    stride = dw.stride[0]
    if residual is not None and residual != (stride == 1 and in_channels == pj.out_channels):
        raise ValueError(f"{prefix}: unexpected residual connection setting {residual}")
    return _Block(
        in_channels=in_channels,
        mid_channels=dw.in_channels,
        out_channels=pj.out_channels,
        kernel=dw.kernel_size[0],
        stride=stride,
        act=act,
        se_channels=se_channels,
        expand=f"{prefix}.block.{expand[0]}" if expand is not None else None,
        depthwise=f"{prefix}.block.{dw_name}",
        se=se_prefix,
        project=f"{prefix}.block.{pj_name}",
    )


def _group_into_stages(blocks: list[_Block]) -> list[list[_Block]]:
    """Consecutive blocks that can share a stage: same width, kernel, activation, SE and expansion
    presence, and stride 1 after the first (our stages hold one of each per stage)."""
    stages: list[list[_Block]] = []
    for b in blocks:
        head = stages[-1][0] if stages else None
        same = (
            head is not None
            and b.stride == 1
            and b.in_channels == b.out_channels == head.out_channels
            and (b.kernel, b.act, b.se_channels > 0, b.expand is not None)
            == (head.kernel, head.act, head.se_channels > 0, head.expand is not None)
        )
        if same:
            stages[-1].append(b)
        else:
            stages.append([b])
    return stages


def _expand_choices(b: _Block, fractions: Sequence[float]) -> tuple[float, ...]:
    if b.expand is None:
        return (1,)
    mids = {make_divisible(b.mid_channels * f, 8) for f in fractions} | {b.mid_channels}
    # Ratios below 1 would need a narrower middle than the input; our spaces do not allow them.
    return tuple(sorted(m / b.in_channels for m in mids if m <= b.mid_channels and m >= b.in_channels))


def torchvision_space(
    model: nn.Module,
    name: str = "torchvision_mobilenet_v3",
    resolutions: Sequence[int] = DEFAULT_RESOLUTIONS,
    expand_fractions: Sequence[float] = (0.5, 0.75, 1.0),
    max_depth_drop: int = 2,
) -> SearchSpace:
    """The search space :func:`from_torchvision` derives from a torchvision MobileNetV3 (see module doc)."""
    return _derive(model, name, resolutions, expand_fractions, max_depth_drop)[0]


def _derive(
    model: nn.Module,
    name: str,
    resolutions: Sequence[int],
    expand_fractions: Sequence[float],
    max_depth_drop: int,
) -> tuple[SearchSpace, dict[str, str]]:
    from torchvision.models.mobilenetv3 import InvertedResidual, MobileNetV3

    if not isinstance(model, MobileNetV3):
        raise TypeError(
            f"from_torchvision takes a torchvision MobileNetV3 (mobilenet_v3_large / mobilenet_v3_small), "
            f"got {type(model).__name__}"
        )
    if not all(0 < f <= 1 for f in expand_fractions):
        raise ValueError(f"expand_fractions must lie in (0, 1], got {list(expand_fractions)}")
    if max_depth_drop < 0:
        raise ValueError(f"max_depth_drop must be ≥ 0, got {max_depth_drop}")
    features = list(model.features.children())
    stem_conv, stem_bn, stem_act = _conv_bn_act(features[0], "features.0")
    last_conv, last_bn, last_act = _conv_bn_act(features[-1], f"features.{len(features) - 1}")
    blocks = []
    for i, block in enumerate(features[1:-1], start=1):
        if not isinstance(block, InvertedResidual):
            raise ValueError(f"features.{i}: expected an InvertedResidual block, got {type(block).__name__}")
        blocks.append(_read_block(block, f"features.{i}"))
    classifier = list(model.classifier.children())
    if (
        len(classifier) != 4
        or not isinstance(classifier[0], nn.Linear)
        or not isinstance(classifier[2], nn.Dropout)
        or not isinstance(classifier[3], nn.Linear)
    ):
        raise ValueError("classifier: expected Linear, activation, Dropout, Linear (torchvision MobileNetV3)")
    head_act = _activation_name(classifier[1], "classifier.1")
    if last_act != head_act:
        raise ValueError(f"features[-1] uses {last_act} but classifier.1 uses {head_act}; our head shares one")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if len({(bn.eps, bn.momentum) for bn in bns}) != 1:
        raise ValueError("all BatchNorm2d layers must share eps and momentum")

    stage_specs, key_map = [], {}
    key_map["stem_conv.weight"] = "features.0.0.weight"
    key_map.update({f"stem_bn.{f}": f"features.0.1.{f}" for f in _BN_FIELDS})
    for s, group in enumerate(_group_into_stages(blocks)):
        per_layer = [_expand_choices(b, expand_fractions) for b in group]
        union = tuple(sorted(set().union(*per_layer)))
        n = len(group)
        stage_specs.append(
            StageSpec(
                widths=(group[0].out_channels,),
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
            pairs = {f"{ours}.dw_conv.weight": f"{b.depthwise}.0.weight"}
            pairs[f"{ours}.project_conv.weight"] = f"{b.project}.0.weight"
            for f in _BN_FIELDS:
                pairs[f"{ours}.dw_bn.{f}"] = f"{b.depthwise}.1.{f}"
                pairs[f"{ours}.project_bn.{f}"] = f"{b.project}.1.{f}"
            if b.expand is not None:
                pairs[f"{ours}.expand_conv.weight"] = f"{b.expand}.0.weight"
                pairs.update({f"{ours}.expand_bn.{f}": f"{b.expand}.1.{f}" for f in _BN_FIELDS})
            if b.se is not None:
                for conv, tv in (("reduce", "fc1"), ("expand", "fc2")):
                    for f in ("weight", "bias"):
                        pairs[f"{ours}.se.{conv}.{f}"] = f"{b.se}.{tv}.{f}"
            key_map.update(pairs)
    last = len(features) - 1
    key_map["final_expand_conv.weight"] = f"features.{last}.0.weight"
    key_map.update({f"final_expand_bn.{f}": f"features.{last}.1.{f}" for f in _BN_FIELDS})
    key_map["feature_mix_conv.weight"] = "classifier.0.weight"
    key_map["feature_mix_conv.bias"] = "classifier.0.bias"
    key_map["classifier.weight"] = "classifier.3.weight"
    key_map["classifier.bias"] = "classifier.3.bias"

    space = SearchSpace(
        name=name,
        resolutions=tuple(resolutions),
        stem=StemSpec(
            widths=(stem_conv.out_channels,), stride=stem_conv.stride[0], kernel=stem_conv.kernel_size[0], act=stem_act
        ),
        stages=tuple(stage_specs),
        head=HeadSpec(
            widths=(classifier[0].out_features,),
            expand=last_conv.out_channels / blocks[-1].out_channels,
            act=head_act,
            dropout=classifier[2].p,
            feature_mix_bias=classifier[0].bias is not None,
        ),
        granularity="layer",
        kernel_transform=False,
        in_channels=stem_conv.in_channels,
        bn_momentum=bns[0].momentum,
        bn_eps=bns[0].eps,
    )
    _check_expressible(space, blocks, last_conv.out_channels)
    return space, key_map


def _check_expressible(space: SearchSpace, blocks: list[_Block], final_channels: int) -> None:
    """Our channel rules must reproduce every torchvision width, or the max subnet would differ."""
    layers = [(s, j) for s, st in enumerate(space.stages) for j in range(st.max_depth)]
    for (s, _), b in zip(layers, blocks):
        mid = space.middle_channels(s, b.in_channels, b.mid_channels / b.in_channels if b.expand else 1)
        if mid != b.mid_channels:
            raise ValueError(f"block with {b.mid_channels} middle channels maps to {mid} under our rule")
        if b.se_channels and space.se_channels(b.mid_channels) != b.se_channels:
            raise ValueError(
                f"squeeze-excite of {b.se_channels} channels on {b.mid_channels}; "
                f"our rule gives {space.se_channels(b.mid_channels)}"
            )
    if space.final_expand_channels(blocks[-1].out_channels) != final_channels:
        raise ValueError(f"final expand width {final_channels} is not expressible as a ratio of the last width")


def from_torchvision(
    model: nn.Module,
    num_classes: int | None = None,
    name: str = "torchvision_mobilenet_v3",
    resolutions: Sequence[int] = DEFAULT_RESOLUTIONS,
    expand_fractions: Sequence[float] = (0.5, 0.75, 1.0),
    max_depth_drop: int = 2,
    sort_channels: bool = True,
) -> Supernet:
    """A :class:`~tofa_fast.Supernet` whose max subnet computes ``model`` (a torchvision
    ``mobilenet_v3_large`` / ``mobilenet_v3_small``, any width multiplier, not dilated).

    The space is derived from the model (module docstring); ``net.space.max_arch()`` is the
    torchvision network itself, in eval mode equal to ``model(x)`` to float32 rounding.

    Starting from ImageNet weights on a machine that has them (torchvision caches downloads under
    ``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch``)::

        from torchvision.models import mobilenet_v3_large, MobileNet_V3_Large_Weights
        tv = mobilenet_v3_large(weights=MobileNet_V3_Large_Weights.IMAGENET1K_V1)
        net = tofa_fast.transfer.from_torchvision(tv, num_classes=10)

    Args:
        model: the torchvision model (its weights are copied; it is not modified).
        num_classes: ``None`` keeps the pretrained classifier; an int replaces it with a freshly
            initialised one of that many outputs (everything else kept).
        name: the derived space's name.
        resolutions: the derived space's input resolutions.
        expand_fractions: fractions of each layer's middle width offered as smaller expand choices.
        max_depth_drop: how many trailing blocks of a stage a subnet may skip.
        sort_channels: sort middle channels by importance so smaller expand choices keep the most
            important ones (BootstrapNAS); the max subnet's output is unchanged.

    Returns:
        The supernet, in eval mode.
    """
    space, key_map = _derive(model, name, resolutions, expand_fractions, max_depth_drop)
    state = model.state_dict()
    pretrained_classes = state["classifier.3.weight"].shape[0]
    net = Supernet(space, num_classes=pretrained_classes if num_classes is None else num_classes)
    what = f"torchvision {type(model).__name__} → supernet {space.name!r}"
    expected = set(key_map.values())
    if set(net.state_dict()) != set(key_map):
        raise RuntimeError(f"{what}: the key map does not cover the supernet's state dict (a bug in tofa_fast)")
    check_keys(set(state), expected, what)
    skip = {"classifier.weight", "classifier.bias"} if num_classes is not None else set()
    copy_mapped(net, state, key_map, what, skip)
    if sort_channels:
        net.sort_channels()
    return net.eval()
