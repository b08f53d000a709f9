"""Search spaces and architectures as typed, JSON-round-tripping data.

A :class:`SearchSpace` describes an MBConv (inverted residual) supernet: a stem convolution, a list of
stages, and a head. An :class:`Arch` is one subnet of that space. Both are frozen dataclasses, so an
``Arch`` is hashable and can key dictionaries (the zero-cost selection index does exactly that).

Canonical string form of an arch (``str(arch)``, parsed back by :meth:`SearchSpace.arch_from_string`)::

    r<resolution>-s<stem width>-<stage>-<stage>-...-h<head width>
    stage := w<width>d<depth>k<k_1>,<k_2>,...e<e_1>,<e_2>,...

for example ``r224-s24-w24d2k3,3e1,1-...-h1984``. Numbers are printed in their shortest exact form
(``4`` not ``4.0``), so two equal archs always print the same string.

Integer encoding (:meth:`SearchSpace.encode`): one ``int32`` row per arch holding *choice indices*
into the space's choice lists (indices, not values, so that estimator tables can be indexed
directly and float expand ratios need no special casing)::

    [resolution_idx, stem_idx, head_idx,
     for each stage s:  width_idx, depth_idx,
                        kernel_idx[0 .. D_s - 1], expand_idx[0 .. D_s - 1]]

where ``D_s = max(stage.depths)``; layers beyond the active depth hold ``-1``. The row length is
``SearchSpace.code_length``. The layout is part of the public contract (the C++ estimator reads it).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

GRANULARITIES = ("stage", "layer")
ACTIVATIONS = ("relu", "relu6", "hswish", "swish", "none")
#: How strided convolutions pad: ``"symmetric"`` (PyTorch, ``k // 2`` on every side) or ``"tf_same"``
#: (TensorFlow's ``SAME``: the total padding ``max((⌈n/s⌉ − 1)·s + k − n, 0)`` split with the extra
#: pixel at the end, as networks trained in TensorFlow — EfficientNet-Lite — expect).
PADDINGS = ("symmetric", "tf_same")
#: The per-channel input normalisation of ImageNet-pretrained torchvision networks (RGB in [0, 1]).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to a multiple of ``divisor`` without dropping more than 10% (OFA/MobileNet rule).

    Every channel count in the supernet goes through this function, exactly as the ``ofa`` package
    does, which is what makes the ``ofa_mbv3`` preset weight-compatible with OFA checkpoints.
    """
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def _number_str(value: float) -> str:
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _plain_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _choices(values: Iterable[Any], name: str) -> tuple:
    try:
        out = tuple(values)
        distinct, ordered = len(set(out)), tuple(sorted(out))
    except TypeError:  # not iterable, unhashable or unorderable choices
        raise TypeError(f"{name} must be a sequence of numbers, got {values!r:.80}") from None
    if not out:
        raise ValueError(f"{name} must list at least one choice")
    if distinct != len(out):
        raise ValueError(f"{name} lists a choice twice: {list(out)}")
    return ordered


# ----------------------------------------------------------------------------------------------
# Space description
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StemSpec:
    """First convolution: ``kernel``×``kernel``, ``stride``, one of ``widths`` output channels."""

    widths: tuple[int, ...]
    stride: int = 2
    kernel: int = 3
    act: str = "hswish"

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", _choices(self.widths, "stem.widths"))
        _check_act(self.act, "stem.act")


