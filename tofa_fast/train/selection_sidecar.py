"""``RUN/selection.json``: what ``tofa-fast select`` needs, readable without torch.

The zero-cost choice needs the space, the selection index and each indexed subnet's FLOPs (or
parameter count, for a parameter budget); none of that needs the network's weights, yet reading it
from ``checkpoint.pt`` means importing torch (seconds). A latency budget needs the user's latency
table and takes the full path. So every checkpoint write is followed by this sidecar, and ``select`` answers from it
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
    params: Callable[[list[Arch]], Iterable[float]] | None = None,
) -> str:
    """Write ``selection.json`` beside ``checkpoint_path`` (atomically), describing that checkpoint as
    it is on disk now. ``flops`` and ``params`` are the metrics ``select`` uses (``Estimator.flops``,
    ``Estimator.params``; without ``params`` a parameter budget takes the full path). Returns its path."""
    from .checkpoint import write_text_atomic  # torch-backed module; the reader never needs it

    archs = [space.max_arch(), space.min_arch(), *selection.archs()]
    data = {
        "format": FORMAT,
        "checkpoint": _checkpoint_stamp(checkpoint_path),
        "space": space.to_dict(),
        "sandwich": sandwich,
        "index": selection.state_dict(),
        "flops": {str(a): float(f) for a, f in zip(archs, flops(archs))},
    }
    if params is not None:
        data["params"] = {str(a): float(n) for a, n in zip(archs, params(archs))}
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), FILENAME)
    write_text_atomic(json.dumps(data, separators=(",", ":")), path)
    return path


def select_from_sidecar(run: str, max_mflops: float | None = None, max_params: float | None = None) -> Arch | None:
    """The zero-cost choice for ``max_mflops`` (or ``max_params``: exactly one) from
    ``RUN/selection.json``, or ``None`` when the run has no usable sidecar (missing, unreadable,
    another format, older than ``checkpoint.pt``, or without parameter counts for a parameter
    budget): the caller then takes the full path through the checkpoint.

    Raises:
        ValueError: no trained subnet fits the budget (the same error as the full path).
    """
    if (max_mflops is None) == (max_params is None):
        return None  # not one budget: the full path says what is wrong
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
        values: dict[str, float] = data["flops"] if max_params is None else data["params"]
        sandwich = bool(data["sandwich"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None

    def metric(archs: list[Arch]) -> list[float]:
        return [values[str(a)] for a in archs]

    # The same calls as the full path (run.Budget.choose), so the same choice and the same errors.
    if max_params is None:
        return select_subnet(index, metric, max_mflops * 1e6, "FLOPs", sandwich=sandwich)
    return select_subnet(index, metric, max_params, "params", sandwich=sandwich)
