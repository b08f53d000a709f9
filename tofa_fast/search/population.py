"""Population evaluation (SPEC §7): how good is a *random* subnet of a given size?

A palette reports one chosen subnet per budget; a supernet's training scheme is better judged by the
whole population it leaves behind. Two protocols measure that population; both BN-recalibrate and
test every drawn subnet (:class:`SubnetEvaluator`) and report per-target mean / min / max / std in
:class:`PopulationTarget` records, so :func:`plot_population` and the reports take either.

* ``band`` (this module, :func:`population_evaluation`; the default everywhere): evenly spaced FLOPs
  targets t_1…t_K across the space's exact range, ``per_target`` subnets drawn *uniformly among the
  subnets* with FLOPs in the relative band [t(1 − band), t(1 + band)] (:meth:`Estimator.sample`,
  exact counting). Every subnet of a size counts equally, whatever its choices; targets reach the
  range's ends; works on any space. Use it to describe a population.
* ``rss`` (:mod:`.rss_protocol`, :func:`~.rss_protocol.rss_population_evaluation`): the RSS paper's
  §6.1 protocol as written — fixed MFLOPs targets {4, 6, 8, 10, 12, 14} on the ``rss`` space, every
  setting drawn uniformly *layer by layer* until the subnet lands within a tolerance of the target
  (rejection sampling), with the width (expand ratio) locked at its minimum for the lowest target and
  at its maximum for the highest. The draw weighs subnets by how likely the per-layer draw makes
  them (shallow stages are over-represented against uniform-over-subnets), and the extreme targets
  see only extreme widths. Use it to reproduce the paper's Fig. 3 protocol for protocol.

Draws are independent, so a target holding few subnets (near the smallest subnet, typically)
yields repeats; the statistics are over draws, as in the paper, and ``unique`` says how many
distinct subnets they were.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..estimator import EmptyBandError, Estimator
from ..train.run_record import Run
from .evaluator import SubnetEvaluator


@dataclass
class PopulationTarget:
    """The subnets measured around one FLOPs target.

    Attributes:
        target_mflops: the target, in MFLOPs.
        low_mflops, high_mflops: the sampling band (clipped to the space's range).
        mflops: (n,) FLOPs of each draw, in MFLOPs.
        accuracy: (n,) accuracy of each draw in [0, 1].
        archs: (n,) canonical arch strings of the draws.
    """

    target_mflops: float
    low_mflops: float
    high_mflops: float
    mflops: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    archs: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.accuracy)

    @property
    def unique(self) -> int:
        return len(set(self.archs))

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracy))

    @property
    def min(self) -> float:
        return float(np.min(self.accuracy))

    @property
    def max(self) -> float:
        return float(np.max(self.accuracy))

    @property
    def std(self) -> float:
        """Population standard deviation (ddof 0: defined for a single draw too)."""
        return float(np.std(self.accuracy))

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_mflops": self.target_mflops,
            "low_mflops": self.low_mflops,
            "high_mflops": self.high_mflops,
            "n": self.n,
            "unique": self.unique,
            "mean": self.mean,
            "min": self.min,
            "max": self.max,
            "std": self.std,
            "points": [
                {"mflops": f, "accuracy": a, "arch": s} for f, a, s in zip(self.mflops, self.accuracy, self.archs)
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PopulationTarget:
        points = d.get("points", [])
        return cls(
            float(d["target_mflops"]),
            float(d["low_mflops"]),
            float(d["high_mflops"]),
            [float(p["mflops"]) for p in points],
            [float(p["accuracy"]) for p in points],
            [str(p["arch"]) for p in points],
        )


def population_targets(estimator: Estimator, targets: int) -> list[float]:
    """``targets`` evenly spaced FLOPs values from the smallest to the largest subnet's FLOPs (one
    target: the middle of the range)."""
    if isinstance(targets, bool) or not isinstance(targets, (int, np.integer)) or targets < 1:
        raise ValueError(f"targets must be a positive integer, got {targets!r}")
    low, high = (float(v) for v in estimator.flops_range())
    if targets == 1:
        return [(low + high) / 2]
    return [float(t) for t in np.linspace(low, high, int(targets))]


def population_evaluation(
    source: Run | SubnetEvaluator,
    estimator: Estimator | None = None,
    *,
    targets: int = 10,
    per_target: int = 20,
    band: float = 0.05,
    seed: int = 0,
    split: str = "test",
    progress: bool = False,
) -> list[PopulationTarget]:
    """Measure ``per_target`` uniformly drawn subnets around each of ``targets`` FLOPs targets (the
    ``band`` protocol; the RSS paper's own is :func:`~.rss_protocol.rss_population_evaluation`).

    Args:
        source: a :class:`~tofa_fast.train.Run` (an evaluator is built on it) or a
            :class:`SubnetEvaluator`.
        estimator: the FLOPs estimator (default: one for the source's space and classes).
        targets: number of evenly spaced targets across the space's FLOPs range.
        per_target: subnets drawn per target.
        band: relative half-width of the band around each target, in (0, 1).
        seed: the draws are deterministic given it.
        split: the labelled split measured (``"test"``; ``"val"`` when the run has one).
        progress: show a progress bar over targets.

    Returns one :class:`PopulationTarget` per target, in increasing FLOPs. Raises ``ValueError``
    naming the target and band when a band holds no subnet (widen ``band`` or use fewer targets).
    """
    if isinstance(per_target, bool) or not isinstance(per_target, (int, np.integer)) or per_target < 1:
        raise ValueError(f"per_target must be a positive integer, got {per_target!r}")
    if isinstance(band, bool) or not isinstance(band, (int, float)) or not math.isfinite(band) or not 0 < band < 1:
        raise ValueError(f"band must be a relative half-width in (0, 1), got {band!r}")
    evaluator, estimator = evaluator_and_estimator(source, estimator, split)
    low, high = (float(v) for v in estimator.flops_range())
    rng = np.random.default_rng(seed)
    results = []
    from tqdm import tqdm

    for target in tqdm(population_targets(estimator, targets), desc="population", disable=not progress, leave=False):
        lo, hi = max(low, target * (1 - band)), min(high, target * (1 + band))
        try:
            if math.ceil(lo) > math.floor(hi):  # FLOPs are integers: the band holds none
                raise EmptyBandError("no integer in the band")
            codes = estimator.sample(int(per_target), lo, hi, rng, as_codes=True)
        except EmptyBandError:
            raise ValueError(
                f"no subnet has FLOPs in the band [{lo / 1e6:.3f}, {hi / 1e6:.3f}] MFLOPs around the target "
                f"{target / 1e6:.3f} MFLOPs (band={band}); widen band or use fewer targets"
            ) from None
        results.append(measure_target(evaluator, estimator, codes, target, lo, hi, split))
    return results


def evaluator_and_estimator(
    source: Run | SubnetEvaluator, estimator: Estimator | None, split: str
) -> tuple[SubnetEvaluator, Estimator]:
    """The evaluator of ``source`` (built on a run for ``split``) and an estimator of its space (the
    one given, checked, or a new one for the supernet's classes)."""
    evaluator = source if isinstance(source, SubnetEvaluator) else SubnetEvaluator.from_run(source, (split,))
    if estimator is None:
        estimator = Estimator(evaluator.space, num_classes=evaluator.net.num_classes)
    if estimator.space != evaluator.space:
        raise ValueError("estimator must score the evaluator's search space")
    return evaluator, estimator


def measure_target(
    evaluator: SubnetEvaluator,
    estimator: Estimator,
    codes: np.ndarray,
    target: float,
    low: float,
    high: float,
    split: str,
) -> PopulationTarget:
    """Accuracy on ``split`` and FLOPs of the draws ``codes`` (int32 (n, code_length)) made around
    ``target`` in ``[low, high]`` (all three in FLOPs), as one :class:`PopulationTarget`."""
    archs = estimator.space.decode(codes)
    accuracy = evaluator.accuracy(archs, split)
    flops = estimator.flops(codes)
    return PopulationTarget(
        target / 1e6,
        low / 1e6,
        high / 1e6,
        [float(f) / 1e6 for f in flops],
        [float(a) for a in accuracy],
        [str(a) for a in archs],
    )


def plot_population(
    results_by_label: Mapping[str, Sequence[PopulationTarget]],
    path: str,
    title: str | None = None,
    ylabel: str = "test accuracy (%)",
) -> None:
    """Plot mean accuracy against MFLOPs with a min–max band, one line per label (e.g. one per
    training strategy), to ``path`` (PNG, written atomically)."""
    if not results_by_label:
        raise ValueError("results_by_label must hold at least one labelled result")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for color, (label, results) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 8, results_by_label.items()):
        if not results:
            raise ValueError(f"results_by_label[{label!r}] is empty")
        x = [r.target_mflops for r in results]
        ax.plot(x, [100 * r.mean for r in results], "o-", color=color, label=label, markersize=4)
        ax.fill_between(
            x, [100 * r.min for r in results], [100 * r.max for r in results], color=color, alpha=0.2, linewidth=0
        )
    ax.set_xlabel("MFLOPs (target)")
    ax.set_ylabel(f"{ylabel}: mean, min–max")
    ax.set_title(title or "population evaluation")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
