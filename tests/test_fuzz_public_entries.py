"""Seeded-random fuzzing of every public entry (SPEC §11, §12; issue 16 item 6).

Each entry gets malformed inputs — arch dicts, arch strings and JSON, encoded arrays, tensors of bad
shapes / dtypes / layouts / devices, bad constructor arguments, command lines — and must either
raise ``ValueError`` / ``TypeError`` naming the argument (argparse: exit 2 naming the flag), or, where
a mutated input is still valid, give the right answer (checked against an oracle: ``encode`` after
``decode``, the arch-list path of the estimator, the contiguous tensor). Never a crash deep in
PyTorch or NumPy, never a silent wrong answer.

The cases are drawn once, at import, from a fixed seed; :data:`FUZZ_COUNTS` holds how many inputs
each entry is given, and ``test_fuzz_counts`` prints that table (``pytest -s -k fuzz_counts``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import random
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
import torch

from tofa_fast import Estimator, Supernet, recalibrate_bn, spaces
from tofa_fast.ops import elastic_dwconv2d, elastic_dwconv2d_reference

SEED = 16
SPACES = ("digits", "rss", "tofa", "ofa_mbv3")
CLEAR = (ValueError, TypeError)
#: Words an arch error names: the whole arch, or one of its fields (``stages`` covers ``stages[2].kernel``).
ARCH_FIELDS = ("arch", "resolution", "stem", "head", "stages")
#: entry -> number of inputs its test feeds it (filled as the cases are drawn, below).
FUZZ_COUNTS: dict[str, int] = {}


def _count(entry: str, cases: list) -> list:
    FUZZ_COUNTS[entry] = FUZZ_COUNTS.get(entry, 0) + len(cases)
    return cases


def _outcome(label: str, call: Callable[[], Any], names: tuple[str, ...]) -> tuple[bool, Any]:
    """(accepted, result or message). A refusal must be ValueError/TypeError naming one of ``names``;
    anything else fails the test with the case's label."""
    try:
        return True, call()
    except CLEAR as exc:
        message = str(exc)
        assert any(_names(message, n) for n in names), f"{label}: the message names none of {names}: {message}"
        return False, message
    except Exception as exc:
        raise AssertionError(f"{label}: {type(exc).__name__} instead of a clear error: {exc}") from exc


def _names(message: str, name: str) -> bool:
    """Whether ``message`` has ``name`` as a word of its own (``x`` is not the x of "exactly")."""
    return re.search(rf"(?<![\w-]){re.escape(name)}(?!\w)", message) is not None


def _refused(label: str, call: Callable[[], Any], names: tuple[str, ...]) -> str:
    accepted, result = _outcome(label, call, names)
    assert not accepted, f"{label}: accepted, returned {result!r:.200}"
    return result


def _canonical(value: Any) -> Any:
    """The plain-Python form ``Arch.to_dict`` gives a value equal to ``value``."""
    if isinstance(value, Mapping):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# -- arch dicts ----------------------------------------------------------------------------------

# Invalid for every field of every preset: no choice is 0, negative, fractional below 1 or huge.
JUNK_SCALARS = [
    None,
    "4",
    "",
    -1,
    0,
    0.5,
    1e9,
    math.nan,
    math.inf,
    -math.inf,
    True,
    False,
    [],
    {},
    b"4",
    10**30,
    3 + 0j,
]
JUNK_LISTS = [None, 4, "55", b"55", {}, {"a": 1}, [[3]], [None], ["3"], [math.nan], [True]]


