"""Latency tables: per-layer latencies measured on the user's device, and how they predict a subnet.

A table maps every distinct layer configuration a space can produce (:meth:`TableLayout.configs`,
keyed by :attr:`StemConfig.key` & co.) to its measured latency in milliseconds on one device, at one
batch size and thread count. A subnet's predicted latency is

    latency(arch) = scale · Σ_layers t(layer) + layer_overhead_ms · n_layers + offset_ms

where the sum runs over the stem, every active MBConv block and the head. Summing isolated layer
timings misses what only a whole network pays — the container modules' calls, caches holding other
layers' weights — so ``tofa-fast profile`` times a few *calibration* subnets end to end and fits
``scale``, ``layer_overhead_ms`` and ``offset_ms`` by least squares (``calibration`` records the fit).
All three fold into the per-layer table entries, so the C++ estimator still only sums lookups.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..spaces import SearchSpace
from .layers import StemConfig
from .layout import TableLayout

FORMAT = "tofa_fast.latency_table/1"


def space_fingerprint(space: SearchSpace) -> str:
    """Hash of the space's full description: two spaces with the same name but other choices differ."""
    return hashlib.sha256(space.to_json().encode()).hexdigest()[:16]


@dataclass
class LatencyTable:
    """Per-layer latencies (ms) of one space on one device. Round-trips to JSON (:meth:`save`/:meth:`load`).

    Attributes:
        space, space_fingerprint: which space (name and :func:`space_fingerprint`).
        device, device_name: ``"cpu"``/``"cuda"`` and the processor it was measured on.
        batch_size, num_classes, threads: the measurement conditions predictions hold for.
        clock: ``"thread_cpu"`` (one CPU thread: CPU time of the calling thread, immune to other
            processes on a shared machine) or ``"wall"``.
        entries: layer key → latency in ms (min over repeats and passes; interference only ever adds time).
        counts: layer key → passes measured so far; the table is complete when each of the
            ``expected`` distinct layer configurations of the space has ``passes`` of them.
        scale, layer_overhead_ms, offset_ms: the whole-network correction (module docstring).
        calibration_ms, calibration_passes: whole-subnet timings of the calibration subnets (arch
            string → ms, min over passes) while they are being collected.
        calibration: how the correction was fitted (subnets, residuals), for the record; ``None``
            until it is.
    """

    space: str
    space_fingerprint: str
    device: str
    device_name: str
    batch_size: int
    num_classes: int
    threads: int
    torch_version: str
    expected: int
    clock: str = "wall"
    passes: int = 1
    entries: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    scale: float = 1.0
    layer_overhead_ms: float = 0.0
    offset_ms: float = 0.0
    calibration_ms: dict[str, float] = field(default_factory=dict)
    calibration_passes: int = 0
    calibration: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        return len(self.entries) >= self.expected and all(c >= self.passes for c in self.counts.values())

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    # -- JSON ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file + rename): an interrupted write never leaves a broken table."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".latency-", suffix=".json", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"latency table {os.fspath(path)!r} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"latency table {os.fspath(path)!r} is not valid JSON: {exc}") from None
        return cls.from_dict(data, source=os.fspath(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "latency table") -> LatencyTable:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{source} is not a tofa_fast latency table (expected format {FORMAT!r})")
        data = dict(data)
        data.pop("format")
        try:
            table = cls(**data)
        except TypeError as exc:
            raise ValueError(f"{source} is not a valid latency table: {exc}") from None
        bad = [k for k, v in table.entries.items() if not isinstance(v, (int, float)) or not v >= 0]
        if bad:
            raise ValueError(f"{source} has invalid latencies for {len(bad)} layer(s), e.g. {bad[0]!r}")
        return table

    # -- use by the estimator -----------------------------------------------------------------

    def check_compatible(self, space: SearchSpace, num_classes: int, device: str | None = None) -> None:
        """Refuse a table of another space, class count or device, or an incomplete one."""
        if self.space_fingerprint != space_fingerprint(space):
            raise ValueError(
                f"latency table was measured for space {self.space!r} (fingerprint {self.space_fingerprint}), "
                f"not for space {space.name!r} (fingerprint {space_fingerprint(space)}); profile this space with "
                f"`tofa-fast profile --space {space.name}`"
            )
        if self.num_classes != num_classes:
            raise ValueError(
                f"latency table was measured with num_classes={self.num_classes}, the estimator has "
                f"num_classes={num_classes}"
            )
        if device is not None and _device_kind(device) != self.device:
            raise ValueError(
                f"latency table was measured on device {self.device!r} ({self.device_name}), not on {device!r}"
            )
        if not self.complete:
            raise ValueError(
                f"latency table of space {self.space!r} is incomplete ({sum(self.counts.values())} of "
                f"{self.expected * self.passes} layer timings done); resume it by re-running the same "
                "`tofa-fast profile` command"
            )

    def layer_latency(self, key: str) -> float:
        try:
            return self.entries[key]
        except KeyError:
            raise ValueError(f"latency table of space {self.space!r} has no entry for layer {key!r}") from None

    def fill(self, layout: TableLayout) -> np.ndarray:
        """The estimator's float64 table: corrected per-layer latencies, the constant on the stem."""

        def value(config) -> float:
            ms = self.scale * self.layer_latency(config.key) + self.layer_overhead_ms
            # Every subnet has exactly one stem: it carries the per-network constant.
            return ms + self.offset_ms if isinstance(config, StemConfig) else ms

        return layout.fill(value, np.float64)


def _device_kind(device: str) -> str:
    return str(device).split(":")[0]
