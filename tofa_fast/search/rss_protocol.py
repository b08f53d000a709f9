"""Population evaluation as the RSS paper does it (its §6.1 "Evaluation Protocol", Fig. 3).

The paper samples "a group of subnets" per MFLOPs target, tests each and reports the population's
mean and spread. Read literally, its protocol has three parts, each of which differs from the
``band`` protocol of :mod:`.population` (see that module for when to use which):

* **Fixed targets.** {4, 6, 8, 10, 12, 14} MFLOPs on the paper's space, OFA MobileNetV3 w1.0 at
  32×32 — our ``rss`` preset (:data:`RSS_PAPER_TARGETS_MFLOPS`). Its "MFLOPs" are multiply-adds as
  OFA counts them, which is what :meth:`Estimator.flops` counts (fvcore: one multiply-add = one
  flop): on ``rss`` with 10 classes that measure spans 4.07–15.58 MFLOPs (4.18–15.70 with 100), so
  the six targets sit inside the range; counted as two flops per multiply-add the space would span
  8.1–31.2 and the 4 and 6 MFLOPs targets could not be met. On another space the default is six
  targets placed the same way: t_i = low + i·(high − low)/6, i = 0…5, over the space's exact
  FLOPs range — the smallest subnet's FLOPs first, the step one sixth of the range (on ``rss`` this
  gives 4.07, 5.99, …, 13.67, within 0.35 MFLOPs of the paper's targets).
* **Per-layer uniform draws, rejected until in range.** "Randomising all settings until the
  resulting subnet is within the required MFLOP range": every choice is drawn independently and
  uniformly, layer by layer (:meth:`SearchSpace.sample`'s distribution, vectorised here as
  :func:`per_layer_uniform_codes`), and a draw is kept when its FLOPs are within
  ``tolerance_mflops`` of the target. Kept draws follow the per-layer uniform distribution
  *conditioned* on the range — not uniform over the subnets in it: on ``rss`` a stage of depth 2
  spreads its 1/3 probability over 9² kernel × expand settings, one of depth 4 over 9⁴, so shallow
  subnets come up far more often than their number warrants.
* **Width locked at the extremes.** Subnets of 4 and 14 MFLOPs "are rare and challenging to sample
  in this manner", so for them "the width setting is locked at its minimum value … and locked at its
  maximum". Width is the expand ratio, set layer by layer in the paper's space: at the *lowest*
  target every layer's expand ratio is its smallest choice, at the *highest* its largest; all other
  targets, and every other setting, are free (``lock_extremes=False`` frees them all; with a single
  target nothing is locked). Locking makes those targets reachable: on ``rss`` a free draw lands
  within ±0.5 of 4 MFLOPs about 4 times in 10⁶ and of 14 MFLOPs not once in 4·10⁶ draws; locked,
  7 in 10³ and 18 in 10³.

**Tolerance.** The paper's width of "the required MFLOP range" is not in our copy of its text. The
default is ±0.5 MFLOPs on ``rss`` (:data:`RSS_DEFAULT_TOLERANCE_MFLOPS`: a quarter of the 2 MFLOPs
spacing, so ranges of neighbouring targets stay well apart) and a quarter of the default targets'
spacing, (high − low)/24, on other spaces.

Draws come in vectorised rounds of int codes (one NumPy draw per choice count, FLOPs by the
estimator's batched kernel), sized from the observed acceptance, each target with its own generator
spawned from ``seed`` — so the draws depend only on the space, the classes, the targets, the
tolerance and the seed, and every run of a space is measured on the same subnets. At most
``max_draws`` draws per target; a target that keeps too few raises ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..estimator import Estimator
from ..estimator.layout import allowed_expand_indices
from ..spaces import SearchSpace
from ..train.run_record import Run
from .evaluator import SubnetEvaluator
from .population import PopulationTarget, evaluator_and_estimator, measure_target

RSS_PAPER_TARGETS_MFLOPS = (4.0, 6.0, 8.0, 10.0, 12.0, 14.0)
# Our choice: the paper's tolerance is lost from our copy of its text (module docstring).
RSS_DEFAULT_TOLERANCE_MFLOPS = 0.5
EXPAND_LOCKS = ("free", "min", "max")
DEFAULT_MAX_DRAWS = 1_000_000
# Rows per round: 64 Ki rows of a ~60-column int32 code array is ~16 MiB.
MAX_DRAWS_PER_ROUND = 1 << 16
MIN_DRAWS_PER_ROUND = 1024


def per_layer_uniform_codes(space: SearchSpace, n: int, rng: np.random.Generator, expand: str = "free") -> np.ndarray:
    """``n`` independent per-layer uniform draws of ``space``, as ``int32 (n, space.code_length)`` codes.

    The distribution of :meth:`SearchSpace.sample` (not its random stream): resolution, stem width,
    head width, and per stage the width and depth are uniform over their choices; each active layer's
    kernel and expand ratio are uniform over that layer's choices (one of each per stage in a
    stage-granularity space); layers beyond the depth hold ``-1``. ``expand="min"`` / ``"max"`` locks
    every layer's expand ratio at its smallest / largest allowed choice instead.
    """
    if expand not in EXPAND_LOCKS:
        raise ValueError(f"expand must be one of {list(EXPAND_LOCKS)}, got {expand!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    # choices[c]: how many values column c draws from (the layout of SearchSpace.encode).
    choices = [len(space.resolutions), len(space.stem.widths), len(space.head.widths)]
    offsets = []
    for stage in space.stages:
        offsets.append(len(choices))
        depth = stage.max_depth
        choices += [len(stage.widths), len(stage.depths)] + [len(stage.kernels)] * depth
        choices += [len(allowed_expand_indices(stage, j)) for j in range(depth)]
    choices_arr = np.asarray(choices)
    codes = np.empty((int(n), len(choices)), dtype=np.int32)
    # One draw per distinct choice count: a scalar bound is several times faster than per-column bounds.
    for count in np.unique(choices_arr):
        columns = np.flatnonzero(choices_arr == count)
        codes[:, columns] = rng.integers(0, count, size=(int(n), len(columns)), dtype=np.int32)
    for stage, offset in zip(space.stages, offsets):
        depth = stage.max_depth
        kernels = codes[:, offset + 2 : offset + 2 + depth]
        expands = codes[:, offset + 2 + depth : offset + 2 + 2 * depth]
        for j in range(depth):
            allowed = np.asarray(allowed_expand_indices(stage, j), dtype=np.int32)
            if expand == "free":
                expands[:, j] = allowed[expands[:, j]]  # a draw among the allowed → its index in stage.expands
            else:
                expands[:, j] = allowed[0] if expand == "min" else allowed[-1]  # expands are sorted ascending
        if space.granularity == "stage":
            kernels[:, 1:] = kernels[:, :1]
            expands[:, 1:] = expands[:, :1]
        active_depth = np.asarray(stage.depths, dtype=np.int32)[codes[:, offset + 1]]
        inactive = np.arange(depth)[None, :] >= active_depth[:, None]
        kernels[inactive] = -1
        expands[inactive] = -1
    return codes


def rss_targets_mflops(estimator: Estimator) -> list[float]:
    """The default targets in MFLOPs: the paper's {4, …, 14} on the ``rss`` space, else six evenly
    spaced from the smallest subnet's FLOPs in steps of one sixth of the range (module docstring)."""
    if estimator.space.name == "rss":
        return list(RSS_PAPER_TARGETS_MFLOPS)
    low, high = (float(v) / 1e6 for v in estimator.flops_range())
    return [low + i * (high - low) / 6 for i in range(6)]