@dataclass(frozen=True)
class StageSpec:
    """One MBConv stage: ``depth`` inverted-residual layers, the first with ``stride``.

    ``expands`` equal to ``(1,)`` means the layer has no 1×1 expansion convolution (the depthwise
    convolution runs on the input channels directly), as in MobileNetV3's first block.

    ``layer_expands`` (optional, layer-granularity spaces only) narrows the expand choices layer by
    layer: entry ``j`` lists the ratios layer ``j`` allows, a subset of ``expands``. Networks
    converted from torchvision need it, because their layers within one stage have different
    largest expand ratios (MobileNetV3-Large: 6, 2.5, 2.3, 2.3). ``None`` (the default) lets every
    layer use every ratio of ``expands``.
    """

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    kernels: tuple[int, ...]
    expands: tuple[float, ...]
    stride: int = 1
    se: bool = False
    act: str = "relu"
    layer_expands: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", _choices(self.widths, "stage.widths"))
        object.__setattr__(self, "depths", _choices(self.depths, "stage.depths"))
        object.__setattr__(self, "kernels", _choices(self.kernels, "stage.kernels"))
        object.__setattr__(self, "expands", tuple(_plain_number(e) for e in _choices(self.expands, "stage.expands")))
        if any(k % 2 == 0 or k < 1 for k in self.kernels):
            raise ValueError(f"stage.kernels must be odd positive sizes, got {list(self.kernels)}")
        if min(self.depths) < 1:
            raise ValueError(f"stage.depths must be ≥ 1, got {list(self.depths)}")
        if min(self.expands) < 1:
            raise ValueError(f"stage.expands must be ≥ 1, got {list(self.expands)}")
        if self.stride not in (1, 2):
            raise ValueError(f"stage.stride must be 1 or 2, got {self.stride}")
        _check_act(self.act, "stage.act")
        if self.layer_expands is not None:
            per_layer = tuple(
                tuple(_plain_number(e) for e in _choices(choices, f"stage.layer_expands[{j}]"))
                for j, choices in enumerate(self.layer_expands)
            )
            if len(per_layer) != self.max_depth:
                raise ValueError(
                    f"stage.layer_expands must have one entry per layer (max depth {self.max_depth}), "
                    f"got {len(per_layer)}"
                )
            for j, choices in enumerate(per_layer):
                stray = [e for e in choices if e not in self.expands]
                if stray:
                    raise ValueError(
                        f"stage.layer_expands[{j}] lists {stray}, which stage.expands {list(self.expands)} lacks"
                    )
            object.__setattr__(self, "layer_expands", per_layer)

    def expand_choices(self, layer_index: int) -> tuple[float, ...]:
        """Expand ratios layer ``layer_index`` of this stage allows (see ``layer_expands``)."""
        return self.expands if self.layer_expands is None else self.layer_expands[layer_index]

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    @property
    def has_expansion(self) -> bool:
        """Whether layers carry a 1×1 expansion conv (OFA: only when some expand ratio exceeds 1)."""
        return max(self.expands) > 1


@dataclass(frozen=True)
class HeadSpec:
    """Head: 1×1 conv to ``expand``× the last stage width (BN + act), global pool, 1×1 feature-mix
    conv to one of ``widths`` (no BN, act), dropout, linear classifier.

    ``feature_mix_bias`` gives the feature-mix conv a bias: OFA's has none, torchvision's MobileNetV3
    (a ``Linear`` on the pooled features, which is the same map) has one.

    ``feature_mix=False`` drops the feature-mix conv (MobileNetV2, EfficientNet): the head is the 1×1
    conv + BN + act, global pool, dropout, classifier, and ``widths`` are the choices of that conv's
    width (``expand`` is then unused).
    """

    widths: tuple[int, ...]
    expand: float = 6
    act: str = "hswish"
    dropout: float = 0.1
    feature_mix_bias: bool = False
    feature_mix: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", _choices(self.widths, "head.widths"))
        object.__setattr__(self, "expand", _plain_number(self.expand))
        _check_act(self.act, "head.act")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"head.dropout must be in [0, 1), got {self.dropout}")
        if self.feature_mix_bias and not self.feature_mix:
            raise ValueError("head.feature_mix_bias needs head.feature_mix (there is no feature-mix conv)")


def _check_act(act: str, name: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"{name} must be one of {list(ACTIVATIONS)}, got {act!r}")


# ----------------------------------------------------------------------------------------------
# Architectures
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageArch:
    """Active choices of one stage: ``kernel`` and ``expand`` have exactly ``depth`` entries."""

    width: int
    depth: int
    kernel: tuple[int, ...]
    expand: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "depth": self.depth,
            "kernel": list(self.kernel),
            "expand": [_plain_number(e) for e in self.expand],
        }

    def __str__(self) -> str:
        kernels = ",".join(str(k) for k in self.kernel)
        expands = ",".join(_number_str(e) for e in self.expand)
        return f"w{self.width}d{self.depth}k{kernels}e{expands}"


