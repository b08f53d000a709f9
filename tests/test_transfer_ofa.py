"""OFA MobileNetV3 → ofa_mbv3 supernet: the `ofa` package is the oracle (SPEC §9)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import TOLERANCES

import tofa_fast
from tofa_fast.transfer import CheckpointMismatchError, from_ofa, ofa_arch

OFA_CLASSES = 17
SUBNETS_PER_WIDTH = 30
RTOL = TOLERANCES[torch.float32][0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def make_ofa(width_mult: float, seed: int = 0, **overrides):
    """A random-init OFAMobileNetV3 with non-trivial BN statistics/affines, SE biases and
    non-identity kernel-transform matrices, so that any mis-mapped tensor changes the output."""
    from ofa.imagenet_classification.elastic_nn.networks import OFAMobileNetV3

    config = dict(
        n_classes=OFA_CLASSES,
        width_mult=width_mult,
        ks_list=[3, 5, 7],
        expand_ratio_list=[3, 4, 6],
        depth_list=[2, 3, 4],
    )
    torch.manual_seed(seed)
    ofa = OFAMobileNetV3(**{**config, **overrides})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ofa.named_parameters():
            if name.endswith("_matrix"):
                p.copy_(torch.eye(p.shape[0]) + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for m in ofa.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.num_batches_tracked.fill_(7)
    return ofa.eval()


@pytest.fixture(scope="module", params=[1.2, 1.0], ids=["w1.2", "w1.0"])
def ofa_pair(request):
    ofa = make_ofa(request.param)
    return request.param, ofa, from_ofa(ofa)


def test_every_subnet_computes_what_ofa_computes(ofa_pair):
    width_mult, ofa, net = ofa_pair
    assert net.space.name == tofa_fast.spaces.get("ofa_mbv3", width_mult=width_mult).name
    assert net.num_classes == OFA_CLASSES and not net.training
    rng = random.Random(1)
    settings = [dict(ks=7, e=6, d=4), dict(ks=3, e=3, d=2)]
    for _ in range(SUBNETS_PER_WIDTH):
        settings.append(
            dict(
                ks=[rng.choice([3, 5, 7]) for _ in range(20)],
                e=[rng.choice([3, 4, 6]) for _ in range(20)],
                d=[rng.choice([2, 3, 4]) for _ in range(5)],
            )
        )
    worst = 0.0
    for setting in settings:
        resolution = rng.choice(net.space.resolutions)
        x = torch.randn(1, 3, resolution, resolution)
        ofa.set_active_subnet(**setting)
        arch = ofa_arch(net.space, resolution=resolution, **setting)
        with torch.no_grad():
            expected = ofa(x)
            ofa_static = ofa.get_active_subnet(preserve_weight=True).eval()(x)
            net.set_active(arch)
            ours = net(x)
            ours_static = net.extract(arch).eval()(x)
        assert expected.abs().max() > 1e-3, "outputs too small to compare meaningfully"
        errs = [rel_err(y, expected) for y in (ofa_static, ours, ours_static)]
        assert max(errs) <= RTOL, (setting, errs)
        worst = max(worst, *errs)
    print(f"w{width_mult}: max relative error vs OFA over {len(settings)} subnets: {worst:.2e}")


def test_ofa_arch_maps_per_block_lists_to_stages():
    """OFA's ks/e have one entry per block (4 per stage, skipped blocks included), d one per stage."""
    space = tofa_fast.spaces.get("ofa_mbv3")
    ks = [3, 5, 7, 3] * 5
    e = [6, 4, 3, 6] * 5
    d = [2, 3, 4, 2, 3]
    arch = ofa_arch(space, ks, e, d, 160)
    assert arch.resolution == 160 and arch.stem == 24 and arch.head == 1536
    assert arch.stages[0].to_dict() == {"width": 24, "depth": 1, "kernel": [3], "expand": [1]}
    for s, (stage, depth) in enumerate(zip(arch.stages[1:], d)):
        assert stage.depth == depth
        assert list(stage.kernel) == ks[4 * s : 4 * s + depth]
        assert list(stage.expand) == e[4 * s : 4 * s + depth]
    assert ofa_arch(space, 7, 6, 4) == space.max_arch()
    with pytest.raises(ValueError, match=r"ks must be a number or a list of 20 entries"):
        ofa_arch(space, [3] * 19, 6, 4)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_spellings_are_accepted(ofa_pair):
    _, ofa, net = ofa_pair
    sd = ofa.state_dict()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}
    assert _same_weights(from_ofa(wrapped), net)
    # The spelling of OFA's published checkpoints: `mobile_inverted_conv`, un-nested `conv`/`bn`.
    legacy = {
        k.replace("blocks.1.conv.", "blocks.1.mobile_inverted_conv.")
        .replace(".conv.conv.weight", ".conv.weight")
        .replace(".bn.bn.", ".bn.")
        .replace("classifier.linear.", "classifier.linear.linear."): v
        for k, v in sd.items()
        if not k.endswith("num_batches_tracked")  # absent from checkpoints of old PyTorch versions
    }
    legacy_net = from_ofa(legacy)
    ours = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert all(torch.equal(legacy_net.state_dict()[k], v) for k, v in ours.items())


