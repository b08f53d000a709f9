"""Checkpoints: atomic writes, ``weights_only=True`` loading, a format tag to reject foreign files."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

FORMAT = "tofa_fast.checkpoint/1"


def save_atomic(obj: Any, path: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: a crash
    leaves either the old or the new checkpoint, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(text: str, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load a tofa_fast checkpoint safely; a missing, corrupted or foreign file raises ``ValueError``."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ValueError(f"checkpoint {path!r} is corrupted or not a safe tofa_fast checkpoint: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a tofa_fast checkpoint (expected format tag {FORMAT!r})")
    return state