def _mutate_arch_dict(rng: random.Random, space, d: dict) -> tuple[Any, set[str]]:
    """One random mutation of ``d``; returns the new dict and words its error must contain."""
    d = copy.deepcopy(d)
    i = rng.randrange(len(d["stages"]))
    stage = d["stages"][i]
    kind = rng.randrange(16)
    if kind == 0:
        key = rng.choice(["resolution", "stem", "head", "stages"])
        del d[key]
        return d, {key}
    if kind == 1:
        d[rng.choice(["bogus", "Resolution", "width"])] = 1
        return d, {"bogus", "Resolution", "width"}
    if kind == 2:
        key = rng.choice(["resolution", "stem", "head"])
        d[key] = rng.choice(JUNK_SCALARS)
        return d, {key}
    if kind == 3:
        d["stages"] = rng.choice([None, "stages", 3, {}, d["stages"][:-1], d["stages"] + [stage], []])
        return d, {"stages"}
    if kind == 4:
        return rng.choice([None, [d], "arch", 7, d["stages"]]), {"arch"}
    if kind == 5:
        del stage[rng.choice(["width", "depth", "kernel", "expand"])]
        return d, {f"stages[{i}]"}
    if kind == 6:
        stage["bogus"] = 1
        return d, {f"stages[{i}]"}
    if kind == 7:
        stage[rng.choice(["width", "depth"])] = rng.choice(JUNK_SCALARS)
        return d, {f"stages[{i}]"}
    if kind == 8:
        stage[rng.choice(["kernel", "expand"])] = rng.choice(JUNK_LISTS)
        return d, {f"stages[{i}]"}
    if kind == 9:
        key = rng.choice(["kernel", "expand"])
        stage[key] = stage[key] + [stage[key][0]] if rng.random() < 0.5 else stage[key][:-1]
        return d, {f"stages[{i}]"}
    if kind == 10:
        key = rng.choice(["kernel", "expand"])
        stage[key][rng.randrange(len(stage[key]))] = rng.choice(JUNK_SCALARS)
        return d, {f"stages[{i}]"}
    if kind == 11:  # another allowed value for one layer: valid in layer-granularity spaces
        key, choices = rng.choice([("kernel", space.stages[i].kernels), ("expand", space.stages[i].expands)])
        stage[key][rng.randrange(len(stage[key]))] = rng.choice(choices)
        return d, {f"stages[{i}]"}
    if kind == 12:  # another depth, lists unchanged (valid only if it equals the old one)
        stage["depth"] = rng.choice(space.stages[i].depths)
        return d, {f"stages[{i}]"}
    if kind == 13:
        d["stages"][i] = rng.choice([None, 3, "stage", [stage]])
        return d, {f"stages[{i}]"}
    if kind == 14:  # equal values in other number types: valid
        key = rng.choice(["resolution", "stem", "head"])
        if isinstance(d.get(key), int) and not isinstance(d[key], bool):
            d[key] = rng.choice([float, np.int64, np.float32])(d[key])
        return d, {key}
    stage["kernel"] = tuple(stage["kernel"])  # a tuple is a sequence too: valid
    return d, {f"stages[{i}]"}


def _well_formed(space, d: Any) -> bool:
    """Whether ``d`` still has the structure the next mutation edits (its values may be junk)."""
    if not isinstance(d, dict) or not isinstance(d.get("stages"), list) or len(d["stages"]) != len(space.stages):
        return False
    fields = ("kernel", "expand")
    return all(
        isinstance(st, dict) and all(isinstance(st.get(f), list) and st[f] for f in fields) for st in d["stages"]
    )


def _arch_dict_cases(n: int, seed: int, names_of_spaces=SPACES) -> list[tuple[str, str, Any, tuple[str, ...]]]:
    rng = random.Random(seed)
    cases = []
    for k in range(n):
        name = rng.choice(names_of_spaces)
        space = spaces.get(name)
        d, names = space.sample(rng).to_dict(), set()
        for _ in range(rng.choice([1, 1, 2, 3])):
            if not _well_formed(space, d):
                break
            d, new = _mutate_arch_dict(rng, space, d)
            names |= new
        cases.append((f"case {k} ({name})", name, d, tuple(sorted(names))))
    return cases


ARCH_DICT_CASES = _count("SearchSpace.arch_from_dict", _arch_dict_cases(400, SEED))
SET_ACTIVE_CASES = _count("Supernet.set_active", _arch_dict_cases(40, SEED + 1, ("digits",)))


def test_fuzz_arch_from_dict():
    for label, name, d, names in ARCH_DICT_CASES:
        accepted, result = _outcome(label, lambda d=d, n=name: spaces.get(n).arch_from_dict(d), names)
        if accepted:  # only a dict equal to a valid arch may pass, and it must mean that arch
            assert result.to_dict() == _canonical(d), f"{label}: accepted {d!r:.300} as {result}"


def test_fuzz_supernet_set_active_keeps_the_active_arch_on_refusal():
    net = Supernet("digits", num_classes=3)
    for label, _, d, names in SET_ACTIVE_CASES:
        before = net.active_arch
        accepted, result = _outcome(label, lambda d=d: net.set_active(d), names)
        if accepted:
            assert result.to_dict() == _canonical(d) and net.active_arch == result, label
        else:
            assert net.active_arch == before, f"{label}: a refused arch changed the active subnet"


# -- arch strings and JSON -----------------------------------------------------------------------

STRING_INSERTS = ["_", " ", "３", "٣", "x", "-", ",", ".", "e", "inf", "nan", "+", "0", "\n", "--", "k", "d"]


