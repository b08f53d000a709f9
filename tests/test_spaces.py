"""Search spaces and archs: presets, sampling, round trips, validation (SPEC §2)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

import tofa_fast
from tofa_fast.spaces import Arch, SearchSpace, make_divisible

PRESETS = tofa_fast.spaces.names()


def test_names_include_the_contract_presets():
    assert {"tofa", "ofa_mbv3", "rss", "digits"} <= set(PRESETS)


def test_unknown_space_names_the_available_ones():
    with pytest.raises(ValueError, match="unknown search space 'nope'.*tofa"):
        tofa_fast.spaces.get("nope")


@pytest.fixture(params=PRESETS)
def space(request) -> SearchSpace:
    return tofa_fast.spaces.get(request.param)


def _archs(space: SearchSpace, n: int = 60) -> list[Arch]:
    rng = random.Random(1)
    return [space.max_arch(), space.min_arch()] + [space.sample(rng) for _ in range(n)]


def test_round_trips_are_exact(space):
    archs = _archs(space)
    for arch in archs:
        assert space.arch_from_dict(arch.to_dict()) == arch
        assert space.arch_from_json(arch.to_json()) == arch
        assert space.arch_from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
        assert space.arch_from_string(str(arch)) == arch
        assert hash(space.arch_from_dict(arch.to_dict())) == hash(arch)
    codes = space.encode(archs)
    assert codes.dtype == np.int32 and codes.shape == (len(archs), space.code_length)
    assert space.decode(codes) == archs
    assert space.encode(space.decode(codes)).tolist() == codes.tolist()
    assert SearchSpace.from_json(space.to_json()) == space


def test_dict_form_is_the_contract(space):
    d = space.max_arch().to_dict()
    assert set(d) == {"resolution", "stem", "stages", "head"}
    assert len(d["stages"]) == len(space.stages)
    for stage in d["stages"]:
        assert set(stage) == {"width", "depth", "kernel", "expand"}
        assert len(stage["kernel"]) == stage["depth"] == len(stage["expand"])


def test_sampling_is_seeded_and_covers_choices(space):
    assert space.sample(7) == space.sample(7)
    rng = random.Random(3)
    first, second = space.sample(rng), space.sample(rng)
    assert first != second or space.num_archs() == 1
    archs = [space.sample(i) for i in range(300)]
    assert {a.resolution for a in archs} == set(space.resolutions)
    for i, stage in enumerate(space.stages):
        assert {a.stages[i].depth for a in archs} == set(stage.depths)
        assert {k for a in archs for k in a.stages[i].kernel} == set(stage.kernels)
        if space.granularity == "stage":
            assert all(len(set(a.stages[i].kernel)) == 1 and len(set(a.stages[i].expand)) == 1 for a in archs)


def test_max_and_min_are_extremes(space):
    big, small = space.max_arch(), space.min_arch()
    assert big.resolution == max(space.resolutions) and small.resolution == min(space.resolutions)
    for st, b, s in zip(space.stages, big.stages, small.stages):
        assert b.depth == max(st.depths) and s.depth == min(st.depths)
        assert set(b.kernel) == {max(st.kernels)} and set(s.expand) == {min(st.expands)}


def test_tofa_preset_is_table_1():
    space = tofa_fast.spaces.get("tofa")
    assert space.granularity == "stage"
    assert space.stem.widths == (16, 24)
    assert [s.widths for s in space.stages] == [
        (16, 24),
        (24, 32),
        (32, 40),
        (64, 72),
        (112, 128),
        (192, 216),
        (216, 224),
    ]
    assert [s.depths for s in space.stages] == [
        (1, 2),
        (3, 4, 5),
        (3, 4, 5, 6),
        (3, 4, 5, 6),
        tuple(range(3, 9)),
        tuple(range(3, 9)),
        (1, 2),
    ]
    assert all(s.kernels == (3, 5) for s in space.stages)
    assert space.stages[0].expands == (1,) and all(s.expands == (2, 4, 6) for s in space.stages[1:])
    assert [s.se for s in space.stages] == [False, False, True, False, True, True, True]
    assert space.head.widths == (1792, 1984) and space.head.expand == 6


@pytest.mark.parametrize("width_mult", [1.2, 1.0])
def test_ofa_mbv3_matches_the_ofa_package_layout(width_mult):
    from ofa.imagenet_classification.elastic_nn.networks import OFAMobileNetV3

    ofa = OFAMobileNetV3(
        n_classes=1000, width_mult=width_mult, ks_list=[3, 5, 7], expand_ratio_list=[3, 4, 6], depth_list=[2, 3, 4]
    )
    space = tofa_fast.spaces.get("ofa_mbv3", width_mult=width_mult)
    assert space.resolutions == tuple(range(128, 225, 4))
    assert space.stem.widths == (ofa.first_conv.out_channels,)
    widths = [space.stages[0].widths[0]] + [s.widths[0] for s in space.stages[1:]]
    ofa_widths = [ofa.blocks[0].conv.out_channels] + [
        ofa.blocks[idx[0]].conv.active_out_channel for idx in ofa.block_group_info
    ]
    assert widths == ofa_widths
    assert space.final_expand_channels(widths[-1]) == ofa.final_expand_layer.out_channels
    assert space.head.widths == (ofa.feature_mix_layer.out_channels,)
    assert [s.stride for s in space.stages] == [1, 2, 2, 2, 1, 2]
    assert [s.se for s in space.stages] == [False, False, True, False, True, True]


def test_rss_is_ofa_w1_at_32px():
    space = tofa_fast.spaces.get("rss")
    assert space.resolutions == (32,)
    assert space.stages == tofa_fast.spaces.get("ofa_mbv3", width_mult=1.0).stages


def test_num_archs_counts_by_enumeration():
    space = SearchSpace(
        name="tiny",
        resolutions=(16, 24),
        stem=tofa_fast.spaces.StemSpec((8,)),
        stages=(tofa_fast.spaces.StageSpec((8, 16), (1, 2), (3, 5), (2, 3), stride=2),),
        head=tofa_fast.spaces.HeadSpec((32,)),
    )
    seen = {space.sample(i) for i in range(4000)}
    # resolution 2 × width 2 × (depth 1: 4 + depth 2: 16) = 80
    assert space.num_archs() == 80 == len(seen)


def test_make_divisible_matches_ofa():
    from ofa.utils import make_divisible as ofa_make_divisible

    for v in np.linspace(1, 400, 997):
        assert make_divisible(v, 8) == ofa_make_divisible(v, 8)


# -- bad input ----------------------------------------------------------------------------------


def _tofa_dict():
    return tofa_fast.spaces.get("tofa").max_arch().to_dict()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("head"), r"arch is missing key\(s\) \['head'\]"),
        (lambda d: d.update(colour=1), r"arch has unknown key\(s\) \['colour'\]"),
        (lambda d: d.update(resolution=225), r"resolution=225 is not allowed; allowed values: \[272, 280"),
        (lambda d: d.update(stem=20), r"stem=20 is not allowed; allowed values: \[16, 24\]"),
        (lambda d: d.update(head="big"), r"head must be a number"),
        (lambda d: d["stages"].pop(), r"stages must have exactly 7 entries"),
        (lambda d: d["stages"][2].update(width=33), r"stages\[2\].width=33 is not allowed; allowed values: \[32, 40\]"),
        (lambda d: d["stages"][1].update(depth=9), r"stages\[1\].depth=9 is not allowed; allowed values: \[3, 4, 5\]"),
        (lambda d: d["stages"][3]["kernel"].append(5), r"stages\[3\].kernel must have exactly depth=6 entries, got 7"),
        (
            lambda d: d["stages"][3]["kernel"].__setitem__(0, 7),
            r"stages\[3\].kernel\[0\]=7 is not allowed; allowed values: \[3, 5\]",
        ),
        (lambda d: d["stages"][3]["expand"].__setitem__(1, 4), r"stages\[3\].expand must repeat one value"),
        (lambda d: d["stages"][0].pop("expand"), r"stages\[0\] is missing key\(s\) \['expand'\]"),
        (lambda d: d["stages"].__setitem__(0, 5), r"stages\[0\] must be a dict"),
    ],
)
def test_bad_arch_dicts_name_the_field(mutate, message):
    d = _tofa_dict()
    mutate(d)
    with pytest.raises(ValueError, match=message):
        tofa_fast.spaces.get("tofa").arch_from_dict(d)


def test_bad_codes_and_strings_are_rejected():
    tofa, ofa = tofa_fast.spaces.get("tofa"), tofa_fast.spaces.get("ofa_mbv3")
    codes = tofa.encode([tofa.max_arch()])
    with pytest.raises(ValueError, match=r"codes must have shape \(n, "):
        ofa.decode(codes)
    bad = codes.copy()
    bad[0, 0] = 99
    with pytest.raises(ValueError, match=r"resolution index 99 is out of range 0..6"):
        tofa.decode(bad)
    with pytest.raises(ValueError, match="integers"):
        tofa.decode(codes.astype(np.float32))
    with pytest.raises(ValueError, match="does not parse|is not of the form"):
        tofa.arch_from_string("r224-s24-junk")
    with pytest.raises(ValueError, match="arch JSON does not parse"):
        tofa.arch_from_json("{not json")
    with pytest.raises(TypeError, match="rng must be an int seed or random.Random"):
        tofa.sample("seed")
    with pytest.raises(ValueError, match="stage.kernels must be odd"):
        tofa_fast.spaces.StageSpec((8,), (1,), (4,), (1,))
    with pytest.raises(ValueError, match="granularity must be one of"):
        SearchSpace(name="x", resolutions=(8,), stem=tofa.stem, stages=tofa.stages, head=tofa.head, granularity="block")
