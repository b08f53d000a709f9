"""Elastic supernet: extraction equivalence, export, training pass, channel sorting, BN recalibration."""

from __future__ import annotations

import random

import pytest
import torch

import tofa_fast
from tofa_fast.nn import ElasticBatchNorm2d, ElasticDepthwiseConv2d, Supernet

PRESETS = tofa_fast.spaces.names()
NUM_CLASSES = 10
# Random subnets per preset in the extraction test, scaled to what one costs (extract + forward):
# ~0.06 s on digits, ~0.25 s on rss, ~0.4 s on ofa_mbv3, ~0.8 s on tofa at 272–320 px. Every preset
# runs the same elastic code; the cheap ones draw it most often.
RANDOM_ARCHS = {"digits": 50, "rss": 20, "ofa_mbv3": 12, "tofa": 8}
# ONNX translation works op by op and takes 10–25 s a network: digits (the default run's space) and
# ofa_mbv3 (every MobileNetV3 block type: ReLU / h-swish, with and without SE) cover the op set of
# all four presets (rss is ofa_mbv3 at w1.0; tofa has the same block types). torch.export runs on all.
ONNX_PRESETS = ("digits", "ofa_mbv3")


def randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BN non-identity statistics and affine terms, and every kernel transform a
    non-identity matrix, so that equivalence tests can see slicing mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (ElasticBatchNorm2d, torch.nn.BatchNorm2d)):
                n = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            if isinstance(m, ElasticDepthwiseConv2d):
                for name in m.transform_names.values():
                    t = getattr(m, name)
                    t.copy_(torch.eye(t.shape[0]) + 0.1 * torch.randn(t.shape, generator=g))
        if hasattr(net, "classifier"):
            net.classifier.weight.normal_(0, 0.5, generator=g)
    return net


@pytest.fixture(scope="module", params=PRESETS)
def supernet(request) -> Supernet:
    return randomize(Supernet(request.param, NUM_CLASSES)).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def test_extract_equals_supernet_on_max_min_and_random_archs(supernet):
    space = supernet.space
    rng = random.Random(0)
    archs = [space.max_arch(), space.min_arch()] + [space.sample(rng) for _ in range(RANDOM_ARCHS[space.name])]
    for arch in archs:
        x = torch.randn(2, 3, arch.resolution, arch.resolution)
        supernet.set_active(arch)
        expected = supernet(x)
        sub = supernet.extract(arch).eval()
        assert sub.arch == str(arch)
        got = sub(x)
        assert expected.abs().max() > 1e-3, "outputs too small to compare meaningfully"
        assert rel_err(got, expected) <= 1e-5, str(arch)
        assert not any(isinstance(m, (ElasticBatchNorm2d, ElasticDepthwiseConv2d)) for m in sub.modules())


def test_extracted_weights_do_not_alias_the_supernet(supernet):
    sub = supernet.extract(supernet.space.max_arch())
    sub_ptrs = {p.data_ptr() for p in sub.parameters()}
    assert not sub_ptrs & {p.data_ptr() for p in supernet.parameters()}


def test_extracted_subnets_export_to_onnx_and_torch_export(supernet, tmp_path):
    """The max arch holds every block type of its space (a smaller arch only has smaller or fewer of
    the same static layers), so it alone is exported: each export costs seconds. ONNX on
    :data:`ONNX_PRESETS` only."""
    import onnxruntime as ort

    space = supernet.space
    for arch in (space.max_arch(),):
        sub = supernet.extract(arch).eval()
        x = torch.randn(1, 3, arch.resolution, arch.resolution)
        expected = sub(x)
        program = torch.export.export(sub, (x,))
        assert rel_err(program.module()(x), expected) <= 1e-5
        if space.name not in ONNX_PRESETS:
            continue
        path = tmp_path / f"{space.name}.onnx"
        torch.onnx.export(sub, (x,), str(path), input_names=["image"], output_names=["logits"])
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert rel_err(torch.from_numpy(got), expected) <= 1e-4


def test_train_mode_forward_backward_at_extreme_resolutions(supernet):
    space = supernet.space
    supernet.train()
    try:
        for arch in (space.max_arch(), space.min_arch()):
            for resolution in (min(space.resolutions), max(space.resolutions)):
                arch = space.arch_from_dict({**arch.to_dict(), "resolution": resolution})
                supernet.set_active(arch)
                supernet.zero_grad(set_to_none=True)
                out = supernet(torch.randn(2, 3, resolution, resolution))
                assert out.shape == (2, NUM_CLASSES)
                out.square().mean().backward()
                grads = [p.grad for p in supernet.parameters() if p.grad is not None]
                assert grads and all(torch.isfinite(g).all() for g in grads)
                assert supernet.stem_conv.weight.grad.abs().sum() > 0
                # layers beyond the active depth take no part
                for layers, stage_arch in zip(supernet.stages, arch.stages):
                    for layer in layers[stage_arch.depth :]:
                        assert all(p.grad is None for p in layer.parameters())
    finally:
        supernet.eval()


