"""Supernet.forward_many (nn/packed.py), the fused and the shared step (train/step.py) compute exactly what the
members' sequential passes compute: logits, loss terms, every parameter gradient, the BN running
statistics — float64 to 1e-10, float32 to 1e-5 — for members that differ in resolution, depth,
kernels (with kernel transforms), expand ratios and widths, in train and eval mode."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch

import tofa_fast
from tofa_fast.nn import ElasticBatchNorm2d
from tofa_fast.train import TrainConfig
from tofa_fast.train.member_graphs import EagerRecorder
from tofa_fast.train.step import (
    ComputeFormat,
    GraphedStep,
    LossSettings,
    StepBatch,
    choose_step_backend,
    train_step,
)
from tofa_fast.train.strategies import build_strategy

DIGITS = tofa_fast.spaces.get("digits")


def _variant_space() -> tofa_fast.spaces.SearchSpace:
    """digits with every option the packed path must honour flipped: elastic stem width, TensorFlow
    padding, no feature-mix conv, no kernel transforms, cumulative BN averages, relu6/swish stages."""
    stages = list(DIGITS.stages)
    stages[1] = dataclasses.replace(stages[1], act="relu6")
    stages[3] = dataclasses.replace(stages[3], act="swish")
    return dataclasses.replace(
        DIGITS,
        name="digits_variant",
        stem=dataclasses.replace(DIGITS.stem, widths=(8, 16), stride=2),
        stages=tuple(stages),
        head=dataclasses.replace(DIGITS.head, widths=(64, 96), feature_mix=False),
        padding="tf_same",
        kernel_transform=False,
        bn_momentum=None,
    )


def _randomised(net: tofa_fast.Supernet, seed: int) -> tofa_fast.Supernet:
    """Non-trivial BN affine parameters, running statistics and kernel transforms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "transform" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for m in net.modules():
            if isinstance(m, ElasticBatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return net


def _members(space, seed: int, resolution: int | None = None):
    """a_max, a_min and two random members, the random ones at other resolutions than a_max's (all
    at ``resolution`` when given)."""
    rng = random.Random(seed)
    sampled = [space.sample(rng) for _ in range(2)]
    low = sorted(space.resolutions)[: len(space.resolutions) - 1] or space.resolutions
    sampled = [dataclasses.replace(a, resolution=rng.choice(low)) for a in sampled]
    members = [space.max_arch(), space.min_arch(), *sampled]
    return members if resolution is None else [dataclasses.replace(a, resolution=resolution) for a in members]


def rel_err(got: torch.Tensor, expected: torch.Tensor, scale: float | None = None) -> float:
    """‖got − expected‖ / ‖expected‖; with ``scale``, relative to max(‖expected‖, scale): gradients
    that are mathematically zero (a bias followed by a training-mode batch norm) are rounding noise."""
    denom = max(expected.norm().item(), scale or 0.0, 1e-300)
    return (got - expected).norm().item() / denom


def compare_networks(a: torch.nn.Module, b: torch.nn.Module, tol: float) -> None:
    """Every gradient and every buffer. A gradient's error is relative to its norm, or to 1e-2 of
    the largest gradient norm when it is smaller: the project-BN biases' gradients are zero in exact
    arithmetic (a training-mode BN follows), and what is left is rounding noise of that scale."""
    grads_a = {n: p.grad for n, p in a.named_parameters()}
    grads_b = {n: p.grad for n, p in b.named_parameters()}
    assert grads_a.keys() == grads_b.keys()
    scale = 1e-2 * max(g.norm().item() for g in grads_a.values() if g is not None)
    for name, g in grads_a.items():
        assert (g is None) == (grads_b[name] is None) or (g if g is not None else grads_b[name]).abs().max() == 0, name
        if g is not None and grads_b[name] is not None:
            assert rel_err(grads_b[name], g, scale) <= tol, f"grad of {name}: {rel_err(grads_b[name], g, scale):.2e}"
    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers()):
        if x.is_floating_point():
            assert rel_err(y, x) <= tol, f"buffer {name}: {rel_err(y, x):.2e}"
        else:
            assert torch.equal(x, y), f"buffer {name}: {x} != {y}"


