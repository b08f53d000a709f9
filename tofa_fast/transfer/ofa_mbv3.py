"""Once-for-All MobileNetV3 checkpoints → the ``ofa_mbv3`` supernet (SPEC §9).

The ``ofa`` package's ``OFAMobileNetV3`` (kernel {3,5,7}, expand {3,4,6}, depth {2,3,4}) and our
``ofa_mbv3`` preset hold the same tensors under different names; this module owns the name map and
the translation of OFA's subnet settings ``(ks, e, d)`` into our arch dict.

OFA has saved the same network under several spellings over its history (``mobile_inverted_conv``
for ``conv``; ``conv.conv.weight`` or ``conv.weight``; ``bn.bn.*`` or ``bn.*``; ``linear.linear.*`` or
``linear.*``), which its own ``load_state_dict`` reconciles. We do the same by comparing keys in a
canonical spelling (:func:`canonical_ofa_key`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .. import spaces
from ..nn import Supernet
from ..spaces import Arch, SearchSpace
from .state_dict_mapping import CheckpointMismatchError, check_keys, copy_mapped

#: Width multipliers of the published OFA MobileNetV3 supernets.
OFA_WIDTH_MULTS: tuple[float, ...] = (1.0, 1.2)

_BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def canonical_ofa_key(key: str) -> str:
    """One spelling per OFA tensor: no ``module.`` prefix, ``conv`` for ``mobile_inverted_conv``, and
    repeated path segments collapsed (``bn.bn.weight`` → ``bn.weight``; ``conv.conv.weight`` →
    ``conv.weight``). No OFAMobileNetV3 key repeats a segment legitimately, so this is lossless."""
    if key.startswith("module."):
        key = key[len("module.") :]
    parts = ["conv" if p == "mobile_inverted_conv" else p for p in key.split(".")]
    out = [parts[0]]
    for p in parts[1:]:
        if p != out[-1]:
            out.append(p)
    return ".".join(out)


def ofa_key_map(space: SearchSpace) -> dict[str, str]:
    """Our ``Supernet(space)`` state-dict key → OFA's key (canonical spelling).

    Valid for spaces laid out like ``ofa_mbv3``: ``stages[0]`` is OFA's ``blocks[0]``; layer ``j`` of
    stage ``s ≥ 1`` is ``blocks[1 + Σ_{t<s} max_depth_t + j]``.
    """
    m: dict[str, str] = {"stem_conv.weight": "first_conv.conv.weight"}
    m.update({f"stem_bn.{f}": f"first_conv.bn.{f}" for f in _BN_FIELDS})
    block = 0
    for s, stage in enumerate(space.stages):
        for j in range(stage.max_depth):
            ours, theirs = f"stages.{s}.{j}", f"blocks.{block}.conv"
            pairs = {"dw_conv.weight": "depth_conv.conv.weight", "project_conv.weight": "point_linear.conv.weight"}
            for f in _BN_FIELDS:
                pairs[f"dw_bn.{f}"] = f"depth_conv.bn.{f}"
                pairs[f"project_bn.{f}"] = f"point_linear.bn.{f}"
            if stage.has_expansion:
                pairs["expand_conv.weight"] = "inverted_bottleneck.conv.weight"
                pairs.update({f"expand_bn.{f}": f"inverted_bottleneck.bn.{f}" for f in _BN_FIELDS})
            if space.kernel_transform:
                ks = sorted(stage.kernels)
                for small, large in zip(ks[:-1], ks[1:]):
                    pairs[f"dw_conv.transform_{large}to{small}"] = f"depth_conv.conv.{large}to{small}_matrix"
            if stage.se:
                for conv in ("reduce", "expand"):
                    for f in ("weight", "bias"):
                        pairs[f"se.{conv}.{f}"] = f"depth_conv.se.fc.{conv}.{f}"
            m.update({f"{ours}.{k}": f"{theirs}.{v}" for k, v in pairs.items()})
            block += 1
    m["final_expand_conv.weight"] = "final_expand_layer.conv.weight"
    m.update({f"final_expand_bn.{f}": f"final_expand_layer.bn.{f}" for f in _BN_FIELDS})
    m["feature_mix_conv.weight"] = "feature_mix_layer.conv.weight"
    m["classifier.weight"] = "classifier.linear.weight"
    m["classifier.bias"] = "classifier.linear.bias"
    return m


def ofa_state_dict(model_or_state_dict: nn.Module | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of an OFA model or checkpoint, keyed in canonical spelling.

    Accepts a module (its ``state_dict()``), a plain state dict, or a checkpoint dict wrapping one
    under ``"state_dict"`` (how OFA saves its supernets); ``module.`` prefixes (DataParallel) go.
    """
    if isinstance(model_or_state_dict, nn.Module):
        raw: Mapping[str, Any] = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        raw = model_or_state_dict
        if "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
            raw = raw["state_dict"]
    else:
        raise TypeError(
            f"from_ofa takes an OFAMobileNetV3 module or its state dict, got {type(model_or_state_dict).__name__}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise CheckpointMismatchError(f"OFA checkpoint: keys must be strings, got {key!r}")
        canon = canonical_ofa_key(key)
        if canon in out:
            raise CheckpointMismatchError(f"OFA checkpoint: keys collide after normalisation: {key!r} → {canon!r}")
        out[canon] = value
    return out


def infer_width_mult(state: Mapping[str, torch.Tensor]) -> float:
    """The OFA width multiplier (1.0 or 1.2) whose stem width matches ``first_conv.conv.weight``."""
    key = "first_conv.conv.weight"
    if key not in state:
        raise CheckpointMismatchError(
            f"OFA checkpoint: cannot infer the width multiplier: missing key {key!r} "
            f"(keys start with {sorted(state)[:5]})"
        )
    stem = tuple(state[key].shape)
    expected = {w: (spaces.make_divisible(16 * w, 8), 3, 3, 3) for w in OFA_WIDTH_MULTS}
    for w, shape in expected.items():
        if stem == shape:
            return w
    listed = ", ".join(f"w{w:g}: {shape}" for w, shape in expected.items())
    raise CheckpointMismatchError(
        f"OFA checkpoint: {key!r} has shape {stem}, which matches no supported width multiplier ({listed})"
    )


def from_ofa(
    model_or_state_dict: nn.Module | Mapping[str, Any],
    width_mult: float | None = None,
    num_classes: int | None = None,
) -> Supernet:
    """Load an ``ofa`` package ``OFAMobileNetV3`` (kernel {3,5,7}, expand {3,4,6}, depth {2,3,4})
    into a :class:`~tofa_fast.Supernet` on the ``ofa_mbv3`` preset.

    Every subnet then computes what OFA computes for the same settings: for OFA's
    ``set_active_subnet(ks=ks, e=e, d=d)`` use ``net.set_active(ofa_arch(net.space, ks, e, d, r))``.

    ImageNet weights: on a machine with a network, ``ofa.model_zoo.ofa_net(
    "ofa_mbv3_d234_e346_k357_w1.2", pretrained=True)`` downloads OFA's supernet to
    ``.torch/ofa_nets/ofa_mbv3_d234_e346_k357_w1.2`` (relative to the working directory); pass that
    module here, or copy the file and use ``tofa-fast train --init ofa:PATH`` (:func:`load_init`).

    Args:
        model_or_state_dict: the OFA module, its ``state_dict()``, or a checkpoint as OFA
            distributes them (``{"state_dict": ...}``, e.g. ``ofa_mbv3_d234_e346_k357_w1.2``);
            ``module.``-prefixed keys are accepted.
        width_mult: 1.0 or 1.2; inferred from the stem width when ``None``.
        num_classes: ``None`` keeps OFA's classifier (its class count read from the weights); an
            int replaces it with a freshly initialised classifier of that many outputs, everything
            else kept — what transfer to a new task needs.

    Raises:
        CheckpointMismatchError (a ``ValueError``): keys missing or unexpected (listed), or the
            first shape that differs (both shapes named), e.g. a checkpoint of another OFA space.
    """
    state = ofa_state_dict(model_or_state_dict)
    if width_mult is None:
        width_mult = infer_width_mult(state)
    space = spaces.get("ofa_mbv3", width_mult=width_mult)
    what = f"OFA checkpoint vs OFAMobileNetV3 w{float(width_mult)} (ks 3,5,7 / e 3,4,6 / d 2,3,4)"
    classifier_key = "classifier.linear.weight"
    if classifier_key not in state or state[classifier_key].dim() != 2:
        found = tuple(state[classifier_key].shape) if classifier_key in state else "nothing"
        raise CheckpointMismatchError(f"{what}: {classifier_key!r} must be a (classes, features) matrix, got {found}")
    pretrained_classes = int(state[classifier_key].shape[0])
    net = Supernet(space, num_classes=pretrained_classes if num_classes is None else num_classes)
    key_map = ofa_key_map(space)
    optional = {v for v in key_map.values() if v.endswith("num_batches_tracked")}
    check_keys(set(state), set(key_map.values()), what, optional)
    skip = {"classifier.weight", "classifier.bias"} if num_classes is not None else set()
    copy_mapped(net, state, key_map, what, skip)
    return net.eval()


def ofa_arch(
    space: SearchSpace,
    ks: int | Sequence[int],
    e: float | Sequence[float],
    d: int | Sequence[int],
    resolution: int | None = None,
) -> Arch:
    """Our arch for OFA's ``set_active_subnet(ks=ks, e=e, d=d)`` on an ``ofa_mbv3`` space.

    OFA's ``ks`` and ``e`` have one entry per elastic block (5 stages × 4 blocks = 20), including the
    blocks a shallower depth skips, and ``d`` one entry per stage (5); scalars broadcast as in OFA.
    Stage ``s`` keeps ``ks[4s : 4s + d[s]]``. ``resolution`` defaults to the space's largest.
    """
    elastic = space.stages[1:]
    n_blocks = sum(st.max_depth for st in elastic)
    ks_list = _broadcast(ks, n_blocks, "ks")
    e_list = _broadcast(e, n_blocks, "e")
    d_list = _broadcast(d, len(elastic), "d")
    first = space.stages[0]
    stages: list[dict[str, Any]] = [
        {"width": first.widths[0], "depth": 1, "kernel": [first.kernels[0]], "expand": [first.expands[0]]}
    ]
    start = 0
    for st, depth in zip(elastic, d_list):
        depth = min(int(depth), st.max_depth)  # OFA clamps the same way in set_active_subnet
        stages.append(
            {
                "width": max(st.widths),
                "depth": depth,
                "kernel": list(ks_list[start : start + depth]),
                "expand": list(e_list[start : start + depth]),
            }
        )
        start += st.max_depth
    return space.arch_from_dict(
        {
            "resolution": max(space.resolutions) if resolution is None else resolution,
            "stem": space.stem.widths[0],
            "stages": stages,
            "head": max(space.head.widths),
        }
    )


def _broadcast(value: Any, n: int, name: str) -> list:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name} must be a number or a list of {n} entries (OFA layout), got {len(values)}")
    return values