def test_depthwise_transforms_receive_gradients():
    net = Supernet("digits", NUM_CLASSES).train()
    space = net.space
    arch = space.arch_from_dict({**space.min_arch().to_dict()})  # kernel 3 everywhere: both matrices used
    net.set_active(arch)
    net(torch.randn(2, 3, arch.resolution, arch.resolution)).sum().backward()
    layer = net.stages[1][0]
    assert layer.dw_conv.transform_5to3.grad is not None and layer.dw_conv.transform_5to3.grad.abs().sum() > 0


@pytest.mark.parametrize("preset", ["ofa_mbv3", "tofa", "digits"])
@pytest.mark.parametrize("expand_stage", [0, 1])
def test_channel_sorting_keeps_maxnet_output(preset, expand_stage):
    net = randomize(Supernet(preset, NUM_CLASSES), seed=3).eval()
    arch = net.space.max_arch()
    net.set_active(arch)
    x = torch.randn(2, 3, arch.resolution, arch.resolution)
    before = net(x)
    net.sort_channels(expand_stage)
    assert rel_err(net(x), before) <= 1e-5
    if expand_stage == 0:
        for layers in net.stages:
            for layer in layers:
                if layer.expand_conv is not None:
                    importance = layer.project_conv.weight.abs().sum(dim=(0, 2, 3))
                    # sums recomputed over a permuted layout may differ in the last bits
                    assert torch.all(importance[:-1] >= importance[1:] - 1e-6 * importance.max())


def test_channel_sorting_matches_ofa_re_organize():
    """Same permutation as OFA's DynamicMBConvLayer.re_organize_middle_weights on the same weights."""
    from ofa.imagenet_classification.elastic_nn.modules.dynamic_layers import DynamicMBConvLayer

    space = tofa_fast.spaces.get("ofa_mbv3")
    net = randomize(Supernet(space, NUM_CLASSES), seed=5)
    layer = net.stages[3][1]  # SE stage, stride 1
    ofa = DynamicMBConvLayer(
        [layer.max_in], [layer.max_out], [3, 5, 7], [3, 4, 6], stride=1, act_func="h_swish", use_se=False
    )
    with torch.no_grad():
        ofa.point_linear.conv.conv.weight.copy_(layer.project_conv.weight)
        ofa.depth_conv.conv.conv.weight.copy_(layer.dw_conv.weight)
        ofa.inverted_bottleneck.conv.conv.weight.copy_(layer.expand_conv.weight)
    for stage in (0, 1):
        ofa.re_organize_middle_weights(expand_ratio_stage=stage)
        layer.sort_middle_channels(stage)
        assert torch.equal(ofa.point_linear.conv.conv.weight, layer.project_conv.weight)
        assert torch.equal(ofa.depth_conv.conv.conv.weight, layer.dw_conv.weight)
        assert torch.equal(ofa.inverted_bottleneck.conv.conv.weight, layer.expand_conv.weight)


# -- BN recalibration ---------------------------------------------------------------------------


def _subnet(preset: str = "digits"):
    net = randomize(Supernet(preset, NUM_CLASSES), seed=1)
    arch = net.space.sample(4)
    return net, arch, net.extract(arch)