def _run_both(space, dtype, training: bool, batch_sizes=(3, 2, 5, 1), seed: int = 0, resolution: int | None = None):
    torch.manual_seed(seed)
    sequential = _randomised(tofa_fast.Supernet(space, 7).to(dtype), seed).train(training)
    sequential.set_regularization(dropout=0.0)
    packed = copy.deepcopy(sequential)
    archs = _members(space, seed, resolution)
    images = [torch.randn(n, 3, a.resolution, a.resolution, dtype=dtype) for n, a in zip(batch_sizes, archs)]
    weights = [torch.randn(n, 7, dtype=dtype) for n in batch_sizes]  # a different loss per member

    expected = []
    for arch, x in zip(archs, images):
        sequential.set_active(arch)
        expected.append(sequential(x))
    sum((w * y).sum() for w, y in zip(weights, expected)).backward()
    before = packed.active_arch
    got = packed.forward_many(images, archs)
    sum((w * y).sum() for w, y in zip(weights, got)).backward()
    assert packed.active_arch == before
    return sequential, packed, expected, got


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("space", [DIGITS, _variant_space()], ids=["digits", "variant"])
def test_forward_many_equals_the_sequential_passes_in_float64(space, training):
    sequential, packed, expected, got = _run_both(space, torch.float64, training)
    assert [y.shape for y in got] == [y.shape for y in expected]
    for y, e in zip(got, expected):
        assert rel_err(y, e) <= 1e-10
    compare_networks(sequential, packed, 1e-10)


def test_forward_many_on_the_ofa_preset_in_float64():
    """MobileNetV3's five stages, SE, hswish and 7→5→3 kernel transforms, at 128 px to stay cheap."""
    space = tofa_fast.spaces.get("ofa_mbv3")
    sequential, packed, expected, got = _run_both(space, torch.float64, True, (1, 2, 1, 1), resolution=128)
    for y, e in zip(got, expected):
        assert rel_err(y, e) <= 1e-10
    compare_networks(sequential, packed, 1e-10)


def test_a_deep_narrow_member_beside_a_shallow_wide_one():
    """The blocks past the shallow member's depth serve only the narrow one: its residual output
    is added to rows as wide as the widest member's."""
    deep_narrow = DIGITS.max_arch().to_dict()
    shallow_wide = DIGITS.max_arch().to_dict()
    for stage in deep_narrow["stages"]:
        stage["width"] = min(DIGITS.stages[deep_narrow["stages"].index(stage)].widths)
    for stage in shallow_wide["stages"]:
        stage.update(depth=1, kernel=stage["kernel"][:1], expand=stage["expand"][:1])
    archs = [DIGITS.check(shallow_wide), DIGITS.check(deep_narrow)]
    torch.manual_seed(0)
    sequential = _randomised(tofa_fast.Supernet(DIGITS, 7).double(), 0).train()
    sequential.set_regularization(dropout=0.0)
    packed = copy.deepcopy(sequential)
    images = [torch.randn(2, 3, 32, 32, dtype=torch.float64) for _ in archs]
    expected = []
    for arch, x in zip(archs, images):
        sequential.set_active(arch)
        expected.append(sequential(x))
    sum(y.square().sum() for y in expected).backward()
    got = packed.forward_many(images, archs)
    sum(y.square().sum() for y in got).backward()
    for y, e in zip(got, expected):
        assert rel_err(y, e) <= 1e-10
    compare_networks(sequential, packed, 1e-10)


def test_forward_many_under_bf16_autocast_with_channels_last():
    """The GPU path's numerics and layout on the CPU: packed rows in bf16, fp32 master weights."""
    torch.manual_seed(0)
    net = _randomised(tofa_fast.Supernet(DIGITS, 7), 0).train().to(memory_format=torch.channels_last)
    net.set_regularization(dropout=0.0)
    archs = _members(DIGITS, 2)
    images = [torch.randn(4, 3, a.resolution, a.resolution).to(memory_format=torch.channels_last) for a in archs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = []
        for arch, x in zip(archs, images):
            net.set_active(arch)
            expected.append(net(x))
        got = net.forward_many(images, archs)
    assert all(y.dtype == torch.bfloat16 for y in got)
    sum(y.float().square().sum() for y in got).backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in net.parameters())
    for y, e in zip(got, expected):
        assert rel_err(y.float(), e.float()) <= 5e-2