def _arch_string_cases(n: int, seed: int) -> list[tuple[str, str, Any]]:
    rng = random.Random(seed)
    cases = [("not a str", "digits", v) for v in (None, 3, b"r32", ["r32"], spaces.get("digits").max_arch())]
    for k in range(n):
        name = rng.choice(SPACES)
        text = str(spaces.get(name).sample(rng))
        for _ in range(rng.choice([1, 2])):
            pos = rng.randrange(len(text) + 1)
            op = rng.randrange(4)
            if op == 0:
                text = text[:pos] + rng.choice(STRING_INSERTS) + text[pos:]
            elif op == 1 and text:
                text = text[: min(pos, len(text) - 1)] + text[min(pos, len(text) - 1) + 1 :]
            elif op == 2:
                text = text[:pos]
            else:
                digits = [m.start() for m in re.finditer(r"[0-9]", text)]
                if digits:
                    at = rng.choice(digits)
                    text = text[:at] + str(rng.randrange(10)) + text[at + 1 :]
        cases.append((f"case {k} ({name}) {text!r}", name, text))
    return cases


ARCH_STRING_CASES = _count("SearchSpace.arch_from_string", _arch_string_cases(300, SEED + 2))


def _skeleton(text: str) -> tuple[str, list[float]]:
    return re.sub(r"[0-9.]+", "#", text), [float(x) for x in re.findall(r"[0-9.]+", text)]


def test_fuzz_arch_from_string():
    for label, name, text in ARCH_STRING_CASES:
        space = spaces.get(name)
        accepted, result = _outcome(label, lambda t=text, sp=space: sp.arch_from_string(t), ARCH_FIELDS)
        if accepted:  # the same letters and separators, the same numbers (4.0 for 4 is fine)
            assert _skeleton(str(result)) == _skeleton(text.strip()), f"{label}: read as {result}"


def _arch_json_cases(seed: int) -> list[tuple[str, str, Any, tuple[str, ...]]]:
    cases = []
    for label, name, d, names in _arch_dict_cases(150, seed):
        try:
            cases.append((label, name, json.dumps(d), names))
        except (TypeError, ValueError):  # bytes, complex, huge: not JSON
            continue
    junk = ["", "{", "[1,", "null", "NaN", '"r32"', "[" * 50_000 + "]" * 50_000, b"\xff\xfe{", b"{}", None, 7, {}]
    return cases + [(f"junk {j!r:.40}", "digits", j, ("arch", "JSON")) for j in junk]


ARCH_JSON_CASES = _count("SearchSpace.arch_from_json", _arch_json_cases(SEED + 3))


def test_fuzz_arch_from_json():
    for label, name, text, names in ARCH_JSON_CASES:
        space = spaces.get(name)
        accepted, result = _outcome(label, lambda t=text, sp=space: sp.arch_from_json(t), names + ("JSON",))
        if accepted:
            assert result.to_dict() == _canonical(json.loads(text)), label


# -- encoded arrays --------------------------------------------------------------------------------


def _code_cases(n: int, seed: int) -> list[tuple[str, str, Any]]:
    rng = random.Random(seed)
    cases = []
    for k in range(n):
        name = rng.choice(SPACES[:3])  # ofa_mbv3's estimator tables take seconds to build
        space = spaces.get(name)
        codes = space.encode([space.sample(rng) for _ in range(rng.randint(1, 3))]).astype(np.int64)
        op = rng.randrange(12)
        if op <= 3:  # any index into any cell, sometimes valid: the oracle decides
            codes[rng.randrange(len(codes)), rng.randrange(space.code_length)] = rng.randint(-3, 8)
        elif op == 4:
            codes[rng.randrange(len(codes)), rng.randrange(space.code_length)] = rng.choice([2**31 + 5, -(2**31) - 7])
        elif op == 5:
            codes = codes.astype(rng.choice([np.float32, np.float64, bool, np.complex64, object, np.str_]))
        elif op == 6:
            codes = rng.choice([codes[:, :-1], np.concatenate([codes, codes[:, :1]], 1), codes[None], codes.T])
        elif op == 7:
            codes = rng.choice([np.int64(3), np.zeros((0, 3), np.int64), np.zeros((2, 0), np.int64)])
        elif op == 8:
            rows = codes.tolist()
            rows[0] = rows[0][:-1]
            codes = rows  # ragged
        elif op == 9:
            codes = rng.choice([None, "codes", [[1.5] * space.code_length], [["a"] * space.code_length]])
        elif op == 10:
            codes = codes.astype(rng.choice([np.int8, np.uint8, np.int16, np.uint64]))  # other integers: valid
        else:
            codes = np.asfortranarray(codes)  # another layout: valid
        cases.append((f"case {k} ({name}, op {op})", name, codes))
    return cases


CODE_CASES = _count("SearchSpace.decode", _code_cases(300, SEED + 4))


def test_fuzz_decode():
    for label, name, codes in CODE_CASES:
        space = spaces.get(name)
        accepted, archs = _outcome(label, lambda c=codes, sp=space: sp.decode(c), ("codes",))
        if accepted:  # a valid row decodes to the arch that encodes back to it
            rows = np.asarray(codes).reshape(-1, space.code_length)
            assert np.array_equal(space.encode(archs), rows), label


