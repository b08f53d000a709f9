"""torchvision MobileNetV2 → the description :mod:`.mbconv_import` turns into a supernet.

MobileNetV2 is MBConv without squeeze-excite, ReLU6 everywhere, and a head without a feature-mix
layer: the last 1×1 conv (320 → 1280) + BN + ReLU6, global pool, dropout, the classifier
(``HeadSpec.feature_mix=False``). Its first block has no expansion (t = 1). Use it through
:func:`tofa_fast.transfer.from_torchvision`.
"""

from __future__ import annotations

from torch import nn

from ..spaces import IMAGENET_MEAN, IMAGENET_STD
from .mbconv_import import ConvBN, PretrainedBlock, PretrainedMBConvNet, bn_settings, check_conv
from .torchvision_mbv3 import _conv_bn, read_blocks


def _read_block(block: nn.Module, prefix: str) -> PretrainedBlock:
    parts = list(block.conv.children())
    where = f"{prefix}.conv"
    # [expand ConvBNReLU6,] depthwise ConvBNReLU6, project Conv2d, BatchNorm2d
    if len(parts) not in (3, 4) or not isinstance(parts[-2], nn.Conv2d) or not isinstance(parts[-1], nn.BatchNorm2d):
        raise ValueError(f"{where}: expected [expand,] depthwise, project conv, BN; got {len(parts)} parts")
    n = len(parts)
    dw, _ = _conv_bn(parts[n - 3], f"{where}.{n - 3}", ("relu6",))
    if parts[n - 3][0].groups != dw.in_channels or dw.out_channels != dw.in_channels:
        raise ValueError(f"{where}.{n - 3}: expected a depthwise conv, got {parts[n - 3][0]}")
    check_conv(parts[-2], f"{where}.{n - 2}")
    project = ConvBN.of(parts[-2], f"{where}.{n - 2}.weight", f"{where}.{n - 1}")
    if project.kernel != 1:
        raise ValueError(f"{where}.{n - 2}: expected a 1×1 projection, got {parts[-2]}")
    expand = None
    if n == 4:
        expand, _ = _conv_bn(parts[0], f"{where}.0", ("relu6",))
        if expand.kernel != 1:
            raise ValueError(f"{where}.0: expected a 1×1 expansion, got {parts[0][0]}")
    residual = dw.stride == 1 and (expand or dw).in_channels == project.out_channels
    if block.use_res_connect != residual:
        raise ValueError(f"{prefix}: unexpected residual connection setting {block.use_res_connect}")
    return PretrainedBlock(expand, dw, project, "relu6", residual)


def read_mobilenet_v2(model: nn.Module) -> PretrainedMBConvNet:
    """Describe a torchvision MobileNetV2 (any width multiplier) for the importer."""
    from torchvision.models import MobileNetV2
    from torchvision.models.mobilenetv2 import InvertedResidual

    if not isinstance(model, MobileNetV2):
        raise TypeError(f"expected a torchvision MobileNetV2, got {type(model).__name__}")
    features = list(model.features.children())
    stem, _ = _conv_bn(features[0], "features.0", ("relu6",))
    final, _ = _conv_bn(features[-1], f"features.{len(features) - 1}", ("relu6",))
    if final.kernel != 1:
        raise ValueError(f"features.{len(features) - 1}: expected the final 1×1 conv")
    classifier = list(model.classifier.children())
    if len(classifier) != 2 or not isinstance(classifier[0], nn.Dropout) or not isinstance(classifier[1], nn.Linear):
        raise ValueError("classifier: expected Dropout, Linear (torchvision MobileNetV2)")
    source = "torchvision MobileNetV2"
    return PretrainedMBConvNet(
        source=source,
        default_name="torchvision_mobilenet_v2",
        stem=stem,
        stem_act="relu6",
        blocks=read_blocks(features, InvertedResidual, _read_block),
        final=final,
        head_act="relu6",
        feature_mix=None,
        dropout=classifier[0].p,
        classifier=("classifier.1.weight", "classifier.1.bias"),
        bn=bn_settings(model, source),
        padding="symmetric",
        normalisation=(IMAGENET_MEAN, IMAGENET_STD),
        width_fractions=(0.75, 1.0),
    )
