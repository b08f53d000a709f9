"""Activation factory shared by the elastic modules and the extracted subnets."""

from __future__ import annotations

from torch import nn


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