def test_forward_many_rejects_bad_calls():
    net = tofa_fast.Supernet(DIGITS, 10)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="same length"):
        net.forward_many([x, x], [DIGITS.max_arch()])
    with pytest.raises(ValueError, match="at least one member"):
        net.forward_many([], [])
    with pytest.raises(ValueError, match=r"shape \(N, 3, H, W\)"):
        net.forward_many([torch.randn(2, 1, 32, 32)], [DIGITS.max_arch()])
    with pytest.raises(ValueError, match="not allowed"):
        net.forward_many([x], [{**DIGITS.max_arch().to_dict(), "resolution": 31}])


# ------------------------------------------------------------------------------------------------
# The whole step: every strategy, sequential vs fused and vs shared (nn/shared_prefix.py)
# ------------------------------------------------------------------------------------------------


def _step_both(strategy_name: str, dtype: torch.dtype, seed: int = 0, mode: str = "fused"):
    config = TrainConfig(strategy=strategy_name, epochs=12).resolved()
    strategy = build_strategy(strategy_name, DIGITS, 12, 4, config)
    torch.manual_seed(seed)
    sequential = _randomised(tofa_fast.Supernet(DIGITS, 10).to(dtype), seed).train()
    sequential.set_regularization(dropout=0.0, drop_connect=0.0)
    rng = random.Random(seed)
    epoch = strategy.phases[2].start if strategy_name == "ps" else 0  # ps: a phase with its teacher
    optimizer = torch.optim.SGD(sequential.parameters(), lr=0.1)
    strategy.on_epoch_start(epoch, rng, sequential, optimizer)
    plan = strategy.plan(rng)
    fused = copy.deepcopy(sequential)
    g = torch.Generator().manual_seed(seed)
    x, u_weak, u_strong = (torch.randn(4, 3, 32, 32, generator=g, dtype=dtype) for _ in range(3))
    batch = StepBatch(x, torch.randint(0, 10, (4,), generator=g), u_weak, u_strong)
    settings = LossSettings(label_smoothing=0.1, threshold=0.3)  # low: some pseudo-labels pass
    fmt = ComputeFormat("fp32", False)
    teacher = strategy.teacher()
    if teacher is not None:
        teacher.to(dtype)  # extracted subnets are built in the default dtype
    results = []
    for net, name in ((sequential, "sequential"), (fused, mode)):
        if name == "graphed":  # on the CPU: its recordings re-executed (tests/test_member_graphs.py)
            backend = GraphedStep(recorder=EagerRecorder())
        else:
            backend = choose_step_backend(name, net, torch.device("cpu"))
        if mode == "graphed":
            # A step first, in both networks: the random members' layers are recorded when met a
            # second time, so the compared step replays every recording.
            train_step(net, plan, batch, settings, fmt, backend, teacher)
            net.zero_grad(set_to_none=True)
        results.append(train_step(net, plan, batch, settings, fmt, backend, teacher))
    return plan, sequential, fused, *results


@pytest.mark.parametrize("mode", ["fused", "shared", "graphed"])
@pytest.mark.parametrize("strategy", ["tofa", "ps", "single", "rss"])
def test_the_fused_step_trains_exactly_as_the_sequential_one(strategy, mode):
    # seeds whose plans have members with the same images (what the shared step computes once)
    seed = {"tofa": 1, "ps": 2}.get(strategy, 0) if mode == "shared" else 0
    plan, sequential, fused, expected, got = _step_both(strategy, torch.float64, seed=seed, mode=mode)
    roles = [(m.arch.resolution, m.fm, m.kd) for m in plan.members]
    assert mode != "shared" or len(roles) == 1 or len(set(roles)) < len(roles)
    assert strategy not in ("tofa", "ps") or len(plan.members) > 1
    assert got.keys() == expected.keys() and "sup" in got
    for name in expected:
        assert rel_err(got[name], expected[name], 1e-12) <= 1e-10, name
    compare_networks(sequential, fused, 1e-10)


@pytest.mark.parametrize("mode", ["fused", "shared", "graphed"])
def test_the_fused_tofa_step_in_float32(mode):
    _, sequential, fused, expected, got = _step_both("tofa", torch.float32, seed=1, mode=mode)
    # The KD term is a KL divergence: a small difference of O(1) cross-entropies (log 10 here), so
    # its float32 rounding is relative to that scale, not to its own small value.
    for name in expected:
        assert rel_err(got[name], expected[name], 1.0) <= 1e-5, name
    compare_networks(sequential, fused, 1e-5)