def test_recalibrate_bn_gives_exact_population_statistics():
    _, arch, sub = _subnet()
    data = torch.randn(8, 3, arch.resolution, arch.resolution) * 2 + 0.5
    seen = tofa_fast.recalibrate_bn(sub, [data[:3], (data[3:], torch.zeros(5))])
    assert seen == 8
    with torch.no_grad():
        stem_out = sub.stem[0](data)
    bn = sub.stem[1]
    torch.testing.assert_close(bn.running_mean, stem_out.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, stem_out.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1 and sub.training  # settings and mode restored


def test_recalibrate_bn_sums_in_float64_bit_for_bit():
    """The statistics are the float64 sums of the BN's input over all batches, to the last bit: the
    stem's BN (its input does not depend on earlier BNs) against the sums computed here."""
    _, arch, sub = _subnet()
    data = torch.randn(10, 3, arch.resolution, arch.resolution) * 3 + 1
    batches = data.split(4)
    tofa_fast.recalibrate_bn(sub, batches)
    with torch.no_grad():
        outs = [sub.stem[0](b) for b in batches]
    s = sum(o.sum((0, 2, 3), dtype=torch.float64) for o in outs)
    sq = sum((o.double() ** 2).sum((0, 2, 3)) for o in outs)
    count = sum(o.numel() // o.shape[1] for o in outs)
    mean = s / count
    var = (sq / count - mean**2).clamp_min(0)
    bn = sub.stem[1]
    assert torch.equal(bn.running_mean, mean.float())
    assert torch.equal(bn.running_var, var.float())


def test_recalibrate_bn_restores_eval_mode():
    _, arch, sub = _subnet()
    sub.eval()
    tofa_fast.recalibrate_bn(sub, [torch.randn(2, 3, arch.resolution, arch.resolution)])
    assert not any(m.training for m in sub.modules())


def test_recalibrate_bn_first_layer_is_batching_invariant():
    net, arch, sub = _subnet()
    data = torch.randn(12, 3, arch.resolution, arch.resolution)
    other = net.extract(arch)
    tofa_fast.recalibrate_bn(sub, [data])
    tofa_fast.recalibrate_bn(other, data.split(5))
    torch.testing.assert_close(sub.stem[1].running_mean, other.stem[1].running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sub.stem[1].running_var, other.stem[1].running_var, rtol=1e-5, atol=1e-6)


def test_recalibrate_bn_on_supernet_equals_on_extracted_subnet():
    net, arch, sub = _subnet()
    data = torch.randn(12, 3, arch.resolution, arch.resolution)
    tofa_fast.recalibrate_bn(sub, data.split(4))
    net.set_active(arch)
    tofa_fast.recalibrate_bn(net, data.split(4))
    recalibrated = net.extract(arch)
    bns = [m for m in sub.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) > 5
    for a, b in zip(bns, [m for m in recalibrated.modules() if isinstance(m, torch.nn.BatchNorm2d)]):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-4, atol=1e-5)
    x = torch.randn(2, 3, arch.resolution, arch.resolution)
    assert rel_err(net.eval()(x), sub.eval()(x)) <= 1e-4


def test_recalibrate_bn_rejects_empty_and_malformed_batches():
    _, _, sub = _subnet()
    with pytest.raises(ValueError, match="batches is empty"):
        tofa_fast.recalibrate_bn(sub, [])
    with pytest.raises(ValueError, match="image tensors"):
        tofa_fast.recalibrate_bn(sub, [torch.randn(3, 8)])


# -- bad input ----------------------------------------------------------------------------------


def test_bad_supernet_arguments():
    with pytest.raises(ValueError, match="unknown search space"):
        Supernet("nope")
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        Supernet("digits", 0)
    with pytest.raises(TypeError, match="space must be a SearchSpace"):
        Supernet(3)
    net = Supernet("digits", NUM_CLASSES)
    with pytest.raises(ValueError, match=r"stages\[1\].width=99 is not allowed"):
        d = net.space.max_arch().to_dict()
        d["stages"][1]["width"] = 99
        net.set_active(d)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3, H, W\)"):
        net(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="resolution"):
        net.extract({**net.space.max_arch().to_dict(), "resolution": 31})


def test_drop_connect_is_ofas_residual_rule():
    """A residual layer in training with drop-connect rate p returns x + branch · mask / (1 − p), one
    Bernoulli(1 − p) draw per sample (OFA's ``drop_connect``): dropped samples come out as x itself,
    kept ones with the branch rescaled; eval mode and p = 0 add the branch as it is."""
    import copy

    net = Supernet("digits", NUM_CLASSES).train()
    layer = next(m for m in net.modules() if isinstance(m, tofa_fast.nn.mbconv.ElasticMBConv) and m.residual)
    plain = copy.deepcopy(layer)  # same weights and statistics: the branch without drop-connect
    layer.drop_connect_rate, keep = 0.3, 0.7
    x = torch.randn(64, layer.max_in, 6, 6).double()
    layer.double(), plain.double()
    torch.manual_seed(0)
    out = layer(x)
    torch.manual_seed(0)
    mask = torch.empty(64, dtype=torch.float64).bernoulli_(keep)
    branch = plain(x) - x
    assert 0 < mask.sum() < 64  # both kinds of sample occur
    assert torch.equal(out[mask == 0], x[mask == 0])
    torch.testing.assert_close(out, x + branch / keep * mask.view(-1, 1, 1, 1), rtol=1e-12, atol=1e-12)
    layer.eval(), plain.eval()
    torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=0)


def test_drop_connect_rescales_bfloat16_in_float_math():
    """The rescaled residual sum is rounded once to bfloat16, from float math: 1 / keep is not
    rounded to bfloat16 first, nor the product before the sum."""
    from tofa_fast.nn.mbconv import drop_connect_add

    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(64, 16, 5, 5, generator=g).bfloat16() for _ in range(2))
    mask = torch.empty(64).bernoulli_(0.7, generator=g).bfloat16().view(-1, 1, 1, 1)
    expected = (x.float() + y.float() * mask.float() / 0.7).bfloat16()
    assert torch.equal(drop_connect_add(x, y, mask, 0.3), expected)
