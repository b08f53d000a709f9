"""The backend table shared by the ops (tofa_fast/ops/dispatch_table.py), on toy backends."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tofa_fast.ops.dispatch_table import Backend, BackendTable


@dataclass(frozen=True)
class Problem:
    device_type: str
    size: int


class Toy(Backend[Problem]):
    def __init__(self, name: str, device_type: str | None, max_size: int | None) -> None:
        self.name, self.device_type, self.max_size = name, device_type, max_size

    def not_supported_reasons(self, problem: Problem) -> list[str]:
        reasons = []
        if self.device_type is not None and problem.device_type != self.device_type:
            reasons.append(f"serves {self.device_type} only")
        if self.max_size is not None and problem.size > self.max_size:
            reasons.append(f"size {problem.size} > {self.max_size}")
        return reasons


FAST, SLOW, REFERENCE = Toy("fast", "cpu", 4), Toy("slow", "cpu", 8), Toy("reference", None, None)


def make_table(op: str = "toy") -> BackendTable[Problem, Toy]:
    return BackendTable(op, {"cpu": (FAST, SLOW, REFERENCE)}, (REFERENCE,))


def test_first_backend_without_a_reason_serves():
    table = make_table()
    assert [table.select_backend_for(Problem("cpu", n)) for n in (1, 6, 9)] == [FAST, SLOW, REFERENCE]
    assert table.candidates("meta") == (REFERENCE,) and table.select_backend_for(Problem("meta", 1)) is REFERENCE
    assert table.explain(Problem("cpu", 6)) == [("fast", ["size 6 > 4"]), ("slow", []), ("reference", [])]
    assert list(table.backends) == ["fast", "slow", "reference"]


def test_a_pin_refuses_instead_of_falling_back_and_stays_in_its_table_and_block():
    table, other = make_table(), make_table("other")
    with table.use_backend("fast") as backend:
        assert backend is FAST and table.pinned_backend() == "fast" and other.pinned_backend() is None
        assert table.select_backend_for(Problem("cpu", 1)) is FAST
        with pytest.raises(
            RuntimeError, match=r"^toy: pinned backend fast cannot serve .*: serves cpu only; size 9 > 4$"
        ):
            table.select_backend_for(Problem("meta", 9))
    assert table.pinned_backend() is None
    with pytest.raises(ValueError, match=r"unknown backend 'cudnn'; choose one of \['fast', 'reference', 'slow'\]"):
        with table.use_backend("cudnn"):
            pass
