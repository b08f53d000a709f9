"""Zero-cost subnet selection (TOFA Algorithm 2).

Every time subnet a is sampled at iteration t (1-based), I(a) += t. Given a metric M and budget B,
select argmax { I(a) : I(a) > 0, M(a) ≤ B }. Subnets sampled often and late — the ones the shared
weights were most recently fitted to — win.

Which subnets are "sampled": the paper's wording, and what makes the rule useful with the sandwich
rule. a_max and a_min are trained at *every* step, so indexing them would give them Σt, far above
any random subnet (trained once or twice in a space of ~10⁶–10¹⁹), and Algorithm 2 would return a_min
for every budget below the max subnet's. The trainer therefore indexes the two random members of
each sandwich, and :func:`select_subnet` treats the two fixed members explicitly: a_max whenever it
fits the budget (it is the most-trained subnet there is), a_min when no sampled subnet fits.

Near a_min this returns a sampled subnet trained at few steps (often one) rather than a_min, trained
at every step. Measured on digits (three seeds, ``examples/selection_near_min.py``), such choices
test as well as or better than a_min — none worse — so a sampled subnet that fits keeps priority
over a_min, as Algorithm 2 has it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from ..spaces import Arch, SearchSpace


class SelectionIndex:
    """The index I over subnets, keyed by canonical arch string; JSON/checkpoint friendly."""

    def __init__(self, space: SearchSpace, index: Mapping[str, int] | None = None):
        self.space = space
        self._index: dict[str, int] = {}
        for key, value in (index or {}).items():
            self.space.arch_from_string(key)  # validates that the key belongs to this space
            self._index[key] = int(value)

    def update(self, archs: Iterable[Arch], iteration: int) -> None:
        """Record that ``archs`` were trained at 1-based ``iteration``. A subnet listed twice in one
        step (e.g. a random draw equal to the max) is counted once per appearance."""
        if iteration < 1:
            raise ValueError(f"iteration is 1-based, got {iteration}")
        for arch in archs:
            key = str(arch)
            self._index[key] = self._index.get(key, 0) + iteration

    def __getitem__(self, arch: Arch | str) -> int:
        return self._index.get(str(arch), 0)

    def __len__(self) -> int:
        return len(self._index)

    def archs(self) -> list[Arch]:
        return [self.space.arch_from_string(k) for k in self._index]

    def state_dict(self) -> dict[str, int]:
        return dict(self._index)

    def select(
        self, metric: Callable[[list[Arch]], Iterable[float]], budget: float, metric_name: str = "metric"
    ) -> Arch:
        """argmax I(a) subject to metric(a) ≤ budget, among indexed subnets (ties: larger metric,
        i.e. more capacity within the budget).

        ``metric`` maps a list of archs to their values (e.g. ``Estimator.flops``). Raises
        ``ValueError`` naming the smallest available value when nothing fits.
        """
        archs = self.archs()
        if not archs:
            raise ValueError("the selection index is empty: no subnet has been trained yet")
        values = [float(v) for v in metric(archs)]
        best, best_key = None, None
        for arch, value in zip(archs, values):
            if value <= budget:
                key = (self._index[str(arch)], value)
                if best_key is None or key > best_key:
                    best, best_key = arch, key
        if best is None:
            raise ValueError(
                f"no trained subnet fits {metric_name} ≤ {budget:g}; the smallest available is {min(values):g}"
            )
        return best


def select_subnet(
    index: SelectionIndex,
    metric: Callable[[list[Arch]], Iterable[float]],
    budget: float,
    metric_name: str = "metric",
    sandwich: bool = True,
) -> Arch:
    """TOFA's zero-cost choice for ``budget``.

    With ``sandwich`` (runs of the ``tofa`` strategy, whose a_max and a_min train every step) the
    fixed members are handled as the module docstring says: a_max if it fits, else Algorithm 2 over
    the sampled subnets, else a_min if it fits. Without it (``rss``, ``ps``, ``single``: every trained
    subnet is indexed) it is Algorithm 2 as written."""
    if not sandwich:
        return index.select(metric, budget, metric_name)
    largest, smallest = index.space.max_arch(), index.space.min_arch()
    big, small = (float(v) for v in metric([largest, smallest]))
    if big <= budget:
        return largest
    try:
        return index.select(metric, budget, metric_name)
    except ValueError:
        if small <= budget:
            return smallest
        raise ValueError(
            f"no trained subnet fits {metric_name} ≤ {budget:g}; the smallest available is {small:g}"
        ) from None
