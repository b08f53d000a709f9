"""``tofa-fast info``: version, backends, and why any backend is missing."""

from __future__ import annotations

import platform

import torch

from . import __version__, backends


def info_text() -> str:
    lines = [
        f"tofa_fast {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        "backends:",
    ]
    for status in backends.statuses():
        mark = "yes" if status.available else "no "
        lines.append(f"  {status.name:<7} {mark}  {status.detail}")
    return "\n".join(lines)
