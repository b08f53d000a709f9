"""Batched FLOPs / parameter / latency estimation for the archs of a search space (SPEC §6)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from .. import backends, spaces
from ..spaces import Arch, SearchSpace
from .layout import TableLayout, table_sum_reference, validate_codes

BACKENDS = ("auto", "cpp", "python")

ArchBatch = Arch | Mapping[str, Any] | Iterable[Arch | Mapping[str, Any]] | np.ndarray | torch.Tensor


def cpp_estimator_available() -> bool:
    """Whether the compiled ``torch.ops.tofa_fast.estimator_sum`` kernel is loaded (why not:
    :func:`tofa_fast.backends.estimator_reasons`, which ``tofa-fast info`` prints)."""
    return not backends.estimator_reasons()


class Estimator:
    """Scores archs of ``space``: exact fvcore FLOPs, parameter counts, table-predicted latency.

    Every per-layer quantity is computed once, at construction, into a flat lookup table
    (:class:`~tofa_fast.estimator.layout.TableLayout`); scoring a batch of encoded archs is then a few
    table lookups per arch in C++ (``torch.ops.tofa_fast.estimator_sum``), or in NumPy when the
    extension is missing (``backend="python"``, the reference).

    Args:
        space: a :class:`SearchSpace` or a preset name.
        num_classes: classifier outputs of the subnets being scored (it changes head FLOPs/params).
        latency_table: a :class:`~tofa_fast.estimator.latency.LatencyTable` or the path of one written
            by ``tofa-fast profile``; needed by :meth:`latency` only.
        device: if given, the device the latency table must have been measured on (``"cpu"``,
            ``"cuda"``); a table from another device is refused.
        backend: ``"auto"`` (C++ when loaded), ``"cpp"`` or ``"python"``.

    Inputs of :meth:`flops`, :meth:`params`, :meth:`latency`: one :class:`Arch` (or its dict form) →
    a Python number; a list of archs, or the int array of ``space.encode`` with shape
    ``(n, space.code_length)`` → a NumPy array of shape ``(n,)``.
    """

    def __init__(
        self,
        space: SearchSpace | str,
        num_classes: int = 1000,
        latency_table: Any = None,
        *,
        device: str | None = None,
        backend: str = "auto",
    ):
        space = spaces.get(space) if isinstance(space, str) else space
        if not isinstance(space, SearchSpace):
            raise TypeError(f"space must be a SearchSpace or a preset name, got {type(space).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        if backend == "cpp" and not cpp_estimator_available():
            raise RuntimeError(f"backend='cpp' asked for, but {'; '.join(backends.estimator_reasons())}")
        if backend == "auto":
            backend = "cpp" if cpp_estimator_available() else "python"
        self.space, self.num_classes, self.backend = space, int(num_classes), backend
        self.layout = TableLayout.build(space, self.num_classes)
        self._tables: dict[str, np.ndarray] = {
            "flops": self.layout.fill(lambda c: c.flops(), np.int64),
            "params": self.layout.fill(lambda c: c.params(), np.int64),
        }
        self._torch_tables: dict[str, torch.Tensor] = {}
        self._plan = tuple(
            torch.from_numpy(a)
            for a in (self.layout.header, self.layout.plan, self.layout.depths, self.layout.expand_masks)
        )
        self.latency_table = None
        if latency_table is not None:
            self._set_latency_table(latency_table, device)
        self._sampler = None

    def _set_latency_table(self, table: Any, device: str | None) -> None:
        from .latency import LatencyTable

        if isinstance(table, (str, os.PathLike)):
            table = LatencyTable.load(table)
        if not isinstance(table, LatencyTable):
            raise TypeError(f"latency_table must be a LatencyTable or a path, got {type(table).__name__}")
        table.check_compatible(self.space, self.num_classes, device)
        self.latency_table = table
        self._tables["latency"] = table.fill(self.layout)
        self._torch_tables.pop("latency", None)

    # -- input handling -------------------------------------------------------------------------

    def encode(self, archs: ArchBatch) -> tuple[np.ndarray, bool]:
        """Validated ``int32 (n, code_length)`` codes of ``archs`` and whether one arch was given."""
        space = self.space
        if isinstance(archs, (Arch, Mapping)):
            return space.encode([space.check(archs)]), True
        if isinstance(archs, torch.Tensor):
            if archs.device.type == "meta":
                raise ValueError("codes is a tensor on the meta device: it holds no choice indices to score")
            archs = archs.detach().cpu().numpy()
        if isinstance(archs, np.ndarray):
            return self._check_array(archs), False
        if isinstance(archs, (str, bytes)):
            raise TypeError("archs must be Arch objects, arch dicts or an encoded int array, got a string")
        try:
            items = list(archs)
        except TypeError:
            raise TypeError(
                f"archs must be Arch objects, arch dicts or an encoded int array, got {type(archs).__name__}"
            ) from None
        if not items:
            return np.zeros((0, space.code_length), dtype=np.int32), False
        return space.encode([space.check(a) if isinstance(a, Mapping) else a for a in items]), False

    def _check_array(self, codes: np.ndarray) -> np.ndarray:
        space = self.space
        if codes.ndim == 1:
            codes = codes[None, :]
        if codes.ndim != 2 or codes.shape[1] != space.code_length:
            raise ValueError(
                f"codes must have shape (n, {space.code_length}) (space.encode of space {space.name!r}), "
                f"got {tuple(codes.shape)}; is this an array of another space?"
            )
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be an integer array (space.encode gives int32), got dtype {codes.dtype}")
        if codes.dtype != np.int32:
            info = np.iinfo(np.int32)
            if codes.size and (codes.min() < info.min or codes.max() > info.max):
                raise ValueError(f"codes hold values outside int32; they are not choice indices of {space.name!r}")
            codes = codes.astype(np.int32)
        return np.ascontiguousarray(codes)

    # -- scoring --------------------------------------------------------------------------------

    def _sum(self, name: str, archs: ArchBatch) -> Any:
        codes, single = self.encode(archs)
        table = self._tables[name]
        if self.backend == "cpp":
            values = self._sum_cpp(name, codes)
        else:
            validate_codes(self.layout, codes)
            values = table_sum_reference(self.layout, codes, table)
        if single:
            return values[0].item()
        return values

    def _sum_cpp(self, name: str, codes: np.ndarray) -> np.ndarray:
        if name not in self._torch_tables:
            self._torch_tables[name] = torch.from_numpy(self._tables[name])
        try:
            out = torch.ops.tofa_fast.estimator_sum(torch.from_numpy(codes), *self._plan, self._torch_tables[name])
        except ValueError as exc:  # bad codes: the kernel names row and field, we add the space
            raise ValueError(f"{exc} (space {self.space.name!r})") from None
        return out.numpy()

    def flops(self, archs: ArchBatch) -> Any:
        """FLOPs (one multiply-add = one flop) exactly as fvcore counts the extracted eval-mode subnet
        on one image at the arch's resolution. int for one arch, int64 (n,) otherwise."""
        return self._sum("flops", archs)

    def params(self, archs: ArchBatch) -> Any:
        """Parameter count of the extracted subnet. int for one arch, int64 (n,) otherwise."""
        return self._sum("params", archs)

    def latency(self, archs: ArchBatch) -> Any:
        """Predicted latency in milliseconds from the latency table (on the table's device, batch size
        and thread count). float for one arch, float64 (n,) otherwise."""
        if self.latency_table is None:
            raise RuntimeError(
                f"this Estimator has no latency table; build one with `tofa-fast profile --space "
                f"{self.space.name} -o table.json` and pass latency_table='table.json'"
            )
        return self._sum("latency", archs)

    # -- FLOPs band -----------------------------------------------------------------------------

    def _band_sampler(self):
        from .sampler import FlopsBandSampler

        if self._sampler is None:
            self._sampler = FlopsBandSampler(self.layout, self._tables["flops"], self.flops)
        return self._sampler

    def flops_range(self) -> tuple[int, int]:
        """Exact (smallest, largest) FLOPs over all subnets of the space."""
        return self._band_sampler().flops_range()

    def sample(
        self,
        n: int,
        min_flops: float | None = None,
        max_flops: float | None = None,
        seed: int | np.random.Generator = 0,
        *,
        as_codes: bool = False,
    ) -> list[Arch] | np.ndarray:
        """``n`` subnets drawn independently and uniformly among *all* subnets of the space whose
        FLOPs lie in ``[min_flops, max_flops]`` (inclusive; ``None`` leaves that side open).

        Exact counting by dynamic programming over the stages (see :mod:`tofa_fast.estimator.sampler`
        for the algorithm and why it is exactly uniform). Raises ``ValueError`` naming the space's
        FLOPs range when no subnet lies in the band.

        Returns a list of :class:`Arch`, or their ``int32 (n, code_length)`` codes with ``as_codes``.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        if not isinstance(as_codes, bool):
            raise TypeError(f"as_codes must be True or False, got {as_codes!r}")
        low, high = self.flops_range()
        lo = low if min_flops is None else _flops_bound(min_flops, "min_flops", ceil=True)
        hi = high if max_flops is None else _flops_bound(max_flops, "max_flops", ceil=False)
        if min_flops is not None and max_flops is not None and lo > hi:
            raise ValueError(f"min_flops ({min_flops}) must not exceed max_flops ({max_flops})")
        sampler = self._band_sampler()
        if hi < low or lo > high:
            from .sampler import EmptyBandError

            raise EmptyBandError(sampler.empty_band_message(lo, hi))
        if not isinstance(seed, np.random.Generator) and (
            isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0
        ):
            raise ValueError(f"seed must be a non-negative integer or a numpy Generator, got {seed!r}")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        codes = sampler.sample(int(n), max(lo, low), min(hi, high), rng)
        return codes if as_codes else self.space.decode(codes)


def _flops_bound(value: float, name: str, ceil: bool) -> int:
    """FLOPs are integers: an inclusive real bound becomes the integer bound it implies."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not np.isfinite(value)
    ):
        raise ValueError(f"{name} must be a finite number of FLOPs, got {value!r}")
    return int(np.ceil(value)) if ceil else int(np.floor(value))
