"""Lazy package attributes (PEP 562): a package names what it exports and where each name lives, and
the module holding it is imported on first access.

Why: importing torch takes seconds, and ``tofa-fast select`` answers from a run's JSON sidecar
without it (tofa_fast/train/selection_sidecar.py); so neither ``tofa_fast`` nor ``tofa_fast.train``
imports torch until one of their torch-backed names is used. ``from tofa_fast import Supernet``,
``tofa_fast.ops.elastic_dwconv2d`` and ``tofa_fast.spaces.get`` work as before. The compiled ops under
``torch.ops.tofa_fast`` are registered when ``tofa_fast.ops``, ``tofa_fast.backends`` or anything
built on them (``Supernet``, ``Estimator``) is first imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_attributes(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``. ``names`` maps each exported name to the
    submodule (relative to ``package``) that defines it; a name that maps to itself is a submodule."""

    def __getattr__(name: str) -> object:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f"{package}.{names[name]}")
        value = module if names[name] == name else getattr(module, name)
        setattr(importlib.import_module(package), name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(names) | set(vars(importlib.import_module(package))))

    return __getattr__, __dir__
