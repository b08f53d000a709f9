"""``RUN/selection.json``: what ``tofa-fast select`` needs, readable without torch.

The zero-cost choice needs the space, the selection index and each indexed subnet's FLOPs; none of
that needs the network's weights, yet reading it from ``checkpoint.pt`` means importing torch
(seconds). So every checkpoint write is followed by this sidecar, and ``select`` answers from it
in a fraction of a second (tests/test_selection_sidecar.py holds the two answers equal).

The sidecar names the checkpoint it describes by size and modification time. ``select`` trusts it
only while ``checkpoint.pt`` still matches, so a checkpoint written after the sidecar (e.g. the
process died between the two writes) or one copied in by hand sends ``select`` down the full path
through the checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

from ..spaces import Arch, SearchSpace
from .selection import SelectionIndex, select_subnet

FILENAME = "selection.json"
FORMAT = "tofa_fast-selection-1"


def _checkpoint_stamp(checkpoint_path: str) -> dict[str, int]:
    stat = os.stat(checkpoint_path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def write_sidecar(
    checkpoint_path: str,
    space: SearchSpace,
    selection: SelectionIndex,
    flops: Callable[[list[Arch]], Iterable[float]],
    sandwich: bool,
) -> str:
    """Write ``selection.json`` beside ``checkpoint_path`` (atomically), describing that checkpoint as
    it is on disk now. ``flops`` is the metric ``select`` uses (``Estimator.flops``). Returns its path."""
    from .checkpoint import write_text_atomic  # torch-backed module; the reader never needs it

    archs = [space.max_arch(), space.min_arch(), *selection.archs()]
    values = {str(a): float(f) for a, f in zip(archs, flops(archs))}
    data = {
        "format": FORMAT,
        "checkpoint": _checkpoint_stamp(checkpoint_path),
        "space": space.to_dict(),
        "sandwich": sandwich,
        "index": selection.state_dict(),
        "flops": values,
    }
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), FILENAME)
    write_text_atomic(json.dumps(data, separators=(",", ":")), path)
    return path


def select_from_sidecar(run: str, max_mflops: float) -> Arch | None:
    """The zero-cost choice for ``max_mflops`` from ``RUN/selection.json``, or ``None`` when the run has
    no usable sidecar (missing, unreadable, another format, or older than ``checkpoint.pt``): the
    caller then takes the full path through the checkpoint.

    Raises:
        ValueError: no trained subnet fits the budget (the same error as the full path).
    """
    path = os.path.join(run, FILENAME)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") != FORMAT or data.get("checkpoint") != _checkpoint_stamp(
            os.path.join(run, "checkpoint.pt")
        ):
            return None
        space = SearchSpace.from_dict(data["space"])
        index = SelectionIndex(space, data["index"])
        flops: dict[str, float] = data["flops"]
        sandwich = bool(data["sandwich"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None

    def metric(archs: list[Arch]) -> list[float]:
        return [flops[str(a)] for a in archs]

    # The same call as the full path (run.Budget.choose), so the same choice and the same errors.
    return select_subnet(index, metric, max_mflops * 1e6, "FLOPs", sandwich=sandwich)
