"""An op's backend table: which implementation serves a call, and why the others do not (xformers-style).

Every op with compiled kernels (``elastic_dwconv2d``, ``packed_batch_norm_act``) describes a call by
a small frozen *problem* (device type, dtypes, sizes: no tensor data) and has backends
(:class:`Backend` subclasses) that each return the reasons they refuse a problem — an empty list
means "I serve it". A :class:`BackendTable` holds, per device type, the backends in order of
preference; the first one with no reason to refuse serves the call. The op's pure-PyTorch reference
accepts everything, so it ends every row and serves the device types the table does not name.

Tests and benchmarks pin a backend by name with :meth:`BackendTable.use_backend`. A pinned backend
that refuses a call raises with its reasons instead of falling back, so a test of a kernel cannot
pass on the reference by accident. The pin is a context variable, one per table, so one op's pin
never reaches another op's table; a new thread starts without it, and since the autograd engine may
run a backward on one, the ops hand the forward's pin (:meth:`BackendTable.pinned_backend`) to their
backward.

The op modules keep what is theirs: the problem type, the backends, the rows of the table, and the
lines ``tofa-fast info`` prints about them.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Generic, Protocol, TypeVar


class DeviceProblem(Protocol):
    """What the table itself reads of a problem; the backends read the rest."""

    @property
    def device_type(self) -> str: ...


ProblemT = TypeVar("ProblemT", bound=DeviceProblem)


class Backend(Generic[ProblemT]):
    """One implementation of an op; the op's subclass adds its forward and backward."""

    name = "abstract"
    supports = ""  # one line for `tofa-fast info`

    def not_supported_reasons(self, problem: ProblemT) -> list[str]:
        """Why this backend cannot serve ``problem``, one phrase each; empty when it can."""
        raise NotImplementedError


BackendT = TypeVar("BackendT", bound=Backend)


class BackendTable(Generic[ProblemT, BackendT]):
    """Device type → backends in order of preference, plus the pin that overrides the order.

    Args:
        op: the op's name, which starts the message of a pinned backend's refusal.
        rows: device type → backends, most preferred first; each row ends with one that refuses
            nothing (the reference). Held, not copied: the op module's table is this one.
        fallback: the row of the device types ``rows`` does not name.
    """

    def __init__(self, op: str, rows: Mapping[str, tuple[BackendT, ...]], fallback: tuple[BackendT, ...]) -> None:
        self.op = op
        self.rows = rows
        self.fallback = fallback
        # Every backend reachable through some row can be pinned, by its name.
        self.backends: dict[str, BackendT] = {}
        for backend in (b for row in (*self.rows.values(), self.fallback) for b in row):
            self.backends.setdefault(backend.name, backend)
        self._pinned: contextvars.ContextVar[str | None] = contextvars.ContextVar(
            f"tofa_fast_{op}_backend", default=None
        )

    @contextlib.contextmanager
    def use_backend(self, name: str) -> Iterator[BackendT]:
        """Pin the backend ``name`` (a key of :attr:`backends`) inside the block; a pinned backend
        that refuses a call raises instead of falling back, so a test cannot pass on the reference
        by accident."""
        if name not in self.backends:
            raise ValueError(f"unknown backend {name!r}; choose one of {sorted(self.backends)}")
        token = self._pinned.set(name)
        try:
            yield self.backends[name]
        finally:
            self._pinned.reset(token)

    def pinned_backend(self) -> str | None:
        """The backend :meth:`use_backend` pins in this context, or None."""
        return self._pinned.get()

    def candidates(self, device_type: str) -> tuple[BackendT, ...]:
        """The row of ``device_type``: the backends tried in order when nothing is pinned."""
        return self.rows.get(device_type, self.fallback)

    def select_backend_for(self, problem: ProblemT) -> BackendT:
        """The pinned backend, or the first candidate of the problem's device that refuses nothing.

        Raises:
            RuntimeError: the pinned backend refuses the problem (the message gives its reasons).
        """
        pinned = self._pinned.get()
        if pinned is not None:
            backend = self.backends[pinned]
            if reasons := backend.not_supported_reasons(problem):
                raise RuntimeError(f"{self.op}: pinned backend {pinned} cannot serve {problem}: {'; '.join(reasons)}")
            return backend
        for backend in self.candidates(problem.device_type):
            if not backend.not_supported_reasons(problem):
                return backend
        raise AssertionError("the reference backend accepts every problem")

    def explain(self, problem: ProblemT) -> list[tuple[str, list[str]]]:
        """(backend name, reasons it refuses) for every candidate of the problem's device, in order."""
        return [(b.name, b.not_supported_reasons(problem)) for b in self.candidates(problem.device_type)]
