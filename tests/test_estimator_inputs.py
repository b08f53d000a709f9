"""Bad input to the estimator fails with a clear message, the same from the C++ kernel and the
Python reference: codes of another space, out-of-range codes, malformed arrays, bad arguments."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import tofa_fast
from tofa_fast.estimator import Estimator, cpp_estimator_available
from tofa_fast.spaces import HeadSpec, SearchSpace, StageSpec, StemSpec

BACKENDS = ["python"] + (["cpp"] if cpp_estimator_available() else [])


def codes_of(preset: str, n: int = 8) -> tuple[SearchSpace, np.ndarray]:
    space = tofa_fast.spaces.get(preset)
    return space, space.encode([space.sample(i) for i in range(n)])


def errors(space: SearchSpace, codes: np.ndarray) -> list[str]:
    """The message each backend raises for ``codes`` (asserting that both raise ValueError)."""
    messages = []
    for backend in BACKENDS:
        with pytest.raises(ValueError) as info:
            Estimator(space, backend=backend).flops(codes)
        messages.append(str(info.value))
    assert len(set(messages)) == 1, messages
    return messages


@pytest.mark.parametrize("backend", BACKENDS)
def test_codes_of_another_space_are_refused(backend):
    _, tofa_codes = codes_of("tofa")
    length = tofa_fast.spaces.get("rss").code_length
    with pytest.raises(ValueError, match=rf"codes must have shape \(n, {length}\).*space 'rss'.*another space"):
        Estimator("rss", backend=backend).flops(tofa_codes)
    # ofa_mbv3 and rss share the code layout; ofa_mbv3 resolutions index 25 choices, rss has one.
    _, ofa_codes = codes_of("ofa_mbv3", 40)
    with pytest.raises(ValueError, match=r"resolution index \d+ is out of range 0..0 \(space 'rss'\)"):
        Estimator("rss", backend=backend).flops(ofa_codes)


@pytest.mark.parametrize(
    ("preset", "column", "value", "message"),
    [
        ("tofa", 0, 7, r"codes\[3\] resolution index 7 is out of range 0..6"),
        ("tofa", 1, -1, r"codes\[3\] stem index -1 is out of range 0..1"),
        ("tofa", 2, 2, r"codes\[3\] head index 2 is out of range 0..1"),
        ("tofa", 3, 5, r"codes\[3\] stages\[0\].width index 5 is out of range 0..1"),
        ("tofa", 4, 2, r"codes\[3\] stages\[0\].depth index 2 is out of range 0..1"),
        ("tofa", 5, 9, r"codes\[3\] stages\[0\].kernel\[0\] index 9 is out of range 0..1"),
        ("ofa_mbv3", 9, 3, r"codes\[3\] stages\[1\].kernel\[0\] index 3 is out of range 0..2"),
        ("ofa_mbv3", 13, -1, r"codes\[3\] stages\[1\].expand\[0\] index -1 is out of range 0..2"),
    ],
)
def test_out_of_range_codes_name_row_and_field(preset, column, value, message):
    space, codes = codes_of(preset)
    codes[3, column] = value
    (text,) = set(errors(space, codes))
    assert f"(space {space.name!r})" in text
    assert re.search(message, text), text


def test_layers_beyond_the_depth_must_hold_minus_one():
    space = tofa_fast.spaces.get("ofa_mbv3")
    codes = space.encode([space.min_arch()])  # depth 2 in every elastic stage
    offset = 3 + 2 + 2  # stages[1] starts after the fixed first block (depth 1: 2 + 2 entries)
    codes[0, offset + 2 + 3] = 0  # kernel of layer 3
    (text,) = set(errors(space, codes))
    assert "stages[1].kernel[3] is 0 but layers beyond the active depth 2 must hold -1" in text


def test_stage_granularity_requires_one_choice_per_stage():
    space = tofa_fast.spaces.get("tofa")
    arch = space.max_arch()
    codes = space.encode([arch])
    offset = 3 + (2 + 2 * 2) + (2 + 2 * 5)  # stages[2]
    codes[0, offset + 2 + 1] = 1 - codes[0, offset + 2]  # layer 1's kernel differs from layer 0's
    (text,) = set(errors(space, codes))
    assert "stages[2].kernel[1]" in text and "stage granularity" in text


@pytest.mark.skipif("layer_expands" not in StageSpec.__dataclass_fields__, reason="no StageSpec.layer_expands")
def test_expand_not_allowed_at_that_layer_is_refused():
    space = SearchSpace(
        name="narrowed",
        resolutions=(16,),
        stem=StemSpec((8,)),
        stages=(StageSpec((8,), (2,), (3,), (2, 3, 4), layer_expands=((2, 3), (3, 4))),),
        head=HeadSpec((16,), expand=2),
    )
    codes = space.encode([space.max_arch()])
    codes[0, 3 + 2 + 2] = 2  # layer 0 takes expand index 2 (ratio 4), which only layer 1 allows
    (text,) = set(errors(space, codes))
    assert "stages[0].expand[0] index 2 is not allowed at layer 0 (allowed indices: [0, 1])" in text


def test_random_corruptions_give_the_same_answer_from_both_backends():
    if len(BACKENDS) < 2:
        pytest.skip("C++ extension not built")
    rng = np.random.default_rng(0)
    for preset in ("tofa", "ofa_mbv3", "digits"):
        space, clean = codes_of(preset, 16)
        cpp, python = Estimator(space, backend="cpp"), Estimator(space, backend="python")
        for _ in range(200):
            codes = clean.copy()
            codes[rng.integers(len(codes)), rng.integers(codes.shape[1])] = rng.integers(-2, 7)
            outcomes = []
            for est in (cpp, python):
                try:
                    outcomes.append(est.flops(codes).tolist())
                except ValueError as exc:
                    outcomes.append(str(exc))
            assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_malformed_arrays_are_refused(backend):
    space, codes = codes_of("digits")
    est = Estimator(space, backend=backend)
    with pytest.raises(ValueError, match="integer array"):
        est.flops(codes.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        est.flops(codes[None])
    with pytest.raises(ValueError, match="outside int32"):
        est.flops(codes.astype(np.int64) + (1 << 40))
    with pytest.raises(TypeError, match="string"):
        est.flops("r24-s16")
    # A 1-D row is one arch; torch tensors and int64 arrays are accepted.
    np.testing.assert_array_equal(est.flops(codes[0]), est.flops(codes[:1]))
    np.testing.assert_array_equal(est.flops(torch.from_numpy(codes)), est.flops(codes.astype(np.int64)))


def test_invalid_arch_dicts_are_refused():
    est = Estimator("digits", 10)
    arch = est.space.sample(0).to_dict()
    arch["resolution"] = 999
    with pytest.raises(ValueError, match="resolution=999 is not allowed"):
        est.flops(arch)
    with pytest.raises(ValueError, match="resolution=999"):
        est.params([arch])


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="unknown search space"):
        Estimator("nope")
    with pytest.raises(TypeError, match="space must be"):
        Estimator(42)
    with pytest.raises(ValueError, match="num_classes"):
        Estimator("digits", num_classes=0)
    with pytest.raises(ValueError, match="backend"):
        Estimator("digits", backend="fortran")
    with pytest.raises(TypeError, match="latency_table"):
        Estimator("digits", latency_table=3.5)
