"""Checkpoints: atomic writes, ``weights_only=True`` loading, a format tag to reject foreign files."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import struct
import tempfile
import zipfile
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


def remove_stale_temporaries(path: str) -> None:
    """Delete the temporary files :func:`save_atomic` leaves beside ``path`` when its process is
    killed mid-write (they are never a checkpoint: the rename is what publishes one)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(".tmp-") and name.endswith(".pt"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))


def write_text_atomic(text: str, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load a tofa_fast checkpoint safely (``weights_only=True``).

    Anything else raises ``ValueError`` saying what the file is: missing, empty, not a checkpoint at
    all (text, random bytes, a zip archive that PyTorch did not write), truncated (a checkpoint cut
    short), a PyTorch file that is not a tofa_fast checkpoint (a plain state dict, a pickled model),
    or a tofa_fast checkpoint of another format version. The message never suggests
    ``weights_only=False``: unpickling arbitrary objects can run code, and no tofa_fast checkpoint
    needs it.
    """
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} is a folder, not a checkpoint file")
    _check_container(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(_refused_pickle_message(path, exc)) from None
    except Exception as exc:  # PyTorch's zip reader and unpickler fail in many types
        if isinstance(exc, EOFError) or "unexpected EOF" in str(exc):  # the legacy (non-zip) format, cut short
            raise ValueError(_truncated_message(path, "a legacy-format PyTorch file")) from None
        raise ValueError(
            f"checkpoint {path!r} is a PyTorch file but cannot be read: it is corrupted ({_reason(exc)})"
        ) from None
    _check_contents(path, state)
    return state


# The leading bytes of the two formats torch.save writes: a zip archive (PyTorch >= 1.6, what
# save_atomic writes) or the legacy pickle stream, which opens with protocol 2 and a pickled long.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a"


def _check_container(path: str) -> None:
    """Refuse files that are not PyTorch files at all, or are PyTorch zip archives cut short,
    before handing them to the unpickler (whose errors do not say which it is)."""
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"checkpoint {path!r} is empty (0 bytes): not a checkpoint, nothing was written to it")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(_LEGACY_MAGIC):
        return
    if not head.startswith(_ZIP_MAGIC):
        raise ValueError(
            f"checkpoint {path!r} is not a checkpoint at all: not a PyTorch file ({_describe_bytes(head)}); "
            "it is corrupted or some other kind of file"
        )
    if not zipfile.is_zipfile(path):
        # Without its end-of-archive record a zip cannot be read; a cut-short file loses it first.
        first = _first_zip_member(head)
        what = "a PyTorch file" if first.endswith("data.pkl") else f"a zip archive (first member {first!r})"
        raise ValueError(_truncated_message(path, f"{what} whose end-of-archive record is missing"))
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            shown = ", ".join(repr(n) for n in names[:3]) + (", …" if len(names) > 3 else "")
            raise ValueError(
                f"checkpoint {path!r} is not a checkpoint at all: a zip archive, but not one PyTorch wrote "
                f"(no data.pkl record; it holds {shown or 'nothing'})"
            )
        # PyTorch's reader does not verify the CRC32 of tensor records: damaged weights would load
        # silently. One sequential read of the file is cheap next to the training it resumes.
        damaged = archive.testzip()
    if damaged is not None:
        raise ValueError(
            f"checkpoint {path!r} is a PyTorch file but it is corrupted: record {damaged!r} fails its checksum"
        )


def _check_contents(path: str, state: Any) -> None:
    if isinstance(state, dict) and isinstance(state.get("format"), str):
        tag = state["format"]
        if tag == FORMAT:
            return
        if tag.startswith(FORMAT.rsplit("/", 1)[0] + "/"):
            raise ValueError(
                f"checkpoint {path!r} is a tofa_fast checkpoint of format {tag!r}, but this tofa_fast "
                f"reads {FORMAT!r}: it was written by another version of tofa_fast; use that version"
            )
    raise ValueError(
        f"{path!r} is a PyTorch file, but not a tofa_fast checkpoint (no format tag {FORMAT!r}): "
        f"it holds {_describe_object(state)}"
    )


def _truncated_message(path: str, what: str) -> str:
    return (
        f"checkpoint {path!r} is truncated: {what}, cut short at {os.path.getsize(path):,} bytes "
        "(an interrupted copy or a full disk)"
    )


def _refused_pickle_message(path: str, exc: BaseException) -> str:
    # PyTorch's own message recommends weights_only=False; only the names of the refused globals
    # are worth passing on.
    refused = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(exc))))
    if not refused:
        return f"checkpoint {path!r} is a PyTorch file but cannot be read: it is corrupted ({type(exc).__name__})"
    return (
        f"{path!r} is a PyTorch file, but not a tofa_fast checkpoint: it pickles Python objects "
        f"({', '.join(refused)}) that a safe weights-only load refuses — a whole pickled model or another "
        "program's file (tofa_fast checkpoints hold only tensors, numbers and strings)"
    )


def _reason(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if not first or "weights_only" in first:
        return type(exc).__name__
    return f"{type(exc).__name__}: {first[:200]}"


def _describe_bytes(head: bytes) -> str:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it begins with the bytes {head[:16]!r}"
    return f"text, beginning {text[:40]!r}"


def _first_zip_member(head: bytes) -> str:
    """Name of the first member from a zip local-file header (offsets 26/30 of the zip format)."""
    if len(head) < 30:
        return ""
    (name_length,) = struct.unpack_from("<H", head, 26)
    return head[30 : 30 + name_length].decode("utf-8", "replace")


def _describe_object(state: Any) -> str:
    if isinstance(state, torch.Tensor):
        return f"a single tensor of shape {tuple(state.shape)}"
    if isinstance(state, dict):
        keys = list(state)
        shown = ", ".join(repr(k) for k in keys[:3]) + (", …" if len(keys) > 3 else "")
        if keys and all(isinstance(v, torch.Tensor) for v in state.values()):
            return f"a plain state dict of {len(keys)} tensors ({shown}): model weights, not a training run"
        return f"a dict with keys {shown}" if keys else "an empty dict"
    if isinstance(state, (list, tuple)):
        return f"a {type(state).__name__} of {len(state)} items"
    return f"a {type(state).__name__}"
