"""Copying a foreign state dict into a :class:`~tofa_fast.nn.Supernet` through a key map, strictly.

Every converter (OFA, torchvision, EfficientNet-Lite) reduces to "our key ← their key (+ reshape)".
Doing the copy in one place means every mismatch — a missing key, a stray key, a wrong shape — is
reported the same way, with the names a user can look up in *their* checkpoint. :func:`load_exactly`
applies the same checks to a weights file loaded into the source network itself (``--init``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

_MAX_LISTED = 20


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the network it is loaded into. The message names what differs."""


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f", … and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


def check_keys(
    present: set[str], expected: set[str], what: str, optional: set[str] | frozenset[str] = frozenset()
) -> None:
    """Raise :class:`CheckpointMismatchError` listing missing and unexpected keys, if any.

    ``optional`` keys may be absent without error (e.g. ``num_batches_tracked``, which old
    PyTorch versions did not save).
    """
    missing = sorted(expected - present - set(optional))
    unexpected = sorted(present - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        raise CheckpointMismatchError(f"{what}: " + "; ".join(parts))


@torch.no_grad()
def copy_mapped(
    net: nn.Module,
    source: Mapping[str, torch.Tensor],
    key_map: Mapping[str, str],
    what: str,
    skip: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Copy ``source[key_map[ours]]`` into every tensor ``ours`` of ``net.state_dict()``.

    A source tensor may differ from ours only by singleton dimensions (a ``Linear`` weight (O, I)
    becomes a 1×1 conv weight (O, I, 1, 1)); any other shape difference raises
    :class:`CheckpointMismatchError` naming the first mismatching pair of keys and both shapes.
    Source tensors without a counterpart are ignored and our tensors without a source are left as
    initialised (the caller has already checked keys with :func:`check_keys`), as are our keys in
    ``skip``. Tensors are cast to our dtype.
    """
    target = net.state_dict()
    ours_by_theirs = {theirs: ours for ours, theirs in key_map.items() if ours not in skip}
    pending = []
    # In the checkpoint's order, so that "the first mismatch" is the first one a user would find in it.
    for theirs, src in source.items():
        ours = ours_by_theirs.get(theirs)
        if ours is None:
            continue
        dst = target[ours]
        if not isinstance(src, torch.Tensor):
            raise CheckpointMismatchError(f"{what}: {theirs!r} is a {type(src).__name__}, not a tensor")
        if src.shape != dst.shape and (src.numel() != dst.numel() or _squeezed(src.shape) != _squeezed(dst.shape)):
            raise CheckpointMismatchError(
                f"{what}: shape mismatch at {theirs!r}: checkpoint has {tuple(src.shape)}, "
                f"expected {tuple(dst.shape)} (for {ours!r})"
            )
        pending.append((dst, src))
    # Validate everything before writing anything, so a failed load leaves the network untouched.
    for dst, src in pending:
        dst.copy_(src.reshape(dst.shape).to(dst.dtype))


def _squeezed(shape: torch.Size) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1)


def check_shapes(present: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`CheckpointMismatchError` listing every key whose shape differs (both shapes)."""
    wrong = [
        f"{key!r}: checkpoint has {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
        for key, value in present.items()
        if key in expected and (not isinstance(value, torch.Tensor) or value.shape != expected[key].shape)
    ]
    if wrong:
        raise CheckpointMismatchError(f"{what}: shape mismatch ({len(wrong)}): {_listing(wrong)}")


def load_exactly(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``model.load_state_dict(state)`` after checking that the keys are exactly the model's (BN's
    ``num_batches_tracked`` may be absent, as in checkpoints of old PyTorch versions) and every shape
    fits, so that a wrong or foreign file fails with a :class:`CheckpointMismatchError` naming what differs."""
    expected = model.state_dict()
    optional = {key for key in expected if key.endswith("num_batches_tracked")}
    check_keys(set(state), set(expected), what, optional)
    check_shapes(state, expected, what)
    model.load_state_dict(state, strict=False)