def test_num_classes_reheads_and_keeps_everything_else(ofa_pair):
    _, ofa, net = ofa_pair
    reheaded = from_ofa(ofa, num_classes=5)
    assert reheaded.classifier.weight.shape == (5, net.classifier.weight.shape[1])
    assert reheaded.num_classes == 5
    theirs = net.state_dict()
    for key, value in reheaded.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(value, theirs[key]), key


# -- mismatched checkpoints ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ofa_state():
    return make_ofa(1.0, seed=3).state_dict()


def test_missing_and_unexpected_keys_are_listed(ofa_state):
    sd = dict(ofa_state)
    del sd["blocks.5.conv.depth_conv.se.fc.reduce.bias"]
    sd["blocks.5.conv.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError) as info:
        from_ofa(sd)
    message = str(info.value)
    assert "missing keys (1): [blocks.5.conv.depth_conv.se.fc.reduce.bias]" in message
    assert "unexpected keys (1): [blocks.5.conv.extra.weight]" in message
    assert "OFAMobileNetV3 w1.0" in message


def test_first_shape_mismatch_is_named_with_both_shapes(ofa_state):
    sd = dict(ofa_state)
    sd["blocks.7.conv.point_linear.conv.conv.weight"] = torch.zeros(40, 100, 1, 1)
    with pytest.raises(
        CheckpointMismatchError, match=r"blocks\.7\.conv\.point_linear\.conv\.weight.*\(40, 100, 1, 1\)"
    ):
        from_ofa(sd)
    with pytest.raises(CheckpointMismatchError, match=r"expected \(40, 240, 1, 1\)"):
        from_ofa(sd)


def test_wrong_width_is_reported(ofa_state):
    with pytest.raises(
        CheckpointMismatchError, match=r"shape mismatch at 'first_conv\.conv\.weight'.*\(16, 3, 3, 3\).*\(24, 3, 3, 3\)"
    ):
        from_ofa(ofa_state, width_mult=1.2)
    sd = dict(ofa_state)
    sd["first_conv.conv.weight"] = torch.zeros(40, 3, 3, 3)
    with pytest.raises(CheckpointMismatchError, match=r"\(40, 3, 3, 3\), which matches no supported width"):
        from_ofa(sd)


def test_checkpoints_of_other_ofa_spaces_are_rejected():
    shallow = make_ofa(1.0, depth_list=[2, 3]).state_dict()  # 3 blocks per stage instead of 4
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(\d+\): \[blocks\.16\."):
        from_ofa(shallow)
    narrow = make_ofa(1.0, expand_ratio_list=[3, 4]).state_dict()  # max expand 4 instead of 6
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch at 'blocks\.1\.conv\.inverted_bottleneck"):
        from_ofa(narrow)


def test_foreign_inputs_are_rejected(ofa_state):
    with pytest.raises(TypeError, match="OFAMobileNetV3 module or its state dict"):
        from_ofa(42)
    with pytest.raises(CheckpointMismatchError, match="missing key 'first_conv.conv.weight'"):
        from_ofa({"weight": torch.zeros(3)})
    sd = {k: v for k, v in ofa_state.items() if not k.startswith("classifier")}
    with pytest.raises(CheckpointMismatchError, match=r"'classifier\.linear\.weight' must be a \(classes, features\)"):
        from_ofa(sd)
