"""ElasticBatchNorm2d + activation fused into one packed_batch_norm_act call on channels-last input.

The oracle is the unfused path the module takes on NCHW input (``F.batch_norm`` + the activation
module), run on the same values: outputs, the gradients of x, weight and bias, the running statistics
and ``num_batches_tracked`` must agree — training and eval, momentum and cumulative averages, the
pseudo-label pass (no running update), every activation, an odd channel prefix and odd sizes. Then
the same at the scale of a whole supernet step (float64, every parameter gradient) and through the
module hooks that BN recalibration relies on.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES, tolerance

import tofa_fast
from tofa_fast.nn import ElasticBatchNorm2d, Supernet, elastic_batchnorm
from tofa_fast.nn.activations import build_activation
from tofa_fast.ops import packed_batch_norm as op_module

needs_cpp = pytest.mark.skipif(
    bool(op_module.CPP.not_supported_reasons(op_module.PackedBatchNormProblem("cpu", torch.float32, torch.float32))),
    reason="the C++ extension with the packed_batch_norm_act kernels is not loaded",
)
pytestmark = needs_cpp


@pytest.fixture(autouse=True)
def _fuse_every_size(monkeypatch):
    """The module fuses only inputs of FUSED_MIN_ELEMENTS or more (where it pays); these tests use
    small, odd sizes and want the fused path on all of them."""
    monkeypatch.setattr(elastic_batchnorm, "FUSED_MIN_ELEMENTS", 0)


ACTIVATIONS = ("none", "relu", "relu6", "hswish", "swish")
MAX_FEATURES, ACTIVE = 24, 13  # an active prefix that is no whole SIMD vector


def make_bn(momentum: float | None, dtype: torch.dtype, seed: int = 0) -> ElasticBatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = ElasticBatchNorm2d(MAX_FEATURES, momentum=momentum).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(MAX_FEATURES, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(MAX_FEATURES, generator=g) * 0.3)
        bn.running_mean.copy_(torch.randn(MAX_FEATURES, generator=g) * 0.2)
        bn.running_var.copy_(torch.rand(MAX_FEATURES, generator=g) + 0.5)
        bn.num_batches_tracked.fill_(3)
    return bn


def assert_normwise(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """max|actual − expected| ≤ rtol · max|expected| (the gradients of weight and bias are sums over
    every pixel, taken in another order by each path: an element near zero has no relative precision)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    error = (actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)
    assert error <= TOLERANCES[dtype][0], f"{what}: norm-wise relative error {error:.3g}"


def spy_on_fused_op(monkeypatch) -> list:
    """A list that gets an entry at every call of the fused op (which still runs)."""
    calls, real = [], op_module.packed_batch_norm_act

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(op_module, "packed_batch_norm_act", spy)
    return calls


def run(bn: ElasticBatchNorm2d, x: torch.Tensor, activation: str, grad_y: torch.Tensor, calls: int = 2):
    """``calls`` forward + backward passes (the running statistics move twice); returns y, grads, state."""
    module = build_activation(activation)
    x = x.detach().requires_grad_()
    for _ in range(calls):
        y = bn(x, None if activation == "none" else module)
        y.backward(grad_y)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    return y.detach(), x.grad, bn.weight.grad, bn.bias.grad, state


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    "mode",
    ["train", "train-cumulative", "pseudo-label", "eval"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_equals_unfused(activation, mode, dtype, monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, ACTIVE, 5, 7, generator=g) * 1.7 + 0.4).to(dtype)
    grad_y = torch.randn(x.shape, generator=g).to(dtype)
    calls = spy_on_fused_op(monkeypatch)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        bn = make_bn(None if mode == "train-cumulative" else 0.1, dtype)
        bn.train(mode != "eval")
        bn.update_running_stats = mode != "pseudo-label"
        calls.clear()
        results.append(run(bn, x.contiguous(memory_format=layout), activation, grad_y.contiguous(memory_format=layout)))
        # NCHW takes F.batch_norm; channels-last takes the fused op (else this test compares a path with itself)
        assert len(calls) == (2 if layout == torch.channels_last else 0)
    (y0, gx0, gw0, gb0, s0), (y1, gx1, gw1, gb1, s1) = results
    assert y1.is_contiguous(memory_format=torch.channels_last) and gx1.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y1, y0, **tolerance(dtype))
    for what, a, b in (("grad x", gx1, gx0), ("grad weight", gw1, gw0), ("grad bias", gb1, gb0)):
        assert_normwise(a, b, dtype, what)
    assert gw1[ACTIVE:].abs().max() == 0 and gb1[ACTIVE:].abs().max() == 0
    for key in s0:
        torch.testing.assert_close(s1[key], s0[key], **tolerance(dtype), msg=lambda m, k=key: f"{k}: {m}")
    if mode == "pseudo-label":
        assert torch.equal(s1["running_mean"], make_bn(0.1, dtype).running_mean)
        assert int(s1["num_batches_tracked"]) == 3


