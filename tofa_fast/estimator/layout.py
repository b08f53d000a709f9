"""Lookup-table layout shared by the C++ estimator and its pure-Python reference.

An arch's FLOPs (parameters, latency) is a sum over its parts, and each part depends on a handful of
choice indices only::

    total = stem[r, stem] + Σ_stages stage_s[r, in_width, width, …] + head[r, last_width, head]

so the estimator precomputes every part once per space into one flat table and then scores an
encoded arch (``SearchSpace.encode``) with a few table lookups. The layout of that flat table is

* stem block at ``stem_offset``:      index ``r · n_stem + s``
* head block at ``head_offset``:      index ``(r · n_last + w_last) · n_head + h``
* per stage, at ``table_offset``, in a *stage-granularity* space (one kernel/expand per stage):
  the whole stage, ``((((r · n_in + w_in) · n_w + w) · n_d + d) · n_k + k) · n_e + e``;
  in a *layer-granularity* space: the first layer (it sees the previous stage's width and the
  stride), ``(((r · n_in + w_in) · n_w + w) · n_k + k) · n_e + e``, then one block for all later
  layers, which are identical (same width in and out, stride 1), at ``+ layer0_block``:
  ``((r · n_w + w) · n_k + k) · n_e + e``.

``plan`` (int64, one row per stage) and ``header`` carry these sizes and offsets to C++; the column
names are :data:`HEADER_FIELDS` and :data:`STAGE_FIELDS`. ``expand_masks`` says which expand indices
each layer allows (bit ``e`` of ``[stage, layer]``): every one, unless the stage narrows its expand
choices layer by layer (``StageSpec.layer_expands``, networks converted from torchvision).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import product

import numpy as np

from ..spaces import SearchSpace, StageSpec
from .layers import LayerConfig, head_config, mbconv_config, stage_input_sizes, stem_config

HEADER_FIELDS = (
    "code_length",
    "n_resolutions",
    "n_stem",
    "n_head",
    "n_stages",
    "stage_granularity",
    "stem_offset",
    "head_offset",
    "n_last",
    "table_size",
)
STAGE_FIELDS = (
    "code_offset",
    "max_depth",
    "n_widths",
    "n_in_widths",
    "n_depths",
    "n_kernels",
    "n_expands",
    "table_offset",
    "layer0_block",
)


def layer_expand_choices(stage: StageSpec, layer_index: int) -> tuple[float, ...]:
    """Expand ratios layer ``layer_index`` of ``stage`` allows (a subset of ``stage.expands``)."""
    narrowed = getattr(stage, "layer_expands", None)
    return stage.expands if narrowed is None else tuple(narrowed[layer_index])


def allowed_expand_indices(stage: StageSpec, layer_index: int) -> list[int]:
    allowed = layer_expand_choices(stage, layer_index)
    return [i for i, e in enumerate(stage.expands) if e in allowed]


@dataclass(frozen=True)
class TableLayout:
    """Where every part of every arch of ``space`` lives in the flat table (see module docstring).

    Attributes:
        header: int64 (len(HEADER_FIELDS),).
        plan: int64 (n_stages, len(STAGE_FIELDS)).
        depths: int64 (n_stages, max number of depth choices); depth *values*, padded with 0.
        expand_masks: int64 (n_stages, max depth over stages); bit ``e`` set when layer ``j`` of the
            stage allows expand index ``e``.
    """

    space: SearchSpace
    num_classes: int
    header: np.ndarray
    plan: np.ndarray
    depths: np.ndarray
    expand_masks: np.ndarray

    @classmethod
    def build(cls, space: SearchSpace, num_classes: int) -> TableLayout:
        n_res = len(space.resolutions)
        stage_granularity = space.granularity == "stage"
        rows, offset, code_offset = [], 0, 3  # codes: [resolution, stem, head, stages...]
        stem_offset = offset
        offset += n_res * len(space.stem.widths)
        head_offset = offset
        n_last = len(space.stages[-1].widths)
        offset += n_res * n_last * len(space.head.widths)
        for i, stage in enumerate(space.stages):
            n_in, n_w = len(space.stage_input_widths(i)), len(stage.widths)
            n_d, n_k, n_e = len(stage.depths), len(stage.kernels), len(stage.expands)
            if stage_granularity:
                layer0 = n_res * n_in * n_w * n_d * n_k * n_e
                size = layer0
            else:
                layer0 = n_res * n_in * n_w * n_k * n_e
                size = layer0 + n_res * n_w * n_k * n_e
            rows.append([code_offset, stage.max_depth, n_w, n_in, n_d, n_k, n_e, offset, layer0])
            offset += size
            code_offset += 2 + 2 * stage.max_depth
        if code_offset != space.code_length:
            raise AssertionError(f"code layout of {space.name!r} changed: {code_offset} != {space.code_length}")
        header = [
            space.code_length,
            n_res,
            len(space.stem.widths),
            len(space.head.widths),
            len(space.stages),
            int(stage_granularity),
            stem_offset,
            head_offset,
            n_last,
            offset,
        ]
        max_nd = max(len(st.depths) for st in space.stages)
        depths = np.zeros((len(space.stages), max_nd), dtype=np.int64)
        for i, stage in enumerate(space.stages):
            depths[i, : len(stage.depths)] = stage.depths
        masks = np.zeros((len(space.stages), max(st.max_depth for st in space.stages)), dtype=np.int64)
        for i, stage in enumerate(space.stages):
            if len(stage.expands) > 62:
                raise ValueError(f"stage {i} has {len(stage.expands)} expand choices; the estimator handles ≤ 62")
            for j in range(stage.max_depth):
                masks[i, j] = sum(1 << e for e in allowed_expand_indices(stage, j))
        return cls(
            space,
            num_classes,
            np.asarray(header, dtype=np.int64),
            np.asarray(rows, dtype=np.int64),
            depths,
            masks,
        )

    def field(self, name: str) -> int:
        return int(self.header[HEADER_FIELDS.index(name)])

    @property
    def size(self) -> int:
        return self.field("table_size")

    # -- enumeration ----------------------------------------------------------------------------

    def entries(self) -> list[tuple[int, list[tuple[int, LayerConfig]]]]:
        """Every table slot with the layers it sums: ``[(slot, [(multiplicity, config), …]), …]``.

        A slot of a stage-granularity stage holds the first layer plus ``depth − 1`` copies of the
        (identical) later layers; every other slot holds exactly one layer.
        """
        space, out = self.space, []
        stage_granularity = self.field("stage_granularity") == 1
        for ri, res in enumerate(space.resolutions):
            for si, width in enumerate(space.stem.widths):
                out.append(
                    (
                        self.field("stem_offset") + ri * len(space.stem.widths) + si,
                        [(1, stem_config(space, res, width))],
                    )
                )
            n_last, n_head = self.field("n_last"), len(space.head.widths)
            for wi, last in enumerate(space.stages[-1].widths):
                for hi, head in enumerate(space.head.widths):
                    slot = self.field("head_offset") + (ri * n_last + wi) * n_head + hi
                    out.append((slot, [(1, head_config(space, res, last, head, self.num_classes))]))
            sizes = stage_input_sizes(space, res)
            for s, stage in enumerate(space.stages):
                row = dict(zip(STAGE_FIELDS, self.plan[s].tolist()))
                inputs = space.stage_input_widths(s)
                n_in, n_w, n_d = row["n_in_widths"], row["n_widths"], row["n_depths"]
                n_k, n_e = row["n_kernels"], row["n_expands"]
                first_expands = set(allowed_expand_indices(stage, 0))
                later_expands = {e for j in range(1, stage.max_depth) for e in allowed_expand_indices(stage, j)}
                for (ii, win), (wi, w), (ki, k), (ei, e) in product(
                    enumerate(inputs), enumerate(stage.widths), enumerate(stage.kernels), enumerate(stage.expands)
                ):
                    if ei not in first_expands and ei not in later_expands:
                        continue
                    first = mbconv_config(space, s, 0, sizes[s], win, w, k, e)
                    later = mbconv_config(space, s, 1, sizes[s], win, w, k, e)
                    if stage_granularity:
                        for di, depth in enumerate(stage.depths):
                            slot = (
                                row["table_offset"] + ((((ri * n_in + ii) * n_w + wi) * n_d + di) * n_k + ki) * n_e + ei
                            )
                            layers = [(1, first)] + ([(depth - 1, later)] if depth > 1 else [])
                            out.append((slot, layers))
                    else:
                        slot = row["table_offset"] + (((ri * n_in + ii) * n_w + wi) * n_k + ki) * n_e + ei
                        if ei in first_expands:
                            out.append((slot, [(1, first)]))
                        if ii == 0 and ei in later_expands:
                            slot = row["table_offset"] + row["layer0_block"] + ((ri * n_w + wi) * n_k + ki) * n_e + ei
                            out.append((slot, [(1, later)]))
        return out

    def configs(self) -> dict[str, LayerConfig]:
        """The distinct layer configurations the space can produce, by key (what a latency table times)."""
        found: dict[str, LayerConfig] = {}
        for _, layers in self.entries():
            for _, config in layers:
                found.setdefault(config.key, config)
        return found

    def fill(self, value: Callable[[LayerConfig], float], dtype: np.dtype) -> np.ndarray:
        """The flat table with ``value(config)`` summed over each slot's layers (see :meth:`entries`)."""
        table = np.zeros(self.size, dtype=dtype)
        cache: dict[str, float] = {}
        for slot, layers in self.entries():
            total = 0
            for multiplicity, config in layers:
                if config.key not in cache:
                    cache[config.key] = value(config)
                total += multiplicity * cache[config.key]
            table[slot] = total
        return table

    # -- views used by the sampler --------------------------------------------------------------

    def stage_tables(self, table: np.ndarray, stage_index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Views of one stage's block. Stage granularity: ``(whole[r, w_in, w, d, k, e], None)``.
        Layer granularity: ``(first[r, w_in, w, k, e], later[r, w, k, e] or None)``."""
        row = dict(zip(STAGE_FIELDS, self.plan[stage_index].tolist()))
        n_res = self.field("n_resolutions")
        start = row["table_offset"]
        n_in, n_w, n_d, n_k, n_e = (row[f] for f in ("n_in_widths", "n_widths", "n_depths", "n_kernels", "n_expands"))
        if self.field("stage_granularity") == 1:
            return table[start : start + row["layer0_block"]].reshape(n_res, n_in, n_w, n_d, n_k, n_e), None
        first = table[start : start + row["layer0_block"]].reshape(n_res, n_in, n_w, n_k, n_e)
        if row["max_depth"] == 1:
            return first, None
        start += row["layer0_block"]
        return first, table[start : start + n_res * n_w * n_k * n_e].reshape(n_res, n_w, n_k, n_e)

    def stem_table(self, table: np.ndarray) -> np.ndarray:
        """``[r, stem]`` view."""
        n = self.field("n_resolutions") * self.field("n_stem")
        start = self.field("stem_offset")
        return table[start : start + n].reshape(self.field("n_resolutions"), self.field("n_stem"))

    def head_table(self, table: np.ndarray) -> np.ndarray:
        """``[r, last_width, head]`` view."""
        shape = (self.field("n_resolutions"), self.field("n_last"), self.field("n_head"))
        start = self.field("head_offset")
        return table[start : start + int(np.prod(shape))].reshape(shape)


# ----------------------------------------------------------------------------------------------
# Pure-Python reference of the C++ kernel (csrc/estimator/estimator.cpp): validation + table sum
# ----------------------------------------------------------------------------------------------


def validate_codes(layout: TableLayout, codes: np.ndarray) -> None:
    """Raise ``ValueError`` naming the first bad row and field of an ``(n, code_length)`` int array.

    Same rules and messages as the C++ kernel (and :meth:`SearchSpace.decode`): every index in range,
    layers beyond the active depth hold ``-1``, and in a stage-granularity space all active layers of
    a stage repeat the first layer's kernel and expand.
    """
    space = layout.space
    stage_granularity = layout.field("stage_granularity") == 1

    def outside(column: np.ndarray, n: int) -> np.ndarray:
        return (column < 0) | (column >= n)

    bad = outside(codes[:, 0], len(space.resolutions))
    bad |= outside(codes[:, 1], len(space.stem.widths)) | outside(codes[:, 2], len(space.head.widths))
    for s, stage in enumerate(space.stages):
        off, dmax = int(layout.plan[s, 0]), stage.max_depth
        bad |= outside(codes[:, off], len(stage.widths)) | outside(codes[:, off + 1], len(stage.depths))
        depth = np.asarray(stage.depths)[np.clip(codes[:, off + 1], 0, len(stage.depths) - 1)]
        for j in range(dmax):
            active = j < depth
            for col, n in ((off + 2 + j, len(stage.kernels)), (off + 2 + dmax + j, len(stage.expands))):
                values = codes[:, col]
                bad |= np.where(active, outside(values, n), values != -1)
                if stage_granularity and j > 0:
                    bad |= active & (values != codes[:, col - j])
            allowed = np.zeros(len(stage.expands) + 1, dtype=bool)
            allowed[allowed_expand_indices(stage, j)] = True
            expand = codes[:, off + 2 + dmax + j]
            bad |= active & ~allowed[np.clip(expand, 0, len(stage.expands))]
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{describe_bad_row(layout, codes[row], row)} (space {space.name!r})")


def describe_bad_row(layout: TableLayout, code: np.ndarray, row: int) -> str:
    """The first invalid field of one code row, worded as the C++ kernel words it."""
    space = layout.space
    code = [int(v) for v in code]

    def out_of_range(what: str, value: int, n: int) -> str | None:
        if 0 <= value < n:
            return None
        return f"codes[{row}] {what} index {value} is out of range 0..{n - 1}"

    for what, value, n in (
        ("resolution", code[0], len(space.resolutions)),
        ("stem", code[1], len(space.stem.widths)),
        ("head", code[2], len(space.head.widths)),
    ):
        if message := out_of_range(what, value, n):
            return message
    for s, stage in enumerate(space.stages):
        off, dmax = int(layout.plan[s, 0]), stage.max_depth
        for what, value, n in (("width", code[off], len(stage.widths)), ("depth", code[off + 1], len(stage.depths))):
            if message := out_of_range(f"stages[{s}].{what}", value, n):
                return message
        depth = stage.depths[code[off + 1]]
        for part, (name, n) in enumerate((("kernel", len(stage.kernels)), ("expand", len(stage.expands)))):
            values = code[off + 2 + part * dmax : off + 2 + (part + 1) * dmax]
            for j, value in enumerate(values):
                field = f"stages[{s}].{name}[{j}]"
                if j < depth and (message := out_of_range(field, value, n)):
                    return message
                if j >= depth and value != -1:
                    return f"codes[{row}] {field} is {value} but layers beyond the active depth {depth} must hold -1"
                if space.granularity == "stage" and 0 < j < depth and value != values[0]:
                    return (
                        f"codes[{row}] {field} index {value} differs from layer 0's {values[0]}; "
                        f"the space has stage granularity (one {name} per stage)"
                    )
                if name == "expand" and j < depth and value not in allowed_expand_indices(stage, j):
                    return (
                        f"codes[{row}] {field} index {value} is not allowed at layer {j} "
                        f"(allowed indices: {allowed_expand_indices(stage, j)})"
                    )
    return f"codes[{row}] is invalid"


def table_sum_reference(layout: TableLayout, codes: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Sum each row's table entries (NumPy; the reference of the C++ ``estimator_sum``).

    Args:
        codes: int (n, code_length), already validated (:func:`validate_codes`).
        table: (layout.size,) of any numeric dtype.
    Returns: (n,) of ``table.dtype``.
    """
    codes = codes.astype(np.int64, copy=False)
    f = layout.field
    r = codes[:, 0]
    stem = codes[:, 1]
    total = table[f("stem_offset") + r * f("n_stem") + stem].copy()
    prev = stem
    stage_granularity = f("stage_granularity") == 1
    for s in range(f("n_stages")):
        off, dmax, n_w, n_in, _, n_k, n_e, t_off, layer0 = (int(v) for v in layout.plan[s])
        w, di = codes[:, off], codes[:, off + 1]
        k0, e0 = codes[:, off + 2], codes[:, off + 2 + dmax]
        if stage_granularity:
            n_d = int(layout.plan[s, 4])
            total += table[t_off + ((((r * n_in + prev) * n_w + w) * n_d + di) * n_k + k0) * n_e + e0]
        else:
            total += table[t_off + (((r * n_in + prev) * n_w + w) * n_k + k0) * n_e + e0]
            depth = layout.depths[s][di]
            for j in range(1, dmax):
                active = j < depth
                k = np.where(active, codes[:, off + 2 + j], 0)
                e = np.where(active, codes[:, off + 2 + dmax + j], 0)
                value = table[t_off + layer0 + ((r * n_w + w) * n_k + k) * n_e + e]
                total += np.where(active, value, 0).astype(table.dtype, copy=False)
        prev = w
    total += table[f("head_offset") + (r * f("n_last") + prev) * f("n_head") + codes[:, 2]]
    return total