ENCODE_CASES = _count(
    "SearchSpace.encode",
    [("digits", v) for v in ([None], ["r32"], [{"resolution": 32}], [3], "abc", [spaces.get("rss").max_arch()])]
    + [("rss", [spaces.get("digits").sample(s)]) for s in range(10)],
)


def test_fuzz_encode():
    for k, (name, value) in enumerate(ENCODE_CASES):
        _refused(f"case {k}", lambda v=value, n=name: spaces.get(n).encode(v), ("Arch", *ARCH_FIELDS))


ESTIMATOR_CODE_CASES = _count("Estimator.flops/params", _code_cases(150, SEED + 5))
ESTIMATOR_JUNK = _count(
    "Estimator.flops/params",
    [None, 5, np.int64(3), "abc", ["r32"], [None], [{"resolution": 1}], spaces.get("rss").max_arch(), {"stages": []}]
    + [torch.zeros(2, spaces.get("digits").code_length, device="meta"), torch.zeros(2, 3, dtype=torch.int32)],
)


@pytest.fixture(scope="module")
def estimators() -> dict[str, Estimator]:
    return {name: Estimator(name, num_classes=10) for name in SPACES[:3]}


def test_fuzz_estimator_scores(estimators):
    for label, name, codes in ESTIMATOR_CODE_CASES:
        est = estimators[name]
        values = [("array", codes)]
        if isinstance(codes, np.ndarray) and codes.dtype.kind in "iuf" and codes.ndim == 2:
            values.append(("tensor", torch.from_numpy(np.ascontiguousarray(codes))))
        for kind, value in values:
            accepted, flops = _outcome(f"{label} {kind}", lambda v=value, e=est: e.flops(v), ("codes", "Arch"))
            if accepted:  # the same numbers as scoring the decoded archs one by one
                archs = est.space.decode(np.asarray(codes))
                assert list(flops) == [est.flops(a) for a in archs], label
                assert list(est.params(value)) == [est.params(a) for a in archs], label


def test_fuzz_estimator_junk(estimators):
    est = estimators["digits"]
    names = ("codes", "archs", "Arch", *ARCH_FIELDS)
    for k, value in enumerate(ESTIMATOR_JUNK):
        for score in (est.flops, est.params):
            _refused(f"case {k} {score.__name__}", lambda v=value, s=score: s(v), names)


def _sample_cases() -> list[tuple[dict, str]]:
    low, high = 1_244_432, 8_482_176  # the digits space's FLOPs range (10 classes)
    return (
        [({"n": v}, "n") for v in (-1, 1.5, "3", None, True, [1], math.nan)]
        + [({"n": 1, "min_flops": v}, "min_flops") for v in (math.nan, "1", [1], True, -math.inf)]
        + [({"n": 1, "max_flops": v}, "max_flops") for v in (math.nan, "1", [1], True, math.inf)]
        + [({"n": 1, "min_flops": high, "max_flops": low}, "min_flops")]
        + [({"n": 1, "min_flops": high + 1}, "FLOPs"), ({"n": 1, "max_flops": low - 1}, "FLOPs")]
        + [({"n": 1, "seed": v}, "seed") for v in ("x", 1.5, -1, None, True, [1, 2], np.random.RandomState(0))]
        + [({"n": 1, "as_codes": v}, "as_codes") for v in ("yes", 1, None)]
    )


SAMPLE_CASES = _count("Estimator.sample", _sample_cases())


def test_fuzz_estimator_sample(estimators):
    est = estimators["digits"]
    assert est.flops_range() == (1_244_432, 8_482_176)
    for k, (kwargs, name) in enumerate(SAMPLE_CASES):
        _refused(f"case {k} {kwargs!r:.80}", lambda kw=kwargs: est.sample(**kw), (name,))


_DIGITS = spaces.get("digits")
ESTIMATOR_CASES = _count(
    "Estimator()",
    [((v,), {}, "space") for v in (3, None, "nope", object(), ["digits"])]
    + [((_DIGITS, v), {}, "num_classes") for v in (0, -1, 1.5, "10", True, None)]
    + [((_DIGITS,), {"backend": v}, "backend") for v in ("gpu", None, 3)]
    + [((_DIGITS,), {"latency_table": v}, "latency_table") for v in (3, {})]
    + [((_DIGITS,), {"latency_table": "/nonexistent/table.json"}, "/nonexistent/table.json")],
)
SUPERNET_CASES = _count(
    "Supernet()",
    [((v,), "space") for v in (3, None, "nope", object(), ["digits"])]
    + [((_DIGITS, v), "num_classes") for v in (0, -1, 1.5, "10", True, None, np.int64(3))],
)


