"""Packed batch norm + activation (the fused multi-subnet step, SPEC §5): reference and argument rules.

Layout. The fused step packs the activations of several subnets ("members") of one step into one
2-D tensor ``x`` of shape (P, C): the rows are pixels (a channels-last image flattened to
(N·H·W, C)), member after member; member ``i`` owns the rows ``offsets[i]:offsets[i + 1]`` and its
first ``channels[i]`` columns (a narrower member's other columns are padding). A member with
``channels[i] == 0`` is not active in this layer (a block its depth skips).

Math. Segment ``i`` is batch-normalised on its own: in training with the mean and biased variance of
its rows over its active columns, in eval with ``running_mean`` / ``running_var``; then scaled by
``weight``, shifted by ``bias`` and passed through ``activation``. Its padding columns come out as
exact zeros, so the next layer's matrix product over all C columns adds nothing for them, and their
gradient is zero. This is what a member computes alone (``ElasticBatchNorm2d`` on its channel prefix),
so the packed step equals the sequential one.

Running statistics. In training, segment ``i`` updates ``running_mean[:channels[i]]`` and
``running_var[:channels[i]]`` (unbiased variance) with ``momentum_factors[i]`` exactly as
``F.batch_norm`` does, one segment after another in ``update_order`` (default: segment order) —
the order in which the members' passes would have updated them, so the result does not depend on
how the rows are packed. A factor of 0 leaves the statistics alone (the pseudo-label pass).

This module is the oracle of the compiled kernel and depends on nothing else of the package.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["PACKED_ACTIVATIONS", "check_packed_batch_norm_args", "packed_batch_norm_act_reference"]

PACKED_ACTIVATIONS = ("none", "relu", "relu6", "hswish", "swish")

_ACTIVATIONS = {"none": lambda t: t, "relu": F.relu, "relu6": F.relu6, "hswish": F.hardswish, "swish": F.silu}


def check_packed_batch_norm_args(
    x: torch.Tensor,
    offsets: Sequence[int],
    channels: Sequence[int],
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum_factors: Sequence[float],
    activation: str,
    update_order: Sequence[int] | None,
) -> None:
    """Raise ``ValueError`` naming the argument that breaks the layout rules (module docstring)."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, channels), got shape {tuple(x.shape)}")
    rows, width = x.shape
    segments = len(channels)
    if len(offsets) != segments + 1 or offsets[0] != 0 or offsets[-1] != rows:
        raise ValueError(
            f"offsets must have len(channels) + 1 = {segments + 1} entries from 0 to {rows}, got {list(offsets)}"
        )
    if any(b < a for a, b in zip(offsets[:-1], offsets[1:])):
        raise ValueError(f"offsets must be non-decreasing, got {list(offsets)}")
    if any(not 0 <= c <= width for c in channels):
        raise ValueError(f"channels must be in [0, {width}], got {list(channels)}")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and (t.dim() != 1 or t.shape[0] != width):
            raise ValueError(f"{name} must have shape ({width},), got {tuple(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if not training and running_mean is None:
        raise ValueError("eval mode normalises with running statistics: running_mean and running_var are required")
    if len(momentum_factors) != segments:
        raise ValueError(f"momentum_factors must have one entry per segment ({segments}), got {len(momentum_factors)}")
    if activation not in PACKED_ACTIVATIONS:
        raise ValueError(f"activation must be one of {PACKED_ACTIVATIONS}, got {activation!r}")
    if update_order is not None and sorted(update_order) != list(range(segments)):
        raise ValueError(f"update_order must be a permutation of range({segments}), got {list(update_order)}")
    if training:
        # F.batch_norm refuses a batch of one row in training (its unbiased variance divides by zero);
        # said here once, naming the segment, for the reference and the compiled kernel alike.
        single = [i for i in range(segments) if channels[i] > 0 and offsets[i + 1] - offsets[i] == 1]
        if single:
            raise ValueError(
                f"training needs more than one row per active segment (batch statistics), segments {single} have one"
            )


def packed_batch_norm_act_reference(
    x: torch.Tensor,
    offsets: Sequence[int],
    channels: Sequence[int],
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum_factors: Sequence[float],
    eps: float,
    activation: str = "none",
    update_order: Sequence[int] | None = None,
) -> torch.Tensor:
    """(P, C) → (P, C): each segment through ``F.batch_norm`` on its channel prefix and
    ``activation``, zeros in its padding columns (module docstring). Differentiable with autograd;
    updates the running statistics in place in training."""
    check_packed_batch_norm_args(
        x,
        offsets,
        channels,
        weight,
        bias,
        running_mean,
        running_var,
        training,
        momentum_factors,
        activation,
        update_order,
    )
    act = _ACTIVATIONS[activation]
    width = x.shape[1]
    order = range(len(channels)) if update_order is None else update_order
    outputs: list[torch.Tensor | None] = [None] * len(channels)
    for i in order:
        rows, c = x[offsets[i] : offsets[i + 1]], channels[i]
        if c == 0 or rows.shape[0] == 0:
            outputs[i] = rows.new_zeros(rows.shape) * rows  # zeros that keep the autograd graph
            continue
        stats = (running_mean[:c], running_var[:c]) if running_mean is not None else (None, None)
        if training and momentum_factors[i] == 0:
            stats = (None, None)  # normalise with batch statistics, update nothing
        y = act(F.batch_norm(rows[:, :c], *stats, weight[:c], bias[:c], training, momentum_factors[i], eps))
        outputs[i] = F.pad(y, (0, width - c))
    return torch.cat(outputs)
