"""Uniform sampling of the subnets whose FLOPs lie in a band, by exact counting.

Every subnet of a space is one path through its choices: resolution, stem width, then per stage the
width, the depth and the kernel/expand of each active layer, then the head width. Its FLOPs are the
sum of table entries along that path (:mod:`.layout`): the stem, one entry per stage (stage
granularity) or per active layer (layer granularity), the head — ``m`` parts at most.

**Counting.** FLOPs are large exact integers, so the dynamic programme runs on *quantised* FLOPs:
each part ``f`` becomes ``⌊f / q⌋`` and a path's quantised total ``B`` satisfies
``B·q ≤ F ≤ B·q + m·(q − 1)``. For each resolution the DP walks the stages carrying the previous
width (it sets the next stage's input channels, and the last one the head's) and a histogram over
``B``: ``count[w][B]`` = number of partial paths ending in width ``w`` with quantised total ``B``.
Counts are float64: exact integers while a space has fewer than 2⁵³ subnets (``tofa``: ~10¹¹), and
within a relative 10⁻¹³ beyond (``ofa_mbv3``: ~10²⁰) — below the 2⁻⁵³ resolution of the uniform
draws that pick among them anyway.

**Sampling.** The candidate set ``S`` is every subnet with ``B`` in
``[⌈(lo − m(q−1)) / q⌉, ⌊hi / q⌋]``, a superset of the band ``[lo, hi]``. A subnet of ``S`` is drawn
uniformly by walking the DP backwards (each choice with probability proportional to the number of
completions), vectorised over all draws. Its exact FLOPs then decide acceptance. Uniform on ``S``
and conditioned on the band, the accepted subnets are exactly uniform on the band. ``q`` is chosen so
that the slack ``m(q − 1)`` is at most a quarter of the band's width (``q = 1``, no rejection at all,
when the band is narrow and the DP fits in memory), so most candidates are accepted; draws come in
vectorised rounds sized from the observed acceptance, at most :data:`MAX_ROUNDS` of them.

**Empty bands.** An empty candidate set proves the band empty. When candidates exist but none is
accepted, they all sit in the slack: the quantum is refined (down to ``q = 1``, exact counting, as
far as memory allows) and counted again; if even the finest quantum leaves only slack candidates,
the band is declared empty once every candidate has had ~50 chances to come up (an in-band subnet
would be missed with probability e⁻⁵⁰). Either way :class:`EmptyBandError` (a ``ValueError``) names
the space's exact FLOPs range.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .layout import STAGE_FIELDS, TableLayout, allowed_expand_indices

MAX_ROUNDS = 32
MAX_CANDIDATES_PER_ROUND = 1 << 16
# DP histogram cells kept in memory for one resolution's backward walk (float64: 64 MiB).
MAX_STORED_CELLS = 1 << 23
MAX_BINS = 1 << 20


@dataclass(frozen=True)
class _StageTables:
    """Quantised tables of one stage (see :meth:`TableLayout.stage_tables`)."""

    first: np.ndarray  # stage granularity: [r, w_in, w, d, k, e]; layer: [r, w_in, w, k, e]
    later: np.ndarray | None  # layer granularity with max depth > 1: [r, w, k, e]


class FlopsBandSampler:
    """Draws encoded archs uniformly among those whose FLOPs lie in ``[lo, hi]`` (module docstring).

    Args:
        layout: the table layout of the space.
        flops_table: exact per-part FLOPs (int64, ``layout.size``).
        exact_flops: exact FLOPs of encoded archs (the estimator's batched kernel).
    """

    def __init__(self, layout: TableLayout, flops_table: np.ndarray, exact_flops: Callable[[np.ndarray], np.ndarray]):
        self.layout, self.table, self.exact_flops = layout, flops_table, exact_flops
        self.space = layout.space
        self.stage_granularity = layout.field("stage_granularity") == 1
        self.rows = [dict(zip(STAGE_FIELDS, row.tolist())) for row in layout.plan]
        # Parts per path: stem + head + one per stage (stage granularity) or one per active layer.
        self.parts = 2 + sum(1 if self.stage_granularity else st.max_depth for st in self.space.stages)
        # allowed[s][j]: bool (n_expands,), the expand indices layer j of stage s may use.
        self.allowed = [
            [np.isin(np.arange(len(st.expands)), allowed_expand_indices(st, j)) for j in range(st.max_depth)]
            for st in self.space.stages
        ]
        self._range: tuple[int, int] | None = None

    # -- exact range ----------------------------------------------------------------------------

    def flops_range(self) -> tuple[int, int]:
        """Exact smallest and largest FLOPs of any subnet of the space."""
        if self._range is None:
            self._range = (self._extreme(np.min), self._extreme(np.max))
        return self._range

    def _extreme(self, pick) -> int:
        layout, table = self.layout, self.table
        best = []
        for r in range(layout.field("n_resolutions")):
            cur = layout.stem_table(table)[r].astype(object)  # Python ints: no overflow, exact
            for s, stage in enumerate(self.space.stages):
                first, later = layout.stage_tables(table, s)
                if self.stage_granularity:
                    part = pick(first[r].reshape(*first.shape[1:3], -1), axis=2)  # [w_in, w]
                else:
                    allowed = self.allowed[s]
                    f = pick(first[r][:, :, :, allowed[0]].reshape(*first.shape[1:3], -1), axis=2)
                    # cumulative[d] = extreme over the first d layers (layers ≥ 1 may allow other expands)
                    cumulative = [f]
                    for j in range(1, stage.max_depth):
                        layer = pick(later[r][:, :, allowed[j]].reshape(later.shape[1], -1), axis=1)
                        cumulative.append(cumulative[-1] + layer[None, :])
                    part = pick(np.stack([cumulative[d - 1] for d in stage.depths]), axis=0)
                cur = pick(cur[:, None] + part.astype(object), axis=0)
            head = layout.head_table(table)[r]
            best.append(pick(cur[:, None] + head.astype(object)))
        return int(pick(np.asarray(best, dtype=object)))

    # -- sampling -------------------------------------------------------------------------------

    def sample(self, n: int, lo: int, hi: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` i.i.d. uniform draws from the subnets with ``lo ≤ FLOPs ≤ hi``: int32 (n, code_length)."""
        q, q_min = self._quantum(lo, hi), self._min_quantum(hi)
        while True:
            plan = _Candidates.build(self, q, lo, hi)
            if plan.total == 0:
                raise EmptyBandError(self.empty_band_message(lo, hi))
            out, drawn = self._rejection_rounds(plan, n, lo, hi, rng, refine=q > q_min)
            if len(out) == 0 and q > q_min:
                # Nothing accepted although candidates exist: they all sit in the slack. Refine the
                # quantum (down to exact counting, q = 1, where memory allows) and count again.
                q = max(q_min, q // 64)
                continue
            break
        if len(out) < n:
            if len(out) == 0:
                raise EmptyBandError(
                    self.empty_band_message(lo, hi)
                    + f" (none of {drawn} candidates drawn uniformly from the {plan.total:.4g} subnets within "
                    f"{plan.slack} FLOPs of the band was inside it)"
                )
            raise RuntimeError(
                f"only {len(out)} of {n} subnets found in [{lo}, {hi}] FLOPs after {drawn} candidates "
                f"(acceptance {len(out) / drawn:.2e}); widen the band"
            )
        return out

    def _rejection_rounds(self, plan: _Candidates, n: int, lo: int, hi: int, rng, refine: bool):
        """Vectorised rounds of candidates until ``n`` are accepted (at most MAX_ROUNDS rounds; one
        round only when nothing is accepted and the caller can refine instead)."""
        out = np.empty((0, self.space.code_length), dtype=np.int32)
        drawn, rate = 0, plan.rate
        for _ in range(MAX_ROUNDS):
            need = n - len(out)
            if need <= 0:
                break
            k = int(min(MAX_CANDIDATES_PER_ROUND, np.ceil(1.25 * need / rate) + 16))
            codes = self._draw(plan, k, rng)
            flops = self.exact_flops(codes)
            keep = (flops >= lo) & (flops <= hi)
            out = np.concatenate([out, codes[keep][:need]])
            drawn += k
            rate = max(len(out) / drawn, 1.0 / drawn)
            if len(out) == 0 and (refine or drawn >= 50 * plan.total):
                # Refinable: count again with a finer quantum. Or every candidate has had ~50 chances
                # to come up (a subnet of the band would be missed with probability e^-50): empty.
                break
        return out, drawn

    def _resolutions(self) -> range:
        return range(self.layout.field("n_resolutions"))

    def empty_band_message(self, lo: int, hi: int) -> str:
        """The error for an empty band: names the band and the space's exact FLOPs range."""
        low, high = self.flops_range()
        return (
            f"no subnet of space {self.space.name!r} has FLOPs in [{lo}, {hi}] "
            f"({lo / 1e6:.3f}–{hi / 1e6:.3f} MFLOPs); the space spans [{low}, {high}] FLOPs "
            f"({low / 1e6:.3f}–{high / 1e6:.3f} MFLOPs)"
        )

    def _cells_per_bin(self) -> int:
        cells = self.layout.field("n_stem")
        for row in self.rows:
            if self.stage_granularity:
                cells += row["n_in_widths"] + row["n_widths"]
            else:
                cells += row["n_in_widths"] * row["n_widths"] * (row["max_depth"] + 1) + row["n_widths"]
        return cells

    def _min_quantum(self, hi: int) -> int:
        """Smallest quantum whose histograms (``hi / q`` bins) fit the memory bound."""
        max_bins = min(MAX_BINS, MAX_STORED_CELLS // self._cells_per_bin())
        return max(1, -(-(hi + 1) // max_bins))

    def _quantum(self, lo: int, hi: int) -> int:
        """Quantum ``q``: slack m(q−1) at most a quarter of the band, histograms within memory."""
        return max(1, (hi - lo + 1) // (4 * self.parts), self._min_quantum(hi))

    def _quantise(self, q: int) -> tuple[np.ndarray, list[_StageTables], np.ndarray]:
        layout, table = self.layout, self.table
        stages = []
        for s in range(len(self.space.stages)):
            first, later = layout.stage_tables(table, s)
            stages.append(_StageTables(first // q, None if later is None else later // q))
        return layout.stem_table(table) // q, stages, layout.head_table(table) // q

    # -- the DP -------------------------------------------------------------------------------

    def _forward(self, quantised, r: int, nbins: int, store: bool):
        """Histograms after each stage for resolution ``r``: returns (count[w_last][B], stored) where
        ``stored[s]`` is what the backward walk of stage ``s`` needs (None unless ``store``)."""
        stem, stages, _ = quantised
        hist = np.zeros((len(stem[r]), nbins))
        for i, b in enumerate(stem[r]):
            if b < nbins:
                hist[i, b] = 1.0
        stored = []
        for s, st in enumerate(stages):
            row, stage = self.rows[s], self.space.stages[s]
            out = np.zeros((row["n_widths"], nbins))
            if self.stage_granularity:
                for wi in range(row["n_widths"]):
                    for ii in range(row["n_in_widths"]):
                        _shift_add(out[wi], hist[ii], st.first[r, ii, wi].ravel())
                stored.append(hist if store else None)
            else:
                dmax = row["max_depth"]
                partial = np.zeros((row["n_in_widths"], row["n_widths"], dmax + 1, nbins))
                for ii in range(row["n_in_widths"]):
                    for wi in range(row["n_widths"]):
                        partial[ii, wi, 0] = hist[ii]
                        allowed = self.allowed[s]
                        _shift_add(partial[ii, wi, 1], hist[ii], st.first[r, ii, wi][:, allowed[0]].ravel())
                        for j in range(2, dmax + 1):  # layer j − 1 takes the count from j − 1 to j layers
                            shifts = st.later[r, wi][:, allowed[j - 1]].ravel()
                            _shift_add(partial[ii, wi, j], partial[ii, wi, j - 1], shifts)
                        for depth in stage.depths:
                            out[wi] += partial[ii, wi, depth]
                stored.append(partial if store else None)
            hist = out
        return hist, stored

    def _head_weights(self, quantised, r: int, hist: np.ndarray, b_lo: int, b_hi: int) -> np.ndarray:
        """Weights of (last width, head, B) for totals B in [b_lo, b_hi]: shape (n_last, n_head, nB)."""
        head = quantised[2][r]  # [w_last, h]
        b_hi = min(b_hi, hist.shape[1] - 1)
        if b_lo > b_hi:
            return np.zeros((*head.shape, 0))
        before = np.arange(b_lo, b_hi + 1)[None, None, :] - head[:, :, None]
        widths = np.arange(head.shape[0])[:, None, None]
        return np.where(before >= 0, hist[widths, np.clip(before, 0, None)], 0.0)

    def _draw(self, plan: _Candidates, k: int, rng: np.random.Generator) -> np.ndarray:
        """``k`` i.i.d. uniform candidates from S, in draw order (so the first accepted are i.i.d.)."""
        resolution = rng.choice(len(plan.counts), size=k, p=plan.counts / plan.total)
        codes = np.full((k, self.space.code_length), -1, dtype=np.int32)
        for r in np.unique(resolution):
            rows = np.flatnonzero(resolution == r)
            codes[rows] = self._walk_back(plan, int(r), len(rows), rng)
        return codes

    def _walk_back(self, plan: _Candidates, r: int, k: int, rng: np.random.Generator) -> np.ndarray:
        """``k`` draws for resolution ``r``: the DP walked backwards, each choice ∝ its completions."""
        stem, stages, head = plan.quantised
        b_lo = plan.b_lo
        if r not in plan.walks:
            walk = self._forward(plan.quantised, r, plan.nbins, store=True)
            if (len(plan.walks) + 1) * plan.nbins * self._cells_per_bin() <= MAX_STORED_CELLS:
                plan.walks[r] = walk  # kept for the next rounds while memory allows
        else:
            walk = plan.walks[r]
        hist, stored = walk
        weights = self._head_weights(plan.quantised, r, hist, b_lo, plan.b_hi)
        w, h, bi = np.unravel_index(_categorical(weights.reshape(1, -1), rng, k), weights.shape)
        remaining = b_lo + bi - head[r][w, h]
        codes = np.full((k, self.space.code_length), -1, dtype=np.int32)
        codes[:, 0], codes[:, 2] = r, h
        everyone = np.arange(k)
        for s in reversed(range(len(stages))):
            row, stage, st = self.rows[s], self.space.stages[s], stages[s]
            off, dmax = row["code_offset"], row["max_depth"]
            depth_values = np.asarray(stage.depths)
            codes[:, off] = w
            if self.stage_granularity:
                # One joint choice of (input width, depth, kernel, expand) per stage.
                shape = (row["n_in_widths"], *st.first.shape[3:])
                parts = np.moveaxis(st.first[r][:, w], 1, 0).reshape(k, -1)  # (k, options)
                w_in_of = np.unravel_index(np.arange(parts.shape[1]), shape)[0]
                pick = _categorical(_gather(stored[s], w_in_of[None, :], remaining[:, None] - parts), rng)
                w_in, di, ki, ei = np.unravel_index(pick, shape)
                remaining = remaining - parts[everyone, pick]
                codes[:, off + 1] = di
                active = np.arange(dmax)[None, :] < depth_values[di][:, None]
                codes[:, off + 2 : off + 2 + dmax] = np.where(active, ki[:, None], -1)
                codes[:, off + 2 + dmax : off + 2 + 2 * dmax] = np.where(active, ei[:, None], -1)
            else:
                partial = stored[s]  # [w_in, w, layers done, B]
                # Input width and depth together: a stage of depth d ends in partial[w_in, w, d].
                n_in, n_d = row["n_in_widths"], len(stage.depths)
                option_in, option_d = np.divmod(np.arange(n_in * n_d), n_d)
                gathered = partial[option_in[None, :], w[:, None], depth_values[option_d][None, :], remaining[:, None]]
                pick = _categorical(gathered, rng)
                w_in, di = option_in[pick], option_d[pick]
                depth = depth_values[di]
                codes[:, off + 1] = di
                n_e = row["n_expands"]
                for j in reversed(range(dmax)):
                    idx = np.flatnonzero(j < depth)
                    if idx.size == 0:
                        continue
                    table = st.first[r][w_in[idx], w[idx]] if j == 0 else st.later[r][w[idx]]
                    parts = table.reshape(idx.size, -1)  # (n, kernel·expand options)
                    allowed = np.tile(self.allowed[s][j], row["n_kernels"])  # option = kernel·n_e + expand
                    before = np.where(allowed[None, :], remaining[idx, None] - parts, -1)
                    # partial[..., j, :] counts the paths after j layers: the state before layer j.
                    level = (w_in[idx][:, None], w[idx][:, None], j)
                    pick = _categorical(_gather(partial, level, before), rng)
                    remaining[idx] -= parts[np.arange(idx.size), pick]
                    codes[idx, off + 2 + j] = pick // n_e
                    codes[idx, off + 2 + dmax + j] = pick % n_e
            w = w_in
        codes[:, 1] = w
        if not np.array_equal(remaining, stem[r][w]):
            raise AssertionError("FLOPs-band DP walked back to an inconsistent stem")
        return codes


@dataclass(frozen=True)
class _Candidates:
    """The candidate set S for one quantum: subnets whose quantised FLOPs lie in [b_lo, b_hi]."""

    q: int
    slack: int  # m·(q − 1): how far above B·q a subnet's exact FLOPs may lie
    quantised: tuple
    nbins: int
    b_lo: int
    b_hi: int
    counts: np.ndarray  # candidates per resolution
    total: float
    rate: float  # lower bound on the acceptance rate (≥ 5%), sizes the first round
    walks: dict = field(default_factory=dict)  # resolution → stored forward pass, reused across rounds

    @classmethod
    def build(cls, sampler: FlopsBandSampler, q: int, lo: int, hi: int) -> _Candidates:
        slack = sampler.parts * (q - 1)
        nbins = hi // q + 1
        b_lo, b_hi = max(0, -((slack - lo) // q)), hi // q  # ⌈(lo − slack) / q⌉, ⌊hi / q⌋
        quantised = sampler._quantise(q)
        hists = [sampler._forward(quantised, r, nbins, store=False)[0] for r in sampler._resolutions()]
        counts = np.array([sampler._head_weights(quantised, r, h, b_lo, b_hi).sum() for r, h in enumerate(hists)])
        total = float(counts.sum())
        # Candidates whose whole slack range lies in the band are accepted for sure.
        inner_lo, inner_hi = -(-lo // q), (hi - slack) // q
        sure = sum(sampler._head_weights(quantised, r, h, inner_lo, inner_hi).sum() for r, h in enumerate(hists))
        rate = max(sure / total, 0.05) if total else 0.0
        return cls(q, slack, quantised, nbins, b_lo, b_hi, counts, total, rate)


class EmptyBandError(ValueError):
    """No subnet of the space has FLOPs in the requested band."""


def _shift_add(out: np.ndarray, source: np.ndarray, shifts: np.ndarray) -> None:
    """``out[b] += Σ_v source[b − v]`` over the (repeated) shifts ``v``."""
    values, multiplicity = np.unique(shifts, return_counts=True)
    nbins = len(out)
    for v, c in zip(values.tolist(), multiplicity.tolist()):
        if v < nbins:
            out[v:] += c * source[: nbins - v]


def _gather(hist: np.ndarray, lead: tuple | np.ndarray, index: np.ndarray) -> np.ndarray:
    """``hist[lead…, index]`` with 0 where ``index`` is negative (a part larger than what remains).

    ``lead`` indexes the leading axes of ``hist`` (broadcast against ``index``), the last axis is B.
    """
    lead = lead if isinstance(lead, tuple) else (lead,)
    return np.where(index >= 0, hist[(*lead, np.clip(index, 0, None))], 0.0)


def _categorical(weights: np.ndarray, rng: np.random.Generator, k: int | None = None) -> np.ndarray:
    """One index per row drawn with probability ∝ the row's weights (or ``k`` draws from one row)."""
    cumulative = np.cumsum(weights, axis=1)
    if k is not None:
        u = rng.random(k) * cumulative[0, -1]
        return np.searchsorted(cumulative[0], u, side="right")
    if (cumulative[:, -1] <= 0).any():
        raise AssertionError("FLOPs-band DP reached a state with no completion")
    u = rng.random(len(weights)) * cumulative[:, -1]
    return (cumulative <= u[:, None]).sum(axis=1)
