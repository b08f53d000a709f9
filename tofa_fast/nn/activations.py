"""Activation factory shared by the elastic modules and the extracted subnets."""

from __future__ import annotations

from torch import nn

# build_activation's modules → the names the compiled batch-norm + activation kernel takes.
_ACTIVATION_NAMES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hswish", nn.SiLU: "swish", nn.Identity: "none"}


def build_activation(name: str) -> nn.Module:
    """``relu`` | ``relu6`` | ``hswish`` | ``swish`` | ``none`` → a plain PyTorch module (ONNX-exportable)."""
    if name == "relu":
        return nn.ReLU(inplace=False)
    if name == "relu6":
        return nn.ReLU6(inplace=False)
    if name == "hswish":
        return nn.Hardswish()
    if name == "swish":
        return nn.SiLU()
    if name == "none":
        return nn.Identity()
    raise ValueError(f"activation must be one of relu, relu6, hswish, swish, none; got {name!r}")


def activation_name(module: nn.Module) -> str:
    """The name :func:`build_activation` builds ``module`` from (what ``packed_batch_norm_act`` takes)."""
    try:
        return _ACTIVATION_NAMES[type(module)]
    except KeyError:
        raise TypeError(f"no packed form of activation {type(module).__name__}") from None


def known_activation_name(module: nn.Module) -> str | None:
    """:func:`activation_name`, or None for a module it has no name for."""
    return _ACTIVATION_NAMES.get(type(module))
