"""What ONNX export needs installed, and a clear error naming it when it is missing.

``torch.onnx.export(..., dynamo=True)`` imports ``onnx`` and ``onnxscript`` only when it runs, so a
missing package shows up as a ``ModuleNotFoundError`` from deep inside ``torch.onnx`` after the
subnet has been selected and recalibrated. :func:`require_onnx_export` checks first and names the
packages to install. Both are main dependencies of tofa_fast (``pyproject.toml``); the floors here
are the same ones, and a test keeps the two in step.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re

# package -> lowest version that works with the installed torch. onnxscript >= 0.6 ships the
# framework API module torch >= 2.11 imports (``onnxscript._framework_apis.torch_2_11``) and keeps
# those of older torch releases; onnxscript itself needs onnx >= 1.17.
ONNX_EXPORT_REQUIREMENTS: dict[str, str] = {"onnx": "1.17", "onnxscript": "0.6"}


class MissingDependencyError(ImportError, ValueError):
    """A package an optional code path needs is missing or too old.

    An ``ImportError`` for Python callers; also a ``ValueError`` so that the command line reports it as
    bad input (one line, no traceback) like every other error it can explain.
    """


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def _installed_version(package: str) -> str | None:
    """The importable package's version, or ``None`` when it does not import (absent or broken)."""
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "0"


def missing_onnx_requirements() -> list[str]:
    """Requirement strings (``"onnxscript>=0.6"``) of the export packages missing or older than needed."""
    missing = []
    for package, floor in ONNX_EXPORT_REQUIREMENTS.items():
        installed = _installed_version(package)
        if installed is None or _version_tuple(installed) < _version_tuple(floor):
            missing.append(f"{package}>={floor}")
    return missing


def require_onnx_export() -> None:
    """Raise :class:`MissingDependencyError` naming the packages to install when ONNX export cannot run."""
    missing = missing_onnx_requirements()
    if missing:
        quoted = " ".join(f"'{requirement}'" for requirement in missing)
        raise MissingDependencyError(
            f"ONNX export needs {', '.join(missing)} (missing or too old here); install with "
            f"`pip install {quoted}`, or write a torch.export archive instead (-o model.pt)",
            name=missing[0].split(">=")[0],
        )
