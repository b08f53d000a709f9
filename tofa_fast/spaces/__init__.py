"""Search spaces: typed descriptions of elastic MBConv supernets and their subnets (SPEC §2).

>>> import tofa_fast
>>> space = tofa_fast.spaces.get("tofa")
>>> arch = space.sample(0)
>>> space.arch_from_dict(arch.to_dict()) == arch
True
"""

from __future__ import annotations

from collections.abc import Callable

from . import presets
from .space import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PADDINGS,
    Arch,
    HeadSpec,
    SearchSpace,
    StageArch,
    StageSpec,
    StemSpec,
    make_divisible,
)

_PRESETS: dict[str, Callable[..., SearchSpace]] = {
    "tofa": presets.tofa,
    "ofa_mbv3": presets.ofa_mbv3,
    "rss": presets.rss,
    "digits": presets.digits,
}


def names() -> list[str]:
    """Names of the preset spaces, for :func:`get`."""
    return sorted(_PRESETS)


def get(name: str, **options) -> SearchSpace:
    """Build a preset space by name; ``options`` go to the preset (``ofa_mbv3`` takes
    ``width_mult`` and ``resolutions``)."""
    if isinstance(name, SearchSpace):
        return name
    if not isinstance(name, str):
        raise TypeError(f"space name must be a str (one of {names()}) or a SearchSpace, got {type(name).__name__}")
    try:
        factory = _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown search space {name!r}; available: {names()}") from None
    return factory(**options)


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PADDINGS",
    "Arch",
    "HeadSpec",
    "SearchSpace",
    "StageArch",
    "StageSpec",
    "StemSpec",
    "get",
    "make_divisible",
    "names",
]
