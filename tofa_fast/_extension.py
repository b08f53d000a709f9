"""Loads the compiled extension ``tofa_fast._C`` and remembers why, when it cannot.

Importing ``tofa_fast._C`` registers the C++ (and, when built, CUDA) kernels with ``torch.library``.
When the import fails the package keeps working on its pure-PyTorch references; ``LOAD_ERROR`` holds
the reason, which ``tofa-fast info`` prints.
"""

from __future__ import annotations

import os

# torch must be imported first: the extension links against libtorch.
import torch  # noqa: F401

LOAD_ERROR: str | None = None
_C = None

if os.environ.get("TOFA_FAST_DISABLE_EXTENSION", "") == "1":
    LOAD_ERROR = "disabled by TOFA_FAST_DISABLE_EXTENSION=1"
else:
    try:
        from . import _C  # type: ignore[attr-defined, no-redef]
    except ImportError as exc:
        LOAD_ERROR = (
            f"tofa_fast._C is not importable ({exc}); build it with "
            "`pip install --no-build-isolation -e .` (scripts/setup_env.sh does)"
        )


def available() -> bool:
    """Whether the C++ extension is loaded."""
    return _C is not None


def built_with_cuda() -> bool:
    """Whether the loaded extension contains the CUDA kernels."""
    return _C is not None and bool(getattr(_C, "with_cuda", 0))


def built_with_openmp() -> bool:
    return _C is not None and bool(getattr(_C, "with_openmp", 0))
