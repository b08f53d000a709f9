"""Supernet.backward_many (nn/shared_prefix.py): members with the same images compute what they agree
on once, and the result — logits, every parameter gradient, the BN running statistics and counts —
equals the members' sequential passes (float64 to 1e-10, float32 to 1e-5), for members that differ in
resolution, depth, kernels (with transforms), expand ratios and widths, sharing images or not."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F
from test_forward_many import DIGITS, _randomised, _variant_space, compare_networks, rel_err

import tofa_fast
from tofa_fast.nn import shared_prefix


def _members(space, seed: int, count: int = 6, resolutions=None):
    """a_max, a_min and random members; member i at ``resolutions[i % len]`` (default: the largest)."""
    rng = random.Random(seed)
    archs = [space.max_arch(), space.min_arch()] + [space.sample(rng) for _ in range(count - 2)]
    resolutions = resolutions or [max(space.resolutions)]
    return [dataclasses.replace(a, resolution=resolutions[i % len(resolutions)]) for i, a in enumerate(archs)]


def _images_for(archs, dtype, batch=3, channels_last=False):
    """One images tensor per resolution, shared by the members at that resolution."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    by_resolution = {
        r: torch.randn(batch, 3, r, r, dtype=dtype).to(memory_format=fmt) for r in {a.resolution for a in archs}
    }
    return [by_resolution[a.resolution] for a in archs]


def _run_both(space, archs, dtype, seed=0, images=None, classes=7):
    torch.manual_seed(seed)
    sequential = _randomised(tofa_fast.Supernet(space, classes).to(dtype), seed).train()
    sequential.set_regularization(dropout=0.0)
    shared = copy.deepcopy(sequential)
    images = images if images is not None else _images_for(archs, dtype)
    targets = [torch.randn(x.shape[0], classes, dtype=dtype) for x in images]  # a different loss per member

    def loss_of(i, logits):
        return (targets[i] * logits).sum() + logits.square().sum()

    expected = []
    for i, (arch, x) in enumerate(zip(archs, images)):
        sequential.set_active(arch)
        logits = sequential(x)
        loss_of(i, logits).backward()
        expected.append(logits.detach())
    before = shared.active_arch
    got = shared.backward_many(images, archs, loss_of)
    assert shared.active_arch == before
    assert [y.shape for y in got] == [y.shape for y in expected]
    return sequential, shared, expected, got


def _assert_same(sequential, shared, expected, got, tol):
    for y, e in zip(got, expected):
        assert rel_err(y, e) <= tol, rel_err(y, e)
    compare_networks(sequential, shared, tol)


def _nodes(net, images, archs):
    """(kind, members) of every computation in the members' tree."""
    out = []

    def walk(node):
        if node.kind != "input":
            out.append((node.kind, tuple(node.members)))
        for child in node.children:
            walk(child)

    for root in shared_prefix.build_tree(net, images, [net.space.check(a) for a in archs]):
        walk(root)
    return out


@pytest.mark.parametrize("space", [DIGITS, _variant_space()], ids=["digits", "variant"])
def test_backward_many_equals_the_sequential_passes_in_float64(space):
    resolutions = sorted(space.resolutions)[-2:]  # two members per images tensor at least
    archs = _members(space, 0, resolutions=resolutions)
    _assert_same(*_run_both(space, archs, torch.float64), 1e-10)