def test_fuzz_estimator_and_supernet_constructors():
    for k, (args, kwargs, name) in enumerate(ESTIMATOR_CASES):
        try:
            _refused(f"Estimator case {k}", lambda a=args, kw=kwargs: Estimator(*a, **kw), (name,))
        except AssertionError as exc:  # a missing table file is a FileNotFoundError naming it: clear too
            if not (isinstance(exc.__cause__, FileNotFoundError) and name in str(exc.__cause__)):
                raise
    for k, (args, name) in enumerate(SUPERNET_CASES):
        _refused(f"Supernet case {k}", lambda a=args: Supernet(*a), (name,))


GET_CASES = _count(
    "spaces.get",
    [((v,), {}, "space") for v in ("nope", "", "TOFA", None, 3, ["tofa"])]
    + [(("ofa_mbv3",), {"width_mult": v}, "width_mult") for v in ("x", -1, 0, math.nan, math.inf, None, True)]
    + [(("ofa_mbv3",), {"resolutions": v}, "resolutions") for v in ([0], [], ["a"], [-32], 5, [32.5], [[32]])]
    + [(("tofa",), {"foo": 1}, "foo"), (("digits",), {"resolutions": [32]}, "resolutions")],
)


def test_fuzz_spaces_get():
    for k, (args, kwargs, name) in enumerate(GET_CASES):
        _refused(f"case {k} {args} {kwargs}", lambda a=args, kw=kwargs: spaces.get(*a, **kw), (name,))


SPACE_SAMPLE_CASES = _count("SearchSpace.sample", ["x", 1.5, [1], np.random.default_rng(0), object(), True])


def test_fuzz_space_sample():
    for k, rng in enumerate(SPACE_SAMPLE_CASES):
        _refused(f"case {k} {rng!r:.40}", lambda r=rng: _DIGITS.sample(r), ("rng",))


# -- tensors ---------------------------------------------------------------------------------------

BAD_DTYPES = [torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.complex64]


