"""torchvision MobileNetV3 (large / small) → a supernet whose max subnet *is* that network (SPEC §9).

This module reads the torchvision model into a :class:`~.mbconv_import.PretrainedMBConvNet`; the
space derivation, weight copy and channel sorting are :mod:`.mbconv_import`'s (see there for the
derived space). :func:`from_torchvision` also takes ``mobilenet_v2`` (:mod:`.torchvision_mbv2`).

torchvision's classifier ``Linear(960→1280) · Hardswish · Dropout · Linear`` on pooled features is our
head's feature-mix 1×1 conv (with a bias: ``HeadSpec.feature_mix_bias``) · act · dropout · classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..nn import Supernet
from ..spaces import IMAGENET_MEAN, IMAGENET_STD, SearchSpace
from .mbconv_import import (
    DEFAULT_RESOLUTIONS,
    ConvBN,
    PretrainedBlock,
    PretrainedMBConvNet,
    activation_name,
    bn_settings,
    conv_bn_parts,
    convert,
    derive_space,
)


def _conv_bn(module: nn.Module, prefix: str, acts: tuple[str, ...] = ("relu", "hswish")) -> tuple[ConvBN, str]:
    """A torchvision ``Conv2dNormActivation`` at ``prefix``: its keys and shape, and its activation."""
    conv, _, act = conv_bn_parts(module, prefix)
    return ConvBN.of(conv, f"{prefix}.0.weight", f"{prefix}.1"), activation_name(act, prefix, acts)


def read_blocks(features: list[nn.Module], block_type: type, read_block) -> tuple[PretrainedBlock, ...]:
    """``read_block(block, prefix)`` of every ``features[1:-1]`` entry, each checked to be a ``block_type``."""
    blocks = []
    for i, block in enumerate(features[1:-1], start=1):
        if not isinstance(block, block_type):
            raise ValueError(f"features.{i}: expected an {block_type.__name__} block, got {type(block).__name__}")
        blocks.append(read_block(block, f"features.{i}"))
    return tuple(blocks)


def _read_block(block: nn.Module, prefix: str) -> PretrainedBlock:
    from torchvision.ops.misc import SqueezeExcitation

    children = list(block.block.named_children())
    se_index = next((i for i, (_, m) in enumerate(children) if isinstance(m, SqueezeExcitation)), None)
    convs = [(f"{prefix}.block.{name}", m) for name, m in children if not isinstance(m, SqueezeExcitation)]
    if len(convs) not in (2, 3):
        raise ValueError(f"{prefix}: expected [expand,] depthwise, [SE,] project; got {len(children)} parts")
    (dw_name, dw_module), (pj_name, pj_module) = convs[-2], convs[-1]
    dw, act = _conv_bn(dw_module, dw_name)
    project, pj_act = _conv_bn(pj_module, pj_name)
    if dw_module[0].groups != dw.in_channels or dw.out_channels != dw.in_channels:
        raise ValueError(f"{dw_name}: expected a depthwise conv, got {dw_module[0]}")
    if project.kernel != 1 or pj_act != "none":
        raise ValueError(f"{pj_name}: expected a linear 1×1 projection")
    expand = None
    if len(convs) == 3:
        expand, ex_act = _conv_bn(convs[0][1], convs[0][0])
        if expand.kernel != 1 or ex_act != act:
            raise ValueError(f"{convs[0][0]}: expected a 1×1 expansion with the depthwise's activation")
    se_channels, se_keys = 0, None
    if se_index is not None:
        se_name, se = children[se_index]
        if not isinstance(se.activation, nn.ReLU) or not isinstance(se.scale_activation, nn.Hardsigmoid):
            raise ValueError(f"{prefix}.block.{se_name}: only ReLU / Hardsigmoid squeeze-excite is supported")
        se_prefix = f"{prefix}.block.{se_name}"
        se_channels, se_keys = se.fc1.out_channels, (f"{se_prefix}.fc1", f"{se_prefix}.fc2")
    in_channels = (expand or dw).in_channels
    residual = dw.stride == 1 and in_channels == project.out_channels
    if getattr(block, "use_res_connect", residual) != residual:
        raise ValueError(f"{prefix}: unexpected residual connection setting {block.use_res_connect}")
    return PretrainedBlock(expand, dw, project, act, residual, se_channels, se_keys)


def read_mobilenet_v3(model: nn.Module) -> PretrainedMBConvNet:
    """Describe a torchvision MobileNetV3 (large or small, any width, not dilated) for the importer."""
    from torchvision.models.mobilenetv3 import InvertedResidual, MobileNetV3

    if not isinstance(model, MobileNetV3):
        raise TypeError(f"expected a torchvision MobileNetV3, got {type(model).__name__}")
    features = list(model.features.children())
    stem, stem_act = _conv_bn(features[0], "features.0")
    final, final_act = _conv_bn(features[-1], f"features.{len(features) - 1}")
    classifier = list(model.classifier.children())
    if (
        len(classifier) != 4
        or not isinstance(classifier[0], nn.Linear)
        or not isinstance(classifier[2], nn.Dropout)
        or not isinstance(classifier[3], nn.Linear)
    ):
        raise ValueError("classifier: expected Linear, activation, Dropout, Linear (torchvision MobileNetV3)")
    head_act = activation_name(classifier[1], "classifier.1", ("relu", "hswish"))
    if final_act != head_act:
        raise ValueError(f"features[-1] uses {final_act} but classifier.1 uses {head_act}; our head shares one")
    source = f"torchvision {type(model).__name__}"
    mix_bias = "classifier.0.bias" if classifier[0].bias is not None else None
    return PretrainedMBConvNet(
        source=source,
        default_name="torchvision_mobilenet_v3",
        stem=stem,
        stem_act=stem_act,
        blocks=read_blocks(features, InvertedResidual, _read_block),
        final=final,
        head_act=head_act,
        feature_mix=("classifier.0.weight", mix_bias, classifier[0].out_features),
        dropout=classifier[2].p,
        classifier=("classifier.3.weight", "classifier.3.bias"),
        bn=bn_settings(model, source),
        padding="symmetric",
        normalisation=(IMAGENET_MEAN, IMAGENET_STD),
        # Fixed widths, the space MobileNetV3 conversions have always had (saved runs stay valid).
        width_fractions=(1.0,),
    )


def read_torchvision(model: nn.Module) -> PretrainedMBConvNet:
    """Describe a torchvision ``mobilenet_v3_large`` / ``mobilenet_v3_small`` / ``mobilenet_v2``."""
    from torchvision.models import MobileNetV2, MobileNetV3

    if isinstance(model, MobileNetV3):
        return read_mobilenet_v3(model)
    if isinstance(model, MobileNetV2):
        from .torchvision_mbv2 import read_mobilenet_v2

        return read_mobilenet_v2(model)
    raise TypeError(
        "from_torchvision takes a torchvision MobileNetV3 (mobilenet_v3_large / mobilenet_v3_small) or "
        f"MobileNetV2 (mobilenet_v2), got {type(model).__name__}"
    )


def torchvision_space(
    model: nn.Module,
    name: str | None = None,
    resolutions: Sequence[int] = DEFAULT_RESOLUTIONS,
    expand_fractions: Sequence[float] = (0.5, 0.75, 1.0),
    max_depth_drop: int = 2,
    width_fractions: Sequence[float] | None = None,
) -> SearchSpace:
    """The search space :func:`from_torchvision` derives from ``model`` (see :mod:`.mbconv_import`)."""
    return derive_space(read_torchvision(model), name, resolutions, expand_fractions, max_depth_drop, width_fractions)[
        0
    ]


def from_torchvision(
    model: nn.Module,
    num_classes: int | None = None,
    name: str | None = None,
    resolutions: Sequence[int] = DEFAULT_RESOLUTIONS,
    expand_fractions: Sequence[float] = (0.5, 0.75, 1.0),
    max_depth_drop: int = 2,
    sort_channels: bool = True,
    width_fractions: Sequence[float] | None = None,
) -> Supernet:
    """A :class:`~tofa_fast.Supernet` whose max subnet computes ``model``: a torchvision
    ``mobilenet_v3_large`` / ``mobilenet_v3_small`` (any width multiplier, not dilated) or
    ``mobilenet_v2`` (any width multiplier).

    The space is derived from the model (:mod:`.mbconv_import`); ``net.space.max_arch()`` is the
    torchvision network itself, in eval mode equal to ``model(x)`` to float32 rounding. Inputs are
    normalised with ImageNet's mean and std (``net.space.input_mean`` / ``input_std``).

    Starting from ImageNet weights on a machine that has them (torchvision caches downloads under
    ``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch``; or load any local file into
    ``mobilenet_v2(weights=None)`` with ``load_state_dict``)::

        from torchvision.models import mobilenet_v3_large, MobileNet_V3_Large_Weights
        tv = mobilenet_v3_large(weights=MobileNet_V3_Large_Weights.IMAGENET1K_V1)
        net = tofa_fast.transfer.from_torchvision(tv, num_classes=10)

    Args:
        model: the torchvision model (its weights are copied; it is not modified).
        num_classes: ``None`` keeps the pretrained classifier; an int replaces it with a freshly
            initialised one of that many outputs (everything else kept).
        name: the derived space's name (default ``torchvision_mobilenet_v3`` / ``torchvision_mobilenet_v2``).
        resolutions: the derived space's input resolutions.
        expand_fractions: fractions of each layer's middle width offered as smaller expand choices.
        max_depth_drop: how many trailing blocks of a stage a subnet may skip.
        sort_channels: sort middle channels and elastic widths by importance so smaller choices keep
            the most important channels (BootstrapNAS); the max subnet's output is unchanged.
        width_fractions: fractions of each stage's output width offered as width choices where
            the architecture allows it (:mod:`.mbconv_import`); default ``(1.0,)`` (fixed widths)
            for MobileNetV3, ``(0.75, 1.0)`` for MobileNetV2.

    Returns:
        The supernet, in eval mode.
    """
    net = read_torchvision(model)
    options = (name, resolutions, expand_fractions, max_depth_drop, sort_channels, width_fractions)
    return convert(net, model.state_dict(), num_classes, *options)