def test_backward_many_in_float32_channels_last():
    archs = _members(DIGITS, 1, count=5, resolutions=[32, 24])
    images = _images_for(archs, torch.float32, batch=4, channels_last=True)
    sequential, shared, expected, got = _run_both(DIGITS, archs, torch.float32, seed=1, images=images)
    _assert_same(sequential, shared, expected, got, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_an_expansion_and_its_only_depthwise_child_run_as_the_fused_op(monkeypatch, dtype):
    """Channels-last: where an expansion node has one (depthwise) child, the tree computes the two with
    the sequential pass's fused op (nn/bn_act_dwconv.py, expansion inside) — gradients and running
    statistics still the sequential passes'."""
    from tofa_fast.nn import elastic_batchnorm
    from tofa_fast.ops import bn_act_dwconv as fused

    monkeypatch.setattr(elastic_batchnorm, "FUSED_MIN_ELEMENTS", 0)  # the small test sizes take the kernels
    calls = []
    op = fused.bn_act_dwconv2d
    monkeypatch.setattr(fused, "bn_act_dwconv2d", lambda *a, **k: calls.append(a[-1] is not None) or op(*a, **k))
    archs = _members(DIGITS, 1, count=5, resolutions=[32, 24])
    images = _images_for(archs, dtype, batch=4, channels_last=True)
    tree = []
    original = shared_prefix._compute_expansion_and_depthwise
    monkeypatch.setattr(shared_prefix, "_compute_expansion_and_depthwise", lambda *a: tree.append(1) or original(*a))
    sequential, shared, expected, got = _run_both(DIGITS, archs, dtype, seed=1, images=images)
    assert tree and all(calls), "the tree did not take the fused op with the expansion inside"
    _assert_same(sequential, shared, expected, got, 1e-10 if dtype == torch.float64 else 1e-5)


def test_backward_many_on_the_ofa_preset_in_float64():
    """MobileNetV3's stages, SE, hswish, 7→5→3 transforms: four members on one batch (OFA's step)."""
    space = tofa_fast.spaces.get("ofa_mbv3")
    archs = _members(space, 2, count=4, resolutions=[128])
    _assert_same(*_run_both(space, archs, torch.float64, images=_images_for(archs, torch.float64, batch=2)), 1e-10)


def test_members_share_the_stem_and_the_widest_expansion():
    """Same images: one stem (and stage-0 layer) for all; the first expansion once, at the widest
    middle width, whatever their kernels; different images: nothing shared."""
    net = tofa_fast.Supernet(DIGITS, 10).train()
    big, small = DIGITS.max_arch(), DIGITS.min_arch()
    small = dataclasses.replace(small, resolution=big.resolution)
    x = torch.randn(2, 3, 32, 32)
    nodes = _nodes(net, [x, x], [big, small])
    assert nodes[:4] == [("stem", (0, 1)), ("dw", (0, 1)), ("tail", (0, 1)), ("expand", (0, 1))]
    assert nodes[4][1] != (0, 1)  # kernels 5 and 3 part at the next depthwise
    expansion = shared_prefix.build_tree(net, [x, x], [big, small])[0]
    while expansion.kind != "expand":
        expansion = expansion.children[0]
    assert expansion.widths == [64, 32] and expansion.width == 64
    assert all(len(members) == 1 for _, members in _nodes(net, [x, x.clone()], [big, small]))
    # identical members share everything but their heads
    assert [m for kind, m in _nodes(net, [x, x], [big, big]) if kind != "head"] == [(0, 1)] * (
        len(_nodes(net, [x], [big])) - 1
    )


def test_drop_connect_keeps_residual_tails_apart():
    net = tofa_fast.Supernet(DIGITS, 10).train()
    net.set_regularization(drop_connect=0.2)
    x = torch.randn(2, 3, 32, 32)
    arch = DIGITS.max_arch()
    nodes = list(_walk(shared_prefix.build_tree(net, [x, x], [arch, arch])[0]))[1:]
    first = next(i for i, node in enumerate(nodes) if node.kind == "tail" and node.residual is not None)
    assert all(len(node.members) == 2 for node in nodes[:first])  # up to the first random mask
    assert all(len(node.members) == 1 for node in nodes[first:])
    losses = net.backward_many([x, x], [arch, arch], lambda i, y: y.square().sum())
    assert all(torch.isfinite(y).all() for y in losses)


def _walk(node):
    yield node
    for child in node.children:
        yield from _walk(child)


def test_eval_mode_and_no_loss():
    """Eval mode reads the running statistics; a member whose loss is None back-propagates nothing."""
    net = _randomised(tofa_fast.Supernet(DIGITS, 10), 0).eval()
    archs = _members(DIGITS, 3, count=3)
    x = torch.randn(2, 3, 32, 32)
    got = net.backward_many([x] * 3, archs, lambda i, y: None)
    for arch, y in zip(archs, got):
        net.set_active(arch)
        with torch.no_grad():
            assert torch.allclose(net(x), y, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in net.parameters())


def test_backward_many_under_bf16_autocast_with_channels_last():
    """The GPU path's numerics and layout on the CPU: bf16 activations, fp32 master weights and grads."""
    torch.manual_seed(0)
    net = _randomised(tofa_fast.Supernet(DIGITS, 7), 0).train().to(memory_format=torch.channels_last)
    net.set_regularization(dropout=0.0)
    reference = copy.deepcopy(net)
    archs = _members(DIGITS, 2, count=4, resolutions=[32])
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    got = net.backward_many([x] * 4, archs, lambda i, y: y.float().square().mean(), autocast)
    assert all(y.dtype == torch.bfloat16 for y in got)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in net.parameters())
    for arch, y in zip(archs, got):
        reference.set_active(arch)
        with autocast():
            expected = reference(x)
        expected.float().square().mean().backward()
        assert rel_err(y.float(), expected.float()) <= 5e-2
    grads = [(a.grad, b.grad) for a, b in zip(net.parameters(), reference.parameters()) if b.grad is not None]
    assert sum(rel_err(a, b) for a, b in grads) / len(grads) <= 5e-2