@dataclass(frozen=True)
class Arch:
    """One subnet. Build it through a :class:`SearchSpace` (which validates), not directly."""

    resolution: int
    stem: int
    stages: tuple[StageArch, ...]
    head: int

    def to_dict(self) -> dict[str, Any]:
        """The dict contract of SPEC §2: ``resolution``, ``stem``, ``stages`` (list), ``head``."""
        return {
            "resolution": self.resolution,
            "stem": self.stem,
            "stages": [s.to_dict() for s in self.stages],
            "head": self.head,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    def __str__(self) -> str:
        body = "-".join(str(s) for s in self.stages)
        return f"r{self.resolution}-s{self.stem}-{body}-h{self.head}"

    @property
    def key(self) -> str:
        """Canonical string key (same as ``str(arch)``)."""
        return str(self)


# ----------------------------------------------------------------------------------------------
# The space
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSpace:
    """An elastic MBConv search space (SPEC §2).

    Args:
        name: preset name or a user label.
        resolutions: input resolution choices (square images).
        stem, stages, head: the three parts of the network.
        granularity: ``"stage"`` — one kernel and one expand ratio per stage (TOFA);
            ``"layer"`` — per-layer kernel and expand (OFA, RSS).
        kernel_transform: whether depthwise kernels smaller than the largest pass through OFA's
            learned kernel-transformation matrices (SPEC §3).
        in_channels: image channels.
        bn_momentum, bn_eps: batch-norm settings of every BN in the supernet.
        se_reduction: squeeze-excite bottleneck is ``make_divisible(C // se_reduction, divisor)``.
        channel_divisor: every derived channel count is a multiple of this.
        padding: how strided convolutions (stem, depthwise) pad, one of :data:`PADDINGS`.
        input_mean, input_std: the per-channel normalisation ``(x − mean) / std`` the network expects
            of images with values in [0, 1] (one entry per input channel). ImageNet's by default;
            a space derived from a pretrained network records that network's (EfficientNet-Lite:
            ``(x − 127) / 128`` on 0–255 values). Trainers and exporters read it from here.
    """

    name: str
    resolutions: tuple[int, ...]
    stem: StemSpec
    stages: tuple[StageSpec, ...]
    head: HeadSpec
    granularity: str = "layer"
    kernel_transform: bool = False
    in_channels: int = 3
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    se_reduction: int = 4
    channel_divisor: int = 8
    padding: str = "symmetric"
    input_mean: tuple[float, ...] = IMAGENET_MEAN
    input_std: tuple[float, ...] = IMAGENET_STD
    _code_offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "resolutions", _choices(self.resolutions, "resolutions"))
        if any(isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1 for r in self.resolutions):
            raise ValueError(f"resolutions must be positive integers (pixels), got {list(self.resolutions)}")
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise ValueError("a search space needs at least one stage")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {list(GRANULARITIES)}, got {self.granularity!r}")
        if self.granularity == "stage" and any(st.layer_expands is not None for st in self.stages):
            raise ValueError("stage.layer_expands (per-layer expand choices) needs granularity 'layer'")
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {list(PADDINGS)}, got {self.padding!r}")
        # Tuples, also when read back from JSON lists, so that spaces stay hashable and comparable.
        for name in ("input_mean", "input_std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != self.in_channels:
                raise ValueError(
                    f"{name} must have one entry per input channel ({self.in_channels}), got {len(values)}"
                )
            object.__setattr__(self, name, values)
        if min(self.input_std) <= 0:
            raise ValueError(f"input_std must be positive, got {list(self.input_std)}")
        offsets, pos = [], 3
        for stage in self.stages:
            offsets.append(pos)
            pos += 2 + 2 * stage.max_depth
        object.__setattr__(self, "_code_offsets", tuple(offsets) + (pos,))

    # -- derived channel counts ---------------------------------------------------------------

    def middle_channels(self, stage_index: int, in_channels: int, expand: float) -> int:
        """Channels of the depthwise conv of a layer with ``in_channels`` inputs (OFA rule)."""
        if not self.stages[stage_index].has_expansion:
            return in_channels
        return make_divisible(round(in_channels * expand), self.channel_divisor)

    def se_channels(self, channels: int) -> int:
        return make_divisible(channels // self.se_reduction, self.channel_divisor)

    def final_expand_channels(self, last_width: int) -> int:
        return make_divisible(last_width * self.head.expand, self.channel_divisor)

    def final_channels(self, last_width: int, head_width: int) -> int:
        """Width of the head's first 1×1 conv for a subnet whose last stage is ``last_width`` wide and
        whose head choice is ``head_width``: ``expand`` × the last width when the head has a
        feature-mix conv (whose width ``head_width`` is), else ``head_width`` itself."""
        if self.head.feature_mix:
            return self.final_expand_channels(last_width)
        return head_width

    def stage_input_widths(self, stage_index: int) -> tuple[int, ...]:
        """Width choices of the tensor entering ``stages[stage_index]``."""
        return self.stem.widths if stage_index == 0 else self.stages[stage_index - 1].widths

    def has_residual(self, stage_index: int, layer_index: int) -> bool:
        """Whether a layer adds its input to its output.

        Layers after the first of a stage always do (same width, stride 1). The first layer of a
        stage does only if its stride is 1 and its input and output widths are the *same single
        fixed* value — then every subnet has the same topology there (MobileNetV3's first block).
        Where widths are elastic, the first layer never has a shortcut, so extracted subnets have
        a topology that does not depend on which width prefix is active.
        """
        if layer_index > 0:
            return True
        stage = self.stages[stage_index]
        inputs = self.stage_input_widths(stage_index)
        return stage.stride == 1 and len(inputs) == 1 and inputs == stage.widths

    # -- construction and validation ----------------------------------------------------------

    def max_arch(self) -> Arch:
        return self._uniform_arch(max)

    def min_arch(self) -> Arch:
        return self._uniform_arch(min)

    def _uniform_arch(self, pick) -> Arch:
        stages = []
        for st in self.stages:
            depth = pick(st.depths)
            if self.granularity == "stage":
                expand = (pick(st.expands),) * depth
            else:
                expand = tuple(pick(st.expand_choices(j)) for j in range(depth))
            stages.append(StageArch(pick(st.widths), depth, (pick(st.kernels),) * depth, expand))
        return Arch(pick(self.resolutions), pick(self.stem.widths), tuple(stages), pick(self.head.widths))

    def sample(self, rng: int | random.Random | None = None) -> Arch:
        """A uniformly random arch: every choice drawn independently and uniformly.

        ``rng`` is an int seed, a ``random.Random`` (advanced in place, so successive calls differ)
        or ``None`` for the module-level generator.
        """
        if rng is None:
            rng = random.Random()
        elif isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
            rng = random.Random(int(rng))
        elif not isinstance(rng, random.Random):
            raise TypeError(f"rng must be an int seed or random.Random, got {type(rng).__name__}")
        resolution = rng.choice(self.resolutions)
        stem = rng.choice(self.stem.widths)
        stages = []
        for st in self.stages:
            width = rng.choice(st.widths)
            depth = rng.choice(st.depths)
            if self.granularity == "stage":
                kernel = (rng.choice(st.kernels),) * depth
                expand = (rng.choice(st.expands),) * depth
            else:
                kernel = tuple(rng.choice(st.kernels) for _ in range(depth))
                expand = tuple(rng.choice(st.expand_choices(j)) for j in range(depth))
            stages.append(StageArch(width, depth, kernel, expand))
        head = rng.choice(self.head.widths)
        return Arch(resolution, stem, tuple(stages), head)

    def arch_from_dict(self, d: Mapping[str, Any]) -> Arch:
        """Validate a dict of the SPEC §2 form and build the :class:`Arch`.

        Raises ``ValueError`` naming the offending field and the allowed values.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"arch must be a dict, got {type(d).__name__}")
        _check_keys(d, ("resolution", "stem", "stages", "head"), "arch")
        resolution = _check_choice(d["resolution"], self.resolutions, "resolution")
        stem = _check_choice(d["stem"], self.stem.widths, "stem")
        head = _check_choice(d["head"], self.head.widths, "head")
        raw_stages = d["stages"]
        if not isinstance(raw_stages, Sequence) or isinstance(raw_stages, (str, bytes)):
            raise ValueError(f"stages must be a list of {len(self.stages)} dicts")
        if len(raw_stages) != len(self.stages):
            raise ValueError(
                f"stages must have exactly {len(self.stages)} entries (one per stage of space "
                f"{self.name!r}, fixed stages included), got {len(raw_stages)}"
            )
        stages = []
        for i, (raw, st) in enumerate(zip(raw_stages, self.stages)):
            where = f"stages[{i}]"
            if not isinstance(raw, Mapping):
                raise ValueError(f"{where} must be a dict, got {type(raw).__name__}")
            _check_keys(raw, ("width", "depth", "kernel", "expand"), where)
            width = _check_choice(raw["width"], st.widths, f"{where}.width")
            depth = _check_choice(raw["depth"], st.depths, f"{where}.depth")
            per_layer = {}
            per_layer_allowed = (
                ("kernel", [st.kernels] * depth),
                ("expand", [st.expand_choices(j) for j in range(depth)]),
            )
            for key, allowed in per_layer_allowed:
                values = raw[key]
                if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
                    raise ValueError(f"{where}.{key} must be a list of {depth} values (one per layer)")
                if len(values) != depth:
                    raise ValueError(f"{where}.{key} must have exactly depth={depth} entries, got {len(values)}")
                checked = tuple(_check_choice(v, allowed[j], f"{where}.{key}[{j}]") for j, v in enumerate(values))
                if self.granularity == "stage" and len(set(checked)) > 1:
                    raise ValueError(
                        f"{where}.{key} must repeat one value in a stage-granularity space "
                        f"({self.name!r}), got {list(checked)}"
                    )
                per_layer[key] = checked
            stages.append(
                StageArch(width, depth, per_layer["kernel"], tuple(_plain_number(e) for e in per_layer["expand"]))
            )
        return Arch(resolution, stem, tuple(stages), head)

    def arch_from_json(self, text: str | bytes) -> Arch:
        if not isinstance(text, (str, bytes, bytearray)):
            raise TypeError(f"arch JSON must be a str, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"arch JSON does not parse: {exc}") from exc
        except RecursionError:  # nesting deeper than the interpreter's stack: not an arch either
            raise ValueError("arch JSON does not parse: nested too deeply") from None
        return self.arch_from_dict(data)

    def arch_from_string(self, text: str) -> Arch:
        """Parse the canonical string form (see module docstring)."""
        if not isinstance(text, str):
            raise TypeError(f"arch string must be a str, got {type(text).__name__}")
        # int() and float() also read spaces, "_", non-ASCII digits, "inf" and "nan": not the grammar.
        if not _ARCH_STRING_CHARACTERS.fullmatch(text.strip()):
            raise ValueError(
                f"arch string {text!r} does not parse: it has characters outside the grammar "
                "(ASCII digits and r s w d k e h , . -)"
            )
        parts = text.strip().split("-")
        if (
            len(parts) != len(self.stages) + 3
            or not parts[0].startswith("r")
            or not parts[1].startswith("s")
            or not parts[-1].startswith("h")
        ):
            raise ValueError(
                f"arch string {text!r} is not of the form r<res>-s<stem>-<stage>x{len(self.stages)}-h<head>"
            )
        try:
            stages = []
            for part in parts[2:-1]:
                width, rest = part[1:].split("d", 1)
                depth, rest = rest.split("k", 1)
                kernels, expands = rest.split("e", 1)
                stages.append(
                    {
                        "width": int(width),
                        "depth": int(depth),
                        "kernel": [int(k) for k in kernels.split(",")],
                        "expand": [float(e) for e in expands.split(",")],
                    }
                )
            d = {
                "resolution": int(parts[0][1:]),
                "stem": int(parts[1][1:]),
                "stages": stages,
                "head": int(parts[-1][1:]),
            }
        except ValueError as exc:
            raise ValueError(f"arch string {text!r} does not parse: {exc}") from exc
        return self.arch_from_dict(d)

    def check(self, arch: Arch | Mapping[str, Any]) -> Arch:
        """Return ``arch`` as a validated :class:`Arch` of this space (accepts the dict form)."""
        if isinstance(arch, Arch):
            return self.arch_from_dict(arch.to_dict())
        return self.arch_from_dict(arch)

    # -- integer encoding ---------------------------------------------------------------------

    @property
    def code_length(self) -> int:
        """Length of one encoded arch row (see module docstring for the layout)."""
        return self._code_offsets[-1]

    def encode(self, archs: Arch | Iterable[Arch]) -> np.ndarray:
        """Encode archs as an ``int32`` array of shape ``(n, code_length)`` (one row for one arch)."""
        if isinstance(archs, Arch):
            archs = [archs]
        archs = list(archs)
        codes = np.full((len(archs), self.code_length), -1, dtype=np.int32)
        for row, arch in enumerate(archs):
            if not isinstance(arch, Arch):
                raise TypeError(f"encode takes Arch objects, got {type(arch).__name__} at position {row}")
            arch = self.check(arch)
            codes[row, 0] = self.resolutions.index(arch.resolution)
            codes[row, 1] = self.stem.widths.index(arch.stem)
            codes[row, 2] = self.head.widths.index(arch.head)
            for st, sa, off in zip(self.stages, arch.stages, self._code_offsets):
                codes[row, off] = st.widths.index(sa.width)
                codes[row, off + 1] = st.depths.index(sa.depth)
                dmax = st.max_depth
                for j in range(sa.depth):
                    codes[row, off + 2 + j] = st.kernels.index(sa.kernel[j])
                    codes[row, off + 2 + dmax + j] = st.expands.index(sa.expand[j])
        return codes

    def decode(self, codes: np.ndarray | Sequence[Sequence[int]]) -> list[Arch]:
        """Inverse of :meth:`encode`. Rejects rows of another space or out-of-range indices."""
        try:
            arr = np.asarray(codes)
        except ValueError:  # ragged rows
            raise ValueError(f"codes must be a rectangular integer array (n, {self.code_length})") from None
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != self.code_length:
            raise ValueError(
                f"codes must have shape (n, {self.code_length}) for space {self.name!r}, got {tuple(np.shape(codes))}"
            )
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"codes must be integers, got dtype {arr.dtype}")
        out = []
        for row_index, row in enumerate(arr.tolist()):
            stages = []
            for i, (st, off) in enumerate(zip(self.stages, self._code_offsets)):
                width = _pick(row_index, row[off], st.widths, f"stages[{i}].width")
                depth = _pick(row_index, row[off + 1], st.depths, f"stages[{i}].depth")
                dmax = st.max_depth
                kernel = tuple(
                    _pick(row_index, row[off + 2 + j], st.kernels, f"stages[{i}].kernel[{j}]") for j in range(depth)
                )
                expand = tuple(
                    _pick(row_index, row[off + 2 + dmax + j], st.expands, f"stages[{i}].expand[{j}]")
                    for j in range(depth)
                )
                unused = row[off + 2 + depth : off + 2 + dmax] + row[off + 2 + dmax + depth : off + 2 + 2 * dmax]
                if any(v != -1 for v in unused):
                    raise ValueError(f"codes[{row_index}] stages[{i}]: layers beyond depth {depth} must be -1")
                stages.append(StageArch(width, depth, kernel, expand))
            arch = Arch(
                _pick(row_index, row[0], self.resolutions, "resolution"),
                _pick(row_index, row[1], self.stem.widths, "stem"),
                tuple(stages),
                _pick(row_index, row[2], self.head.widths, "head"),
            )
            try:
                out.append(self.check(arch))
            except ValueError as exc:  # e.g. two kernels in one stage of a stage-granularity space
                raise ValueError(f"codes[{row_index}]: {exc}") from None
        return out

    # -- counting and serialisation -----------------------------------------------------------

    def num_archs(self) -> int:
        """Number of distinct archs in the space."""
        total = len(self.resolutions) * len(self.stem.widths) * len(self.head.widths)
        for st in self.stages:
            if self.granularity == "stage":
                total *= len(st.widths) * len(st.depths) * len(st.kernels) * len(st.expands)
            else:
                per_layer = [len(st.kernels) * len(st.expand_choices(j)) for j in range(st.max_depth)]
                total *= len(st.widths) * sum(math.prod(per_layer[:d]) for d in st.depths)
        return total

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_code_offsets")
        # Fields added for transferred networks are written only when set, so every space that does
        # not use them keeps its JSON — and the fingerprint its latency tables are keyed by.
        for name, default in _OPTIONAL_FIELDS.items():
            if d[name] == default:
                del d[name]
        if d["head"]["feature_mix"]:
            del d["head"]["feature_mix"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchSpace:
        d = dict(d)
        try:
            stem = StemSpec(**d.pop("stem"))
            stages = tuple(StageSpec(**s) for s in d.pop("stages"))
            head = HeadSpec(**d.pop("head"))
            return cls(stem=stem, stages=stages, head=head, **d)
        except (TypeError, KeyError) as exc:
            raise ValueError(f"not a search-space dict: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> SearchSpace:
        return cls.from_dict(json.loads(text))


_OPTIONAL_FIELDS: dict[str, Any] = {"padding": "symmetric", "input_mean": IMAGENET_MEAN, "input_std": IMAGENET_STD}


def _check_keys(d: Mapping[str, Any], required: tuple[str, ...], where: str) -> None:
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{where} is missing key(s) {missing}; required keys: {list(required)}")
    unknown = [k for k in d if k not in required]
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; allowed keys: {list(required)}")


# The canonical arch string's alphabet (see the module docstring).
_ARCH_STRING_CHARACTERS = re.compile(r"[0-9rswdkeh,.\-]+")


def _check_choice(value: Any, allowed: tuple, name: str):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, one of {list(allowed)}; got {value!r}")
    for choice in allowed:
        if value == choice:
            return choice
    raise ValueError(f"{name}={value!r} is not allowed; allowed values: {list(allowed)}")


def _pick(row_index: int, idx: int, allowed: tuple, name: str):
    if not 0 <= idx < len(allowed):
        raise ValueError(f"codes[{row_index}] {name} index {idx} is out of range 0..{len(allowed) - 1}")
    return allowed[idx]
