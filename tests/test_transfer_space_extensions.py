"""The two optional space fields transfer needs: ``StageSpec.layer_expands`` (per-layer expand
choices) and ``HeadSpec.feature_mix_bias``. Both default to the old behaviour."""

from __future__ import annotations

import json

import pytest
import torch

import tofa_fast
from tofa_fast.nn import Supernet
from tofa_fast.spaces import HeadSpec, SearchSpace, StageSpec, StemSpec


def tiny(layer_expands=None, granularity="layer", feature_mix_bias=False) -> SearchSpace:
    return SearchSpace(
        name="tiny",
        resolutions=(16,),
        stem=StemSpec((8,)),
        stages=(StageSpec((8,), (1, 2), (3,), (2, 3, 4), stride=2, se=True, layer_expands=layer_expands),),
        head=HeadSpec((32,), feature_mix_bias=feature_mix_bias),
        granularity=granularity,
    )


def test_defaults_keep_presets_unchanged():
    for name in tofa_fast.spaces.names():
        space = tofa_fast.spaces.get(name)
        assert all(st.layer_expands is None for st in space.stages)
        assert space.head.feature_mix_bias is False
        assert Supernet(space, 3).feature_mix_conv.bias is None
        # JSON written before the fields existed still loads.
        old = json.loads(space.to_json())
        for st in old["stages"]:
            del st["layer_expands"]
        del old["head"]["feature_mix_bias"]
        assert SearchSpace.from_dict(old) == space


def test_layer_expands_narrow_sampling_max_min_and_validation():
    space = tiny(layer_expands=[[2, 4], [2, 3]])
    assert space.max_arch().stages[0].expand == (4, 3)
    assert space.min_arch().stages[0].expand == (2,)  # depth 1
    seen = {space.sample(i) for i in range(2000)}
    assert all(a.stages[0].expand[1] in (2, 3) for a in seen if a.stages[0].depth == 2)
    assert space.num_archs() == len(seen) == 2 + 2 * 2  # depth 1: 2 choices; depth 2: 2 × 2
    d = space.max_arch().to_dict()
    d["stages"][0]["expand"][1] = 4
    with pytest.raises(ValueError, match=r"stages\[0\]\.expand\[1\]=4 is not allowed; allowed values: \[2, 3\]"):
        space.arch_from_dict(d)
    assert SearchSpace.from_json(space.to_json()) == space
    assert space.decode(space.encode(list(seen))) == list(seen)


def test_layer_expands_set_each_layers_max_width():
    net = Supernet(tiny(layer_expands=[[2, 4], [2, 3]]), 5).eval()
    assert [layer.max_mid for layer in net.stages[0]] == [32, 24]
    arch = net.space.sample(3)
    net.set_active(arch)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(net.extract(arch).eval()(x), net(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "layer_expands, message",
    [
        ([[2, 4]], r"one entry per layer \(max depth 2\), got 1"),
        ([[2, 4], [2, 6]], r"layer_expands\[1\] lists \[6\], which stage.expands \[2, 3, 4\] lacks"),
        ([[2, 4], []], r"layer_expands\[1\] must list at least one choice"),
    ],
)
def test_bad_layer_expands(layer_expands, message):
    with pytest.raises(ValueError, match=message):
        tiny(layer_expands=layer_expands)


def test_layer_expands_need_layer_granularity():
    with pytest.raises(ValueError, match="needs granularity 'layer'"):
        tiny(layer_expands=[[2, 4], [2, 3]], granularity="stage")


def test_feature_mix_bias_is_used_and_extracted():
    net = Supernet(tiny(feature_mix_bias=True), 5).eval()
    assert net.feature_mix_conv.bias is not None
    with torch.no_grad():
        net.feature_mix_conv.bias.normal_()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        with_bias = net(x)
        sub = net.extract()
        assert torch.allclose(sub(x), with_bias, rtol=1e-5, atol=1e-6)
        net.feature_mix_conv.bias.zero_()
        assert not torch.allclose(net(x), with_bias)
