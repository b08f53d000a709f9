"""What one training step trains: its members and the role of each (SPEC §7).

A strategy turns its RNG into a :class:`StepPlan`; :mod:`.step` executes it. Every role is a named
field, so nothing downstream infers a role from a member's position in the step.

===============  ==========================================================================
role             meaning (terms of SPEC §7; ``x`` labelled, ``u`` unlabelled images)
===============  ==========================================================================
``sup``          label-smoothed CE on the weak view of ``x``
``fm``           FixMatch: CE on the strong view of ``u`` against the pseudo-labels
``kd``           KL from the pseudo-label teacher's soft labels on the weak view of ``u``
``teacher_kd``   KL from the strategy's frozen teacher (``ps``) on the weak view of ``x``
``indexed``      counted by the zero-cost selection index (TOFA Algorithm 2)
===============  ==========================================================================

The *pseudo-label teacher* is the subnet whose predictions on the weak view of ``u`` give the
pseudo-labels and soft labels (a_max for ``tofa``, the trained arch itself for ``single``); it is
run without gradient before the members.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..spaces import Arch


@dataclass(frozen=True)
class Member:
    """One subnet of a step and the loss terms it takes."""

    arch: Arch
    sup: bool = True
    fm: bool = False
    kd: bool = False
    teacher_kd: bool = False
    indexed: bool = True


@dataclass(frozen=True)
class StepPlan:
    """The members of one step, in the order their gradients are accumulated."""

    members: tuple[Member, ...]
    pseudo_label_teacher: Arch | None = None

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("a step plan needs at least one member")
        unlabelled_terms = any(m.fm or m.kd for m in self.members)
        if unlabelled_terms and self.pseudo_label_teacher is None:
            raise ValueError("members with fm or kd terms need a pseudo_label_teacher")

    @property
    def archs(self) -> list[Arch]:
        return [m.arch for m in self.members]

    @property
    def indexed_archs(self) -> list[Arch]:
        """The members the zero-cost selection index counts at this step."""
        return [m.arch for m in self.members if m.indexed]

    @property
    def uses_unlabelled(self) -> bool:
        return self.pseudo_label_teacher is not None