def rss_tolerance_mflops(estimator: Estimator) -> float:
    """The default tolerance in MFLOPs: 0.5 on ``rss``, else (high − low)/24 (module docstring)."""
    if estimator.space.name == "rss":
        return RSS_DEFAULT_TOLERANCE_MFLOPS
    low, high = estimator.flops_range()
    return (high - low) / 24 / 1e6


def expand_locks(n_targets: int, lock_extremes: bool = True) -> list[str]:
    """Expand lock per target, lowest target first: ``"min"`` for the lowest and ``"max"`` for the
    highest when ``lock_extremes`` and there are at least two targets, ``"free"`` otherwise."""
    if not lock_extremes or n_targets < 2:
        return ["free"] * n_targets
    return ["min"] + ["free"] * (n_targets - 2) + ["max"]


def sample_near_target(
    estimator: Estimator,
    n: int,
    target_mflops: float,
    tolerance_mflops: float,
    rng: np.random.Generator,
    *,
    expand: str = "free",
    max_draws: int = DEFAULT_MAX_DRAWS,
) -> np.ndarray:
    """``n`` per-layer uniform draws whose FLOPs are within ``tolerance_mflops`` of ``target_mflops``
    (inclusive), by rejection: ``int32 (n, code_length)`` codes, in the order they were drawn.

    ``expand`` locks the expand ratios (:func:`per_layer_uniform_codes`). Raises ``ValueError``
    naming the target, the tolerance, the lock and the number of draws tried when fewer than ``n``
    of ``max_draws`` draws are in range.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if isinstance(max_draws, bool) or not isinstance(max_draws, (int, np.integer)) or max_draws < 1:
        raise ValueError(f"max_draws must be a positive integer, got {max_draws!r}")
    if not _is_positive_number(target_mflops):
        raise ValueError(f"target_mflops must be a positive number of MFLOPs, got {target_mflops!r}")
    if not _is_positive_number(tolerance_mflops):
        raise ValueError(f"tolerance_mflops must be a positive number of MFLOPs, got {tolerance_mflops!r}")
    lo = math.ceil((target_mflops - tolerance_mflops) * 1e6)  # FLOPs are integers
    hi = math.floor((target_mflops + tolerance_mflops) * 1e6)
    kept = [np.empty((0, estimator.space.code_length), dtype=np.int32)]
    accepted = drawn = 0
    rate = 1.0  # optimistic first guess; the observed acceptance sizes the later rounds
    while accepted < n and drawn < max_draws:
        need = n - accepted
        k = min(MAX_DRAWS_PER_ROUND, max_draws - drawn, max(MIN_DRAWS_PER_ROUND, math.ceil(1.25 * need / rate)))
        codes = per_layer_uniform_codes(estimator.space, k, rng, expand)
        flops = estimator.flops(codes)
        hits = codes[(flops >= lo) & (flops <= hi)][:need]
        kept.append(hits)
        accepted += len(hits)
        drawn += k
        rate = max(accepted, 1) / drawn
    if accepted < n:
        locked = {
            "free": "",
            "min": ", expand ratios locked at their minimum",
            "max": ", expand ratios locked at their maximum",
        }[expand]
        raise ValueError(
            f"only {accepted} of {n} subnets within ±{tolerance_mflops:g} MFLOPs of the target "
            f"{target_mflops:g} MFLOPs after {drawn} per-layer uniform draws (max_draws={max_draws}{locked}); "
            "widen tolerance_mflops, move the target or raise max_draws"
        )
    return np.concatenate(kept)


def rss_population_evaluation(
    source: Run | SubnetEvaluator,
    estimator: Estimator | None = None,
    *,
    targets_mflops: Sequence[float] | np.ndarray | None = None,
    tolerance_mflops: float | None = None,
    per_target: int = 20,
    lock_extremes: bool = True,
    max_draws: int = DEFAULT_MAX_DRAWS,
    seed: int = 0,
    split: str = "test",
    progress: bool = False,
) -> list[PopulationTarget]:
    """Measure ``per_target`` subnets per target drawn as the RSS paper's §6.1 does (module docstring).

    Args:
        source, estimator, split, progress: as for :func:`~.population.population_evaluation`.
        targets_mflops: the targets, in MFLOPs (:meth:`Estimator.flops` units: multiply-adds);
            default :func:`rss_targets_mflops` (the paper's {4, …, 14} on ``rss``).
        tolerance_mflops: a draw is kept when its FLOPs are within this many MFLOPs of the target;
            default :func:`rss_tolerance_mflops` (0.5 on ``rss``; the paper's value is not in our copy).
        per_target: subnets kept per target.
        lock_extremes: lock every expand ratio at its minimum for the lowest target and at its
            maximum for the highest, as the paper does (:func:`expand_locks`).
        max_draws: per-layer uniform draws tried per target before giving up.
        seed: the draws are deterministic given it (each target has its own spawned generator).

    Returns one :class:`PopulationTarget` per target, in increasing FLOPs; ``low_mflops`` /
    ``high_mflops`` are target ∓ tolerance, clipped to the space's range. Every target is drawn
    before any subnet is measured, so a ``ValueError`` — a target whose range misses the space's
    FLOPs range, or that keeps fewer than ``per_target`` of ``max_draws`` draws — comes early.
    """
    if isinstance(per_target, bool) or not isinstance(per_target, (int, np.integer)) or per_target < 1:
        raise ValueError(f"per_target must be a positive integer, got {per_target!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(lock_extremes, bool):
        raise ValueError(f"lock_extremes must be True or False, got {lock_extremes!r}")
    evaluator, estimator = evaluator_and_estimator(source, estimator, split)
    targets = rss_targets_mflops(estimator) if targets_mflops is None else _checked_targets(targets_mflops)
    tolerance = rss_tolerance_mflops(estimator) if tolerance_mflops is None else tolerance_mflops
    if not _is_positive_number(tolerance):
        raise ValueError(f"tolerance_mflops must be a positive number of MFLOPs, got {tolerance!r}")
    low, high = (float(v) / 1e6 for v in estimator.flops_range())
    for t in targets:
        if t + tolerance < low or t - tolerance > high:
            raise ValueError(
                f"target {t:g} MFLOPs ± {tolerance:g} (tolerance_mflops) lies outside the FLOPs range of "
                f"space {estimator.space.name!r}, [{low:.3f}, {high:.3f}] MFLOPs"
            )
    generators = [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(len(targets))]
    draws = [
        sample_near_target(estimator, int(per_target), t, tolerance, rng, expand=lock, max_draws=max_draws)
        for t, lock, rng in zip(targets, expand_locks(len(targets), lock_extremes), generators)
    ]
    from tqdm import tqdm

    return [
        measure_target(
            evaluator, estimator, codes, t * 1e6, max(low, t - tolerance) * 1e6, min(high, t + tolerance) * 1e6, split
        )
        for t, codes in tqdm(list(zip(targets, draws)), desc="population (rss)", disable=not progress, leave=False)
    ]


def _is_positive_number(value: object) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(value)
        and value > 0
    )


def _checked_targets(targets: Sequence[float] | np.ndarray) -> list[float]:
    """The given targets, checked, in increasing order."""
    if isinstance(targets, (str, bytes)) or not isinstance(targets, (Sequence, np.ndarray)) or len(targets) == 0:
        raise ValueError(f"targets_mflops must be a non-empty list of MFLOPs values, got {targets!r}")
    values = list(np.asarray(targets).ravel()) if isinstance(targets, np.ndarray) else list(targets)
    if not all(_is_positive_number(t) for t in values):
        raise ValueError(f"targets_mflops must hold positive MFLOPs values, got {values}")
    if len(set(values)) != len(values):
        raise ValueError(f"targets_mflops lists a target twice: {values}")
    return sorted(float(t) for t in values)