def _bad_image_tensors(rng: random.Random, channels: int, n: int) -> list[tuple[str, Any]]:
    """Image batches every image entry must refuse: not tensors, sparse, nested, meta, empty, wrong
    shapes and dtypes."""
    good = torch.randn(2, channels, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "nested tensors are a prototype"
        nested = torch.nested.nested_tensor([good[0], good[1]])
    cases = [
        ("list", good.tolist()),
        ("numpy", good.numpy()),
        ("None", None),
        ("sparse", good.to_sparse()),
        ("nested", nested),
        ("meta", good.to("meta")),
        ("empty H", good[:, :, :0]),
        ("empty W", good[:, :, :, :0]),
    ]
    for k in range(n):
        kind = rng.randrange(3)
        if kind == 0:  # wrong rank or channel count
            shape = [rng.randint(1, 3) for _ in range(rng.choice([0, 1, 2, 3, 5, 6]))]
            if rng.random() < 0.5:
                shape = [2, rng.choice([c for c in range(1, 8) if c != channels]), 8, 8]
            value = torch.randn(shape)
        elif kind == 1:  # a dtype the network cannot take
            value = good.to(rng.choice(BAD_DTYPES + [torch.float64, torch.float16, torch.bfloat16]))
        else:  # both
            value = torch.zeros(rng.randint(1, 3), rng.randint(1, 6), 4).to(rng.choice(BAD_DTYPES))
        cases.append((f"random {k} {tuple(value.shape)} {value.dtype}", value))
    return cases


def _valid_layouts(channels: int) -> list[tuple[str, torch.Tensor]]:
    """Valid batches in unusual memory layouts: they must give what their contiguous copy gives."""
    return [
        ("channels_last", torch.randn(2, channels, 12, 12).contiguous(memory_format=torch.channels_last)),
        ("transposed", torch.randn(2, channels, 12, 12).transpose(2, 3)),
        ("strided", torch.randn(2, channels, 24, 24)[:, :, ::2, ::2]),
        ("expanded", torch.randn(1, channels, 1, 12).expand(2, channels, 12, 12)),
        ("channel slice", torch.randn(2, 2 * channels, 12, 12)[:, ::2]),
        ("batch of one", torch.randn(1, channels, 12, 12)),
        ("odd size", torch.randn(3, channels, 7, 5)),
    ]


FORWARD_CASES = _count("Supernet.forward", _bad_image_tensors(random.Random(SEED + 6), 3, 60))
FORWARD_LAYOUTS = _count("Supernet.forward", _valid_layouts(3))


def test_fuzz_supernet_forward():
    torch.manual_seed(0)
    net = Supernet("digits", num_classes=4).eval()
    for label, x in FORWARD_CASES:
        _refused(label, lambda x=x: net(x), ("x",))
    for label, x in FORWARD_LAYOUTS:
        torch.testing.assert_close(net(x), net(x.contiguous()), msg=label)


def _recalibrate_cases() -> list[tuple[str, Any, Callable[[], Any], tuple[str, ...]]]:
    """(label, model, batches factory, words); model ``"subnet"`` stands for the extracted subnet."""
    rng = random.Random(SEED + 7)
    batch = torch.randn(2, 3, 8, 8)
    cases = [
        (f"batches {label}", "subnet", lambda x=x: [x], ("batches[0]",)) for label, x in _bad_image_tensors(rng, 3, 30)
    ]
    cases += [("model str", "model", lambda: [batch], ("model",)), ("model None", None, lambda: [batch], ("model",))]
    junk_batches = [
        None,
        [],
        batch,
        "abc",
        [{"x": 1}],
        [()],
        [torch.randn(0, 3, 8, 8)],
        [torch.full_like(batch, math.nan)],
    ]
    cases += [(f"batches {b!r:.30}", "subnet", lambda b=b: b, ("batches", "batches[0]")) for b in junk_batches]
    return cases


RECALIBRATE_CASES = _count("recalibrate_bn", _recalibrate_cases())


def test_fuzz_recalibrate_bn():
    torch.manual_seed(0)
    net = Supernet("digits", num_classes=4)
    sub = net.extract(net.space.min_arch())
    statistics = {k: v.clone() for k, v in sub.state_dict().items() if "running_" in k}
    for label, model, batches, names in RECALIBRATE_CASES:
        model = sub if model == "subnet" else model
        _refused(label, lambda m=model, b=batches: recalibrate_bn(m, b()), names)
        for key, value in sub.state_dict().items():  # a refusal leaves the running statistics alone
            if key in statistics:
                torch.testing.assert_close(value, statistics[key], msg=f"{label}: {key} changed")
    assert recalibrate_bn(sub, [torch.randn(4, 3, 8, 8)]) == 4


def _dwconv_cases(rng: random.Random, n: int) -> list[tuple[str, tuple, dict, tuple[str, ...]]]:
    x, w = torch.randn(2, 8, 10, 10), torch.randn(8, 1, 5, 5)
    cases = []
    for k in range(n):
        kind = rng.randrange(9)
        args, kwargs, names = [x, w, 3], {}, ()
        if kind == 0:
            args[2], names = rng.choice([0, -1, 2, 4, 7, 9, 3.0, "3", True, None, np.int64(3)]), ("kernel_size",)
        elif kind == 1:
            kwargs["stride"], names = rng.choice([0, -1, 1.5, "1", None, True]), ("stride",)
        elif kind == 2:
            shape = rng.choice([(2, 8, 10), (1, 2, 8, 10, 10), (2, 9, 10, 10), (2, 0, 10, 10), (2, 8, 0, 10)])
            args[0], names = torch.randn(shape), ("x",)
        elif kind == 3:
            shape = rng.choice([(8, 5, 5), (8, 2, 5, 5), (8, 1, 5, 3), (8, 1, 4, 4), (8, 1, 5, 5, 1)])
            args[1], names = torch.randn(shape), ("weight",)
        elif kind == 4:
            args[0], names = x.to(rng.choice(BAD_DTYPES + [torch.float64])), ("x", "dtype")
        elif kind == 5:
            args[1], names = w.to(rng.choice(BAD_DTYPES + [torch.float64, torch.float16])), ("weight", "dtype")
        elif kind == 6:
            which = rng.randrange(2)
            args[which], names = args[which].to("meta"), ("x", "weight", "meta")
        elif kind == 7:
            kwargs["transforms"] = rng.choice(
                [
                    [torch.randn(25, 25)],
                    [torch.randn(9, 8)],
                    [torch.randn(9, 9), torch.randn(9, 9)],
                    [torch.randn(1, 9, 9)],
                    [torch.randn(9, 9).long()],
                    [torch.randn(9, 9, dtype=torch.float64)],
                    [[1.0] * 9] * 9,
                    "transforms",
                    [torch.randn(9, 9, device="meta")],
                ]  # fmt: skip
            )
            names = ("transforms",)
        else:
            args[0], names = rng.choice([x.tolist(), x.numpy(), None, 3]), ("x",)
        cases.append((f"case {k} kind {kind}", tuple(args), kwargs, names))
    return cases


DWCONV_CASES = _count("ops.elastic_dwconv2d", _dwconv_cases(random.Random(SEED + 8), 120))
DWCONV_LAYOUTS = _count("ops.elastic_dwconv2d", [*_valid_layouts(8), ("weight transposed", torch.randn(2, 8, 10, 10))])


def test_fuzz_elastic_dwconv2d():
    for label, args, kwargs, names in DWCONV_CASES:
        _refused(label, lambda a=args, kw=kwargs: elastic_dwconv2d(*a, **kw), names)
    weight = torch.randn(8, 1, 5, 5)
    for label, x in DWCONV_LAYOUTS:
        w = weight.transpose(2, 3) if label == "weight transposed" else weight
        for k, stride in ((3, 1), (5, 2), (1, 1)):
            torch.testing.assert_close(
                elastic_dwconv2d(x, w, k, stride),
                elastic_dwconv2d_reference(x.contiguous(), w.contiguous(), k, stride),
                msg=label,  # fmt: skip
            )


#: Inputs ``elastic_dwconv2d`` once let through to the dispatcher (issue 16): a bare tensor as
#: ``transforms`` ("Boolean value of Tensor ... is ambiguous"), sparse tensors (NotImplementedError).
DWCONV_GAPS = [
    ("transforms as one tensor", (torch.randn(2, 8, 10, 10), torch.randn(8, 1, 5, 5), 3, 1, torch.randn(9, 9)), ("transforms",)),
    ("sparse x", (torch.randn(2, 8, 10, 10).to_sparse(), torch.randn(8, 1, 5, 5), 3), ("x",)),
    ("sparse weight", (torch.randn(2, 8, 10, 10), torch.randn(8, 1, 5, 5).to_sparse(), 3), ("weight",)),
]  # fmt: skip


@pytest.mark.parametrize(("label", "args", "names"), DWCONV_GAPS, ids=[g[0] for g in DWCONV_GAPS])
def test_elastic_dwconv2d_refuses_tensors_it_cannot_take(label, args, names):
    _refused(label, lambda: elastic_dwconv2d(*args), names)


# -- command line ----------------------------------------------------------------------------------


class _TrainingStarted(BaseException):
    """Raised instead of training: a bad value that reached the training loop was not refused."""


def _cli_cases() -> list[tuple[list[str], str]]:
    """(argv, words the error must contain). Every argv has exactly one bad value."""
    train = [
        (["--epochs", v], "--epochs") for v in ("0", "-3", "x", "1.5", "")
    ] + [
        (["--batch-size", v], "--batch-size") for v in ("0", "-1", "many")
    ] + [
        (["--labels-per-class", v], "--labels-per-class") for v in ("0", "x")
    ] + [
        (["--val-per-class", v], "--val-per-class") for v in ("0", "-2")
    ] + [
        (["--lr", v], "lr") for v in ("-1", "nan", "inf", "abc", "-inf")
    ] + [
        (["--seed", v], "seed") for v in ("-1", "x", "1e3", str(2**64))
    ] + [
        (["--workers", v], "workers") for v in ("-2", "x")
    ] + [
        (["--strategy", v], "--strategy") for v in ("bad", "TOFA", "")
    ] + [
        (["--loss", v], "--loss") for v in ("kd", "sup+fm+kd+x")
    ] + [
        (["--precision", "fp8"], "--precision"), (["--step", "fast"], "--step"),
        (["--device", "foo"], "--device"), (["--device", ""], "--device"), (["--device", "cuda:99"], "--device"),
        (["--space", "nope"], "space"), (["--data", "nope"], "--data"), (["--data", ""], "--data"),
        (["--data", "cifar10", "--data-root", "/nonexistent/fuzz"], "cifar10"),
        (["--strategy", "rss", "--loss", "sup+kd"], "loss"), (["--arch", "r32-s16"], "arch"),
        (["--strategy", "single", "--arch", "garbage"], "arch"), (["--strategy", "single", "--arch", "{"], "arch"),
        (["--init", "bogus"], "--init"), (["--init", "torchvision:resnet18"], "--init"),
        (["--init", "ofa:/nonexistent/fuzz.pt"], "/nonexistent/fuzz.pt"),
        (["--labels-per-class", "100000"], "labels_per_class"), (["--val-per-class", "100000"], "100000"),
        (["--checkpoint-every", "0"], "--checkpoint-every"), (["--checkpoint-minutes", "nan"], "checkpoint_minutes"),
        (["--checkpoint-minutes", "-1"], "checkpoint_minutes"), (["--bogus"], "--bogus"),
    ]  # fmt: skip
    run = "{run}"
    other = [
        (["select", run, "--max-mflops", v], "--max-mflops") for v in ("nan", "-1", "0", "x", "")
    ] + [
        (["export", run, "--max-mflops", "nan", "-o", "{tmp}/m.onnx"], "--max-mflops"),
        (["export", run, "--max-mflops", "3", "-o", "{tmp}/m.txt"], "output"),
        (["export", run, "--max-mflops", "3", "-o", "/proc/nonexistent/m.pt"], "/proc/nonexistent"),
        (["select", "{tmp}/no_run", "--max-mflops", "3"], "no_run"), (["select", run], "--max-mflops"),
        (["evaluate", "{tmp}/no_run"], "no_run"), (["evaluate", run, "--population", "0"], "--population"),
        (["evaluate", run, "--population", "2", "--band", "-1"], "band"),
        (["evaluate", run, "--population", "2", "--band", "nan"], "band"),
        (["evaluate", run, "--targets", "-1"], "--targets"),
        (["search", run, "--method", "x"], "--method"), (["search", run, "--budgets", "0"], "--budgets"),
        (["search", run, "--metric", "latency"], "latency"),
        (["search", run, "--latency-table", "{tmp}/no_table.json"], "no_table.json"),
        (["profile", "--space", "nope", "-o", "{tmp}/t.json"], "space"),
        (["profile", "--device", "foo", "-o", "{tmp}/t.json"], "--device"),
        (["profile", "--min-time", "-1", "-o", "{tmp}/t.json"], "--min-time"),
        (["profile", "--min-time", "nan", "-o", "{tmp}/t.json"], "--min-time"),
        (["profile", "--cold-mib", "-5", "-o", "{tmp}/t.json"], "--cold-mib"),
        (["profile", "--time-budget", "0", "-o", "{tmp}/t.json"], "--time-budget"),
        (["profile", "--calibration", "-1", "-o", "{tmp}/t.json"], "--calibration"),
        (["profile", "--threads", "0"], "--threads"), (["profile", "--validate", "{tmp}/no_table.json"], "no_table"),
        ([], "COMMAND"), (["bogus"], "bogus"),
    ]  # fmt: skip
    return [(["train", *argv], words) for argv, words in train] + other


CLI_CASES = _count("cli.main", _cli_cases())


@pytest.fixture(scope="module")
def tiny_run_folder(tmp_path_factory) -> str:
    """A run folder written before any training step: bad values must be refused before its
    weights matter."""
    from search_fixtures import tiny_val_splits

    from tofa_fast.train import TrainConfig, Trainer

    out = tmp_path_factory.mktemp("fuzz") / "run"
    config = TrainConfig(out=str(out), epochs=1, batch_size=8, palette_size=2, calibration_images=40, device="cpu", val_per_class=2)  # fmt: skip
    Trainer(config, splits=tiny_val_splits()).save()
    return str(out)


def test_fuzz_cli(tiny_run_folder, tmp_path, monkeypatch):
    from tofa_fast.cli import main
    from tofa_fast.train import trainer

    def refuse_to_train(*_args, **_kwargs):
        raise _TrainingStarted

    monkeypatch.setattr(trainer.Trainer, "fit", refuse_to_train)
    monkeypatch.setattr(trainer.Trainer, "train_epoch", refuse_to_train)
    torch.set_num_threads(1)
    for template, words in CLI_CASES:
        argv = [a.replace("{run}", tiny_run_folder).replace("{tmp}", str(tmp_path)) for a in template]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
        except _TrainingStarted:
            raise AssertionError(f"{argv}: accepted, training would have started") from None
        message = err.getvalue()
        assert code in (1, 2), f"{argv}: exit code {code}, stderr {message!r}"
        assert "Traceback" not in message, f"{argv}: {message!r}"
        assert words in message, f"{argv}: the error does not name {words!r}: {message!r}"


# -- the table ---------------------------------------------------------------------------------------

PUBLIC_ENTRIES = (
    "spaces.get",
    "SearchSpace.sample",
    "SearchSpace.arch_from_dict",
    "SearchSpace.arch_from_string",
    "SearchSpace.arch_from_json",
    "SearchSpace.encode",
    "SearchSpace.decode",
    "Supernet()",
    "Supernet.set_active",
    "Supernet.forward",
    "recalibrate_bn",
    "Estimator()",
    "Estimator.flops/params",
    "Estimator.sample",
    "ops.elastic_dwconv2d",
    "cli.main",
)


def test_fuzz_counts():
    """Every public entry is fuzzed; prints the number of inputs per entry (for the issue note)."""
    table = "\n".join(f"{entry:32s} {FUZZ_COUNTS.get(entry, 0):6d}" for entry in PUBLIC_ENTRIES)
    print(f"\nfuzz inputs per public entry (seed {SEED}):\n{table}\n{'total':32s} {sum(FUZZ_COUNTS.values()):6d}")
    assert sorted(FUZZ_COUNTS) == sorted(PUBLIC_ENTRIES)
    assert min(FUZZ_COUNTS.values()) >= 6
