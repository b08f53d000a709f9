"""Population evaluation (the RSS paper's protocol, SPEC §7): how good is a *random* subnet of a size?

A palette reports one chosen subnet per budget; a supernet's training scheme is better judged by the
whole population it leaves behind. For evenly spaced FLOPs targets t_1…t_K across the space's exact
range, ``per_target`` subnets are drawn uniformly among those with FLOPs in the narrow band
[t(1 − band), t(1 + band)] (:meth:`Estimator.sample`, exactly uniform), each is BN recalibrated and
tested, and the per-target mean / min / max / std describe the population at that size.

Draws are independent, so a narrow band holding few subnets (near the smallest subnet, typically)
yields repeats; the statistics are over draws, as in the protocol, and ``unique`` says how many
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
    """Measure ``per_target`` uniformly drawn subnets around each of ``targets`` FLOPs targets.

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
    evaluator = source if isinstance(source, SubnetEvaluator) else SubnetEvaluator.from_run(source, (split,))
    if estimator is None:
        estimator = Estimator(evaluator.space, num_classes=evaluator.net.num_classes)
    if estimator.space != evaluator.space:
        raise ValueError("estimator must score the evaluator's search space")
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
        archs = estimator.space.decode(codes)
        accuracy = evaluator.accuracy(archs, split)
        flops = estimator.flops(codes)
        results.append(
            PopulationTarget(
                target / 1e6,
                lo / 1e6,
                hi / 1e6,
                [float(f) / 1e6 for f in flops],
                [float(a) for a in accuracy],
                [str(a) for a in archs],
            )
        )
    return results


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
