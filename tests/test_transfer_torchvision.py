"""torchvision MobileNetV3 → derived supernet: the torchvision model is the oracle of the max subnet."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import TOLERANCES
from torchvision.models import mobilenet_v2, mobilenet_v3_large, mobilenet_v3_small

from tofa_fast.nn import Supernet
from tofa_fast.spaces import SearchSpace
from tofa_fast.transfer import from_torchvision, torchvision_space

RTOL = TOLERANCES[torch.float32][0]
SUBNETS = 20
BUILDERS = {"large": mobilenet_v3_large, "small": mobilenet_v3_small, "v2": mobilenet_v2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def make_torchvision(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """Random-init (weights=None) torchvision model with non-trivial BN statistics and biases, and a
    classifier large enough that logits are not all ≈ 0."""
    torch.manual_seed(seed)
    return perturb_(BUILDERS[name](weights=None, **kwargs), seed)


def perturb_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give a freshly initialised model non-trivial BN statistics, affine parameters and biases (BN
    at its init is the identity, which would hide BN mapping errors), in place; returns it in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.05, generator=g)
    return model.eval()


@pytest.fixture(scope="module", params=["large", "small"])
def converted(request):
    model = make_torchvision(request.param)
    return request.param, model, from_torchvision(model)


def test_max_subnet_is_the_torchvision_model(converted):
    _, model, net = converted
    arch = net.space.max_arch()
    net.set_active(arch)
    static = net.extract(arch).eval()
    worst = 0.0
    for resolution in (224, 132):
        x = torch.randn(2, 3, resolution, resolution)
        with torch.no_grad():
            expected = model(x)
            errs = [rel_err(net(x), expected), rel_err(static(x), expected)]
        assert expected.abs().max() > 1e-2
        assert max(errs) <= RTOL, errs
        worst = max(worst, *errs)
    print(f"max relative error, max subnet vs torchvision: {worst:.2e}")


def test_derived_space_mirrors_the_torchvision_layout(converted):
    name, model, net = converted
    space = net.space
    blocks = list(model.features.children())[1:-1]
    # Middle widths: the max expand ratio of each layer reproduces torchvision's expanded channels.
    layers = [layer for stage in net.stages for layer in stage]
    assert len(layers) == len(blocks)
    for layer, block in zip(layers, blocks):
        dw = next(m for m in block.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1)
        assert layer.max_mid == dw.in_channels
        assert layer.dw_conv.max_kernel_size == dw.kernel_size[0]
        assert layer.residual == block.use_res_connect
    if name == "large":
        assert [s.widths[0] for s in space.stages] == [16, 24, 40, 80, 112, 160]
        assert space.stages[3].layer_expands[:2] == ((3, 4.6, 6), (1.3, 1.9, 2.5))  # 240/40, 200/80 ...
        assert space.stages[3].layer_expands[2][-1] == 2.3  # 184/80
        assert space.head.widths == (1280,) and space.head.expand == 6
    else:
        assert [s.widths[0] for s in space.stages] == [16, 24, 40, 48, 96]
        assert space.stages[0].se and space.stages[0].stride == 2 and space.stages[0].expands == (1,)
        assert space.head.widths == (1024,)
    assert space.head.feature_mix_bias and space.bn_eps == 1e-3 and space.bn_momentum == 0.01
    assert all(s.kernels == tuple(range(3, max(s.kernels) + 1, 2)) for s in space.stages)


def test_random_subnets_extract_to_the_same_function(converted):
    _, _, net = converted
    rng = random.Random(2)
    space = net.space
    archs = [space.min_arch()] + [space.sample(rng) for _ in range(SUBNETS)]
    worst = 0.0
    for arch in archs:
        x = torch.randn(1, 3, arch.resolution, arch.resolution)
        net.set_active(arch)
        with torch.no_grad():
            expected = net(x)
            got = net.extract(arch).eval()(x)
        assert expected.abs().max() > 1e-3
        err = rel_err(got, expected)
        assert err <= RTOL, str(arch)
        worst = max(worst, err)
    print(f"max relative error, extracted vs supernet over {len(archs)} subnets: {worst:.2e}")


def test_middle_channels_are_importance_sorted(converted):
    _, _, net = converted
    for stage in net.stages:
        for layer in stage:
            if layer.expand_conv is None:
                continue
            importance = layer.project_conv.weight.abs().sum(dim=(0, 2, 3))
            assert torch.all(importance[:-1] >= importance[1:])


def test_sorting_is_optional_and_changes_only_the_order(converted):
    _, model, net = converted
    unsorted = from_torchvision(model, sort_channels=False)
    a = unsorted.stages[1][0].project_conv.weight.abs().sum(dim=(0, 2, 3))
    b = net.stages[1][0].project_conv.weight.abs().sum(dim=(0, 2, 3))
    assert torch.allclose(a.sort(descending=True).values, b)


def test_derived_space_round_trips_json_and_rebuilds_the_supernet(converted):
    _, _, net = converted
    space = SearchSpace.from_json(net.space.to_json())
    assert space == net.space
    rebuilt = Supernet(space, net.num_classes)
    rebuilt.load_state_dict(net.state_dict())
    arch = space.sample(5)
    x = torch.randn(1, 3, arch.resolution, arch.resolution)
    net.set_active(arch)
    rebuilt.eval().set_active(arch)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))
    assert space.arch_from_json(arch.to_json()) == arch
    assert space.arch_from_string(str(arch)) == arch


def test_per_layer_expand_choices_are_enforced(converted):
    name, _, net = converted
    d = net.space.max_arch().to_dict()
    stage = 3 if name == "large" else 1
    allowed = net.space.stages[stage].expand_choices(1)
    too_wide = max(net.space.stages[stage].expands)  # another layer's ratio, not this one's
    assert too_wide not in allowed
    d["stages"][stage]["expand"][1] = too_wide
    with pytest.raises(ValueError, match=rf"stages\[{stage}\]\.expand\[1\]=.* is not allowed"):
        net.space.arch_from_dict(d)


def test_num_classes_reheads(converted):
    _, model, net = converted
    reheaded = from_torchvision(model, num_classes=3)
    assert reheaded.classifier.weight.shape == (3, net.classifier.weight.shape[1])
    theirs = net.state_dict()
    for key, value in reheaded.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(value, theirs[key]), key


def test_options_shape_the_space():
    model = make_torchvision("small")
    space = torchvision_space(model, resolutions=(96, 128), expand_fractions=(1.0,), max_depth_drop=0)
    assert space.resolutions == (96, 128)
    assert all(len(s.depths) == 1 for s in space.stages)
    # 2 resolutions × kernel {3, 5} in each layer of the 5×5 stages (3 + 2 + 3 layers); nothing else elastic
    assert space.num_archs() == 2 * 2**3 * 2**2 * 2**3


def test_unsupported_models_are_rejected():
    from torchvision.models import resnet18

    with pytest.raises(TypeError, match=r"takes a torchvision MobileNetV3 .* or MobileNetV2 .*got ResNet"):
        from_torchvision(resnet18(weights=None))
    with pytest.raises(ValueError, match=r"dilated convolutions \(dilation \(2, 2\)\) are not supported"):
        from_torchvision(mobilenet_v3_small(weights=None, dilated=True))
    with pytest.raises(ValueError, match=r"expand_fractions must be a non-empty list of fractions in \(0, 1\]"):
        from_torchvision(mobilenet_v3_small(weights=None), expand_fractions=(0.5, 1.5))


@pytest.mark.parametrize("name, kwargs", [("large", {"width_mult": 0.75}), ("small", {"reduced_tail": True})])
def test_width_multiplier_and_reduced_tail_variants(name, kwargs):
    model = make_torchvision(name, seed=1, **kwargs)
    net = from_torchvision(model)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert rel_err(net(x), model(x)) <= RTOL