def test_backward_many_rejects_bad_calls():
    net = tofa_fast.Supernet(DIGITS, 10)
    x = torch.randn(2, 3, 32, 32)
    loss = lambda i, y: F.cross_entropy(y, torch.zeros(2, dtype=torch.long))  # noqa: E731
    with pytest.raises(ValueError, match="same length"):
        net.backward_many([x, x], [DIGITS.max_arch()], loss)
    with pytest.raises(ValueError, match="at least one member"):
        net.backward_many([], [], loss)
    with pytest.raises(TypeError, match="loss_of must be a callable"):
        net.backward_many([x], [DIGITS.max_arch()], None)
    with pytest.raises(ValueError, match=r"shape \(N, 3, H, W\)"):
        net.backward_many([torch.randn(2, 1, 32, 32)], [DIGITS.max_arch()], loss)
    with pytest.raises(ValueError, match="not allowed"):
        net.backward_many([x], [{**DIGITS.max_arch().to_dict(), "resolution": 31}], loss)


def test_consecutive_groups():
    a, b, c = (torch.zeros(2, 3, 8, 8) for _ in range(3))
    assert shared_prefix.consecutive_groups([a, b, c, c]) == [[0], [1], [2, 3]]
    assert shared_prefix.consecutive_groups([a, a, b]) == [[0, 1], [2]]
    assert shared_prefix.consecutive_groups([a]) == [[0]]
    assert shared_prefix.consecutive_groups([a, b, a]) is None  # a's members are not next to each other
    # the same storage viewed with another shape is other images
    assert shared_prefix.consecutive_groups([a, a.view(2, 3, 4, 16)]) == [[0], [1]]


def test_the_shared_step_passes_members_that_share_nothing_sequentially(monkeypatch):
    """The default TOFA step one step in three: a_max and a_min on their own images, the two random
    members on the same ones. Only those two go through the tree (in member order, after the others);
    gradients and running statistics equal the sequential passes'."""
    from tofa_fast.train.step import choose_step_backend

    archs = _members(DIGITS, seed=3, count=4, resolutions=[32, 24, 28, 28])
    images = _images_for(archs, torch.float64)
    assert shared_prefix.consecutive_groups(images) == [[0], [1], [2, 3]]
    torch.manual_seed(0)
    sequential = _randomised(tofa_fast.Supernet(DIGITS, 7).to(torch.float64), 0).train()
    sequential.set_regularization(dropout=0.0)
    shared = copy.deepcopy(sequential)
    targets = [torch.randn(x.shape[0], 7, dtype=torch.float64) for x in images]

    def loss_of(i, logits):
        return (targets[i] * logits).sum() + logits.square().sum()

    for i, (arch, x) in enumerate(zip(archs, images)):
        sequential.set_active(arch)
        loss_of(i, sequential(x)).backward()
    trees = []
    original = type(shared).backward_many
    monkeypatch.setattr(
        type(shared), "backward_many", lambda net, *a, **k: trees.append(len(a[0])) or original(net, *a, **k)
    )
    backend = choose_step_backend("shared", shared, torch.device("cpu"))
    backend.backward_members(shared, archs, images, loss_of, contextlib.nullcontext)
    assert trees == [2]
    compare_networks(sequential, shared, 1e-10)