def test_bfloat16_input_with_float32_parameters():
    """Mixed precision (autocast's bf16 activations, fp32 master weights): bf16 out, fp32 statistics."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, ACTIVE, 6, 6, generator=g).to(torch.bfloat16)
    grad_y = torch.randn(x.shape, generator=g).to(torch.bfloat16)
    y0, gx0, gw0, gb0, s0 = run(make_bn(0.1, torch.float32).train(), x, "hswish", grad_y)
    cl = torch.channels_last
    y1, gx1, gw1, gb1, s1 = run(
        make_bn(0.1, torch.float32).train(),
        x.contiguous(memory_format=cl),
        "hswish",
        grad_y.contiguous(memory_format=cl),
    )
    assert y1.dtype == gx1.dtype == torch.bfloat16 and gw1.dtype == s1["running_var"].dtype == torch.float32
    for a, b in ((y1, y0), (gx1, gx0)):
        torch.testing.assert_close(a, b, **tolerance(torch.bfloat16))
    # The unfused path rounds z to bfloat16 before the activation's derivative; the kernel keeps it in
    # float32: sums over all pixels then agree to bfloat16's resolution, norm-wise.
    for what in ("grad weight", "grad bias", "running_mean", "running_var"):
        a, b = {"grad weight": (gw1, gw0), "grad bias": (gb1, gb0)}.get(what) or (s1[what], s0[what])
        assert_normwise(a, b, torch.bfloat16, what)


def test_unserved_calls_keep_the_unfused_path(monkeypatch):
    """float16 (no compiled kernel), a pinned reference backend and one value per channel in training
    all take F.batch_norm: the latter with F.batch_norm's own error."""
    called = []
    monkeypatch.setattr(op_module, "packed_batch_norm_act", lambda *a, **k: called.append(1))
    cl = torch.channels_last
    bn = make_bn(0.1, torch.float16).eval()
    bn(torch.randn(2, ACTIVE, 3, 3, dtype=torch.float16).contiguous(memory_format=cl), torch.nn.ReLU())
    bn = make_bn(0.1, torch.float32).train()
    with op_module.use_backend("reference"):
        bn(torch.randn(2, ACTIVE, 3, 3).contiguous(memory_format=cl), torch.nn.ReLU())
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, ACTIVE, 1, 1).contiguous(memory_format=cl))
    assert not called


def test_the_size_rule_is_the_layers_not_the_members(monkeypatch):
    """Whether a call is large enough to fuse depends on the batch's pixels and the layer's widest
    channel count, not on the active width: the shared-prefix step computes a layer at its widest
    member's width where the sequential step computes each member at its own, and both must take
    the same path (their roundings differ; in bfloat16, visibly)."""
    calls = spy_on_fused_op(monkeypatch)
    cl = torch.channels_last
    bn = make_bn(0.1, torch.float32).train()
    pixels = 2 * 5 * 5
    monkeypatch.setattr(elastic_batchnorm, "FUSED_MIN_ELEMENTS", pixels * MAX_FEATURES)
    for width in (1, ACTIVE, MAX_FEATURES):  # every width of this layer at this size: fused
        bn(torch.randn(2, width, 5, 5).contiguous(memory_format=cl), torch.nn.ReLU())
    assert len(calls) == 3
    monkeypatch.setattr(elastic_batchnorm, "FUSED_MIN_ELEMENTS", pixels * MAX_FEATURES + 1)
    for width in (1, ACTIVE, MAX_FEATURES):  # one pixel fewer than the rule asks: none
        bn(torch.randn(2, width, 5, 5).contiguous(memory_format=cl), torch.nn.ReLU())
    assert len(calls) == 3


def _step(net: Supernet, images: dict, archs) -> tuple[torch.Tensor, dict]:
    net.zero_grad(set_to_none=True)
    loss = 0
    for arch in archs:
        net.set_active(arch)
        loss = loss + net(images[arch.resolution]).square().mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    return loss.detach(), {**grads, **{k: v.clone() for k, v in net.state_dict().items()}}


def test_supernet_step_channels_last_equals_nchw_in_float64(monkeypatch):
    """A sandwich of members through the whole digits supernet: every parameter gradient and every BN
    buffer of the channels-last (fused) pass equals the NCHW (unfused) pass to float64 rounding."""
    space = tofa_fast.spaces.get("digits")
    archs = [space.max_arch(), space.min_arch(), space.sample(1), space.sample(2)]
    g = torch.Generator().manual_seed(3)
    images = {r: torch.randn(5, 3, r, r, generator=g, dtype=torch.float64) for r in space.resolutions}
    batch_norms = sum(isinstance(m, ElasticBatchNorm2d) for m in Supernet(space, 10).modules())
    calls = spy_on_fused_op(monkeypatch)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        net = Supernet(space, 10).double().train()
        net.dropout.p = 0.0  # identical masks are not drawn: dropout off
        net = net.to(memory_format=layout)
        calls.clear()
        results.append(_step(net, {r: x.contiguous(memory_format=layout) for r, x in images.items()}, archs))
        # every BN of the channels-last members is fused (the max arch alone runs all of them)
        if layout == torch.channels_last:
            assert len(calls) >= batch_norms, f"{len(calls)} fused calls for {batch_norms} batch norms"
        else:
            assert not calls
    (loss0, state0), (loss1, state1) = results
    torch.testing.assert_close(loss1, loss0, **tolerance(torch.float64))
    assert state0.keys() == state1.keys()
    for key in state0:
        torch.testing.assert_close(
            state1[key], state0[key], **tolerance(torch.float64), msg=lambda m, k=key: f"{k}: {m}"
        )


def test_recalibrate_bn_sees_the_fused_batch_norms():
    """recalibrate_bn works by module hooks on every BN: they fire on the fused path too."""
    space = tofa_fast.spaces.get("digits")
    arch = space.sample(4)
    data = torch.randn(12, 3, arch.resolution, arch.resolution)
    nets = []
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        net = Supernet(space, 10).to(memory_format=layout)
        net.set_active(arch)
        tofa_fast.recalibrate_bn(net, data.contiguous(memory_format=layout).split(4))
        nets.append(net)
    for a, b in zip(*(list(n.modules()) for n in nets)):
        if isinstance(a, ElasticBatchNorm2d):
            torch.testing.assert_close(b.running_mean, a.running_mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(b.running_var, a.running_var, rtol=1e-4, atol=1e-5)
