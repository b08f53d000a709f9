"""The expansion batch norm + activation fused into the depthwise convolution (ops/bn_act_dwconv.py).

Oracle: the same computation unfused and independent of our kernels — ``F.batch_norm`` + the
activation + the pure-PyTorch reference depthwise convolution (``elastic_dwconv2d_reference``: slice,
transform chain, ``F.conv2d``). Outputs, the gradients of x, of both weights and of the transform
matrices, and the running statistics must agree in float64 and float32 — every prologue activation,
both strides, kernels with and without transforms, odd sizes (channels that fill no SIMD vector, odd
planes), training, eval and the pseudo-label pass. ``gradcheck`` checks the backward in float64 on its
own. Then the module seam: an MBConv layer and a whole supernet step give the same results fused and
unfused (up to the rounding of a fused multiply-add), and calls the fused kernels do not serve
say why and take the two ops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES

import tofa_fast
from tofa_fast.nn import bn_act_dwconv as module_seam
from tofa_fast.nn import elastic_batchnorm
from tofa_fast.nn.activations import build_activation
from tofa_fast.nn.elastic_batchnorm import ElasticBatchNorm2d
from tofa_fast.nn.elastic_dwconv import ElasticDepthwiseConv2d
from tofa_fast.ops import bn_act_dwconv as fused
from tofa_fast.ops import elastic_dwconv2d_reference
from tofa_fast.ops import elastic_dwconv_dispatch as dwconv_dispatch

pytestmark = pytest.mark.skipif(
    bool(tofa_fast.backends.extension_reasons(*fused.OPS)),
    reason="the C++ extension with the fused batch norm + depthwise kernels is not loaded",
)

ACTIVATIONS = fused.ACTIVATIONS
TORCH_ACTIVATION = {"none": lambda t: t, "relu": F.relu, "relu6": F.relu6, "hswish": F.hardswish}


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def make_case(dtype, channels=20, size=9, batch=3, max_kernel=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = channels_last(torch.randn(batch, channels, size, size, generator=g, dtype=dtype) * 1.5 + 0.3)
    bn_weight = (torch.rand(channels, generator=g, dtype=dtype) + 0.5).requires_grad_()
    bn_bias = (torch.randn(channels, generator=g, dtype=dtype) * 0.5).requires_grad_()
    running = (
        torch.randn(channels, generator=g, dtype=dtype) * 0.2,
        torch.rand(channels, generator=g, dtype=dtype) + 0.5,
    )
    dw_weight = (torch.randn(channels + 4, 1, max_kernel, max_kernel, generator=g, dtype=dtype) * 0.3).requires_grad_()
    transforms = {
        5: [torch.eye(25, dtype=dtype) + 0.05 * torch.randn(25, 25, generator=g, dtype=dtype)],
        3: [
            torch.eye(25, dtype=dtype) + 0.05 * torch.randn(25, 25, generator=g, dtype=dtype),
            torch.eye(9, dtype=dtype) + 0.05 * torch.randn(9, 9, generator=g, dtype=dtype),
        ],
    }
    for chain in transforms.values():
        for m in chain:
            m.requires_grad_()
    return x.requires_grad_(), bn_weight, bn_bias, running, dw_weight, transforms


def reference(x, bn_weight, bn_bias, running, training, factor, eps, activation, dw_weight, k, stride, chain):
    a = F.batch_norm(x, *running, bn_weight, bn_bias, training, factor, eps) if running else None
    if running is None:  # training without running statistics
        a = F.batch_norm(x, None, None, bn_weight, bn_bias, True, 0.0, eps)
    return elastic_dwconv2d_reference(TORCH_ACTIVATION[activation](a), dw_weight, k, stride, chain)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(("kernel", "stride"), [(7, 1), (5, 2), (3, 1), (3, 2)])
@pytest.mark.parametrize("mode", ["train", "eval", "pseudo-label"])
def test_matches_batch_norm_then_reference_dwconv(dtype, activation, kernel, stride, mode):
    x, bn_weight, bn_bias, running, dw_weight, transforms = make_case(dtype)
    chain = transforms.get(kernel, [])
    training, factor, eps = mode != "eval", 0.1, 1e-3
    ours_running = None if mode == "pseudo-label" else tuple(r.clone() for r in running)
    ref_running = None if mode == "pseudo-label" else tuple(r.clone() for r in running)
    inputs = (x, bn_weight, bn_bias, dw_weight, *chain)

    y = fused.bn_act_dwconv2d(
        x, bn_weight, bn_bias, *(ours_running or (None, None)), training, factor, eps, activation,
        dw_weight, kernel, stride, chain,
    )  # fmt: skip
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, grad_y)
    # The oracle runs in float64 on the same values: a float32 oracle would add its own rounding.
    wide = [t.detach().double().requires_grad_() for t in inputs]
    ref_running = ref_running and tuple(r.double() for r in ref_running)
    y_ref = reference(*wide[:3], ref_running, training, factor, eps, activation, wide[3], kernel, stride, wide[4:])
    grads_ref = torch.autograd.grad(y_ref, wide, grad_y.double())

    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_oracle(y, y_ref, "y")
    for name, got, want in zip(["x", "bn_weight", "bn_bias", "dw_weight", "transforms"], grads, grads_ref):
        assert_close_to_oracle(got, want, f"grad of {name}")
    if ours_running is not None:
        for got, want in zip(ours_running, ref_running):
            assert_close_to_oracle(got, want, "running statistics")


@pytest.mark.parametrize(("kernel", "stride"), [(5, 2), (3, 1)])
def test_memory_plans_change_no_value(kernel, stride):
    """The channels-last tile kernels prefetch (loads on planes of >= 256 pixels) and take several channel
    blocks per pass (csrc/ops/cpu/dwconv_tiles_impl.h; tests/elastic_dwconv_cases.large_plane_cases says
    when): 16 samples of 120 channels on 16×16 planes reach both. Every combination of the two switches
    gives the same bits — the prologue, the epilogue's sums and every gradient — and the fused op still
    matches the oracle there."""
    x, bn_weight, bn_bias, running, dw_weight, transforms = make_case(torch.float32, channels=120, size=16, batch=16)
    chain = transforms.get(kernel, [])
    inputs = (x, bn_weight, bn_bias, dw_weight, *chain)

    def run(prefetch: bool, multi_block: bool) -> list[torch.Tensor]:
        with dwconv_dispatch.cpu_memory_plan(prefetch, multi_block):
            y = fused.bn_act_dwconv2d(
                x, bn_weight, bn_bias, None, None, True, 0.1, 1e-3, "hswish", dw_weight, kernel, stride, chain
            )
            grad_y = torch.linspace(-1, 1, y.numel()).view_as(y).contiguous(memory_format=torch.channels_last)
            return [y, *torch.autograd.grad(y, inputs, grad_y)]

    plain = run(False, False)
    for switches in [(True, False), (False, True), (True, True)]:
        for got, want in zip(run(*switches), plain):
            assert torch.equal(got, want), switches
    wide = [t.detach().double().requires_grad_() for t in inputs]
    y_ref = reference(*wide[:3], None, True, 0.1, 1e-3, "hswish", wide[3], kernel, stride, wide[4:])
    assert_close_to_oracle(plain[0], y_ref, "y")


def assert_close_to_oracle(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """got (float32 or float64) against ``want`` in float64: the dtype's relative tolerance, and an
    absolute one of that times the tensor's largest magnitude (sums over the batch cancel), at least
    1e-3 of the dtype's absolute tolerance (a gradient that is zero up to rounding, such as a batch
    norm bias's ahead of another batch norm, is all cancellation)."""
    rtol, atol = TOLERANCES[got.dtype]
    scale = float(want.detach().abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(
        got.detach().double(), want, rtol=rtol, atol=max(rtol * scale, 1e-3 * atol), msg=lambda m: f"{name}: {m}"
    )


def test_gradcheck_float64():
    x, bn_weight, bn_bias, running, dw_weight, transforms = make_case(torch.float64, channels=5, size=6, batch=2)
    chain = transforms[5]

    def f(x, bn_weight, bn_bias, dw_weight, m):
        return fused.bn_act_dwconv2d(x, bn_weight, bn_bias, None, None, True, 0.0, 1e-3, "hswish", dw_weight, 5, 2, [m])

    assert torch.autograd.gradcheck(f, (x, bn_weight, bn_bias, dw_weight, chain[0]), eps=1e-6, atol=1e-7)


def make_layer(dtype, activation="relu", stride=2, max_channels=40):
    torch.manual_seed(0)
    bn = ElasticBatchNorm2d(max_channels).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.3)
    dw = ElasticDepthwiseConv2d(max_channels, (3, 5, 7), stride, transform=True).to(dtype)
    return bn, build_activation(activation), dw


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation", ["relu", "hswish"])
@pytest.mark.parametrize("training", [True, False])
def test_module_seam_fused_equals_unfused(monkeypatch, dtype, activation, training):
    monkeypatch.setattr(elastic_batchnorm, "FUSED_MIN_ELEMENTS", 0)
    results = []
    for fuse in (True, False):
        monkeypatch.setattr(module_seam, "FUSE_BN_ACT_INTO_DWCONV", fuse)
        bn, act, dw = make_layer(dtype, activation)
        bn.train(training)
        x = channels_last(torch.randn(4, 27, 11, 11, dtype=dtype, generator=torch.Generator().manual_seed(1)))
        x.requires_grad_()
        y = module_seam.bn_act_dwconv(bn, act, dw, x, 5)
        y.backward(torch.ones_like(y))
        results.append((y, x.grad, *(p.grad for p in (*bn.parameters(), *dw.parameters())), *bn.buffers()))
    for got, want in zip(*results):
        if want is None or not want.is_floating_point():
            assert torch.equal(got, want) if want is not None else got is None
        else:
            assert_close_to_oracle(got, want.double(), "a result")


def test_supernet_members_match_the_unfused_ones(monkeypatch):
    """A float32 forward + backward of two members: the same gradients and running statistics fused
    and unfused (the fused path is taken: counted)."""
    calls = []
    op = fused.bn_act_dwconv2d
    monkeypatch.setattr(fused, "bn_act_dwconv2d", lambda *a, **k: calls.append(1) or op(*a, **k))
    space = tofa_fast.spaces.get("digits")
    results = []
    for fuse in (True, False):
        monkeypatch.setattr(module_seam, "FUSE_BN_ACT_INTO_DWCONV", fuse)
        torch.manual_seed(0)
        net = tofa_fast.Supernet(space, 10).train().to(memory_format=torch.channels_last)
        net.set_regularization(dropout=0.0, drop_connect=0.0)
        x = channels_last(torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
        for arch in (space.max_arch(), space.min_arch()):
            net.set_active(arch)
            net(F.interpolate(x, size=arch.resolution, mode="bilinear")).square().mean().backward()
        results.append([p.grad for p in net.parameters()] + list(net.buffers()))
    assert calls, "the fused path was never taken"
    for got, want in zip(*results):
        assert (got is None) == (want is None)
        if got is not None and not got.is_floating_point():
            assert torch.equal(got, want)
        elif got is not None:
            assert_close_to_oracle(got, want.double(), "a result")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda c: {**c, "x": c["x"].to(torch.bfloat16)}, "float32/float64 CPU"),
        (lambda c: {**c, "activation": "swish"}, "has no prologue"),
        (lambda c: {**c, "activation": None}, "has no prologue"),
        (lambda c: {**c, "x": c["x"].contiguous()}, "channels-last"),
    ],
)
def test_refusals_name_their_reason(change, reason):
    x, bn_weight, _, _, dw_weight, _ = make_case(torch.float32)
    case = {"x": x.detach(), "activation": "relu"}
    case = change(case)
    refusal = fused.fusion_refusal(case["x"], bn_weight, case["activation"], dw_weight, 3, 1, [])
    assert refusal is not None and reason in refusal


def test_refused_when_a_backend_is_pinned_or_autocast_is_on():
    x, bn_weight, _, _, dw_weight, _ = make_case(torch.float32)
    assert fused.fusion_refusal(x.detach(), bn_weight, "relu", dw_weight, 3, 1, []) is None
    with dwconv_dispatch.use_backend("reference"):
        assert "C++ kernel" in fused.fusion_refusal(x.detach(), bn_weight, "relu", dw_weight, 3, 1, [])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "autocast" in fused.fusion_refusal(x.detach(), bn_weight, "relu", dw_weight, 3, 1, [])


def test_refused_calls_take_the_two_ops(monkeypatch):
    """swish has no prologue: the seam runs the batch norm module and the convolution."""
    monkeypatch.setattr(elastic_batchnorm, "FUSED_MIN_ELEMENTS", 0)
    monkeypatch.setattr(fused, "bn_act_dwconv2d", lambda *a, **k: pytest.fail("the fused op was called"))
    bn, act, dw = make_layer(torch.float32, "swish")
    x = channels_last(torch.randn(2, 16, 8, 8))
    torch.testing.assert_close(module_seam.bn_act_dwconv(bn, act, dw, x, 3), dw(bn(x, act), 3), rtol=0, atol=0)


def test_the_activated_tensor_is_not_kept_for_the_backward(monkeypatch):
    """What the fused layer saves for its backward: x and the parameters, not act(bn(x)) as well."""
    monkeypatch.setattr(elastic_batchnorm, "FUSED_MIN_ELEMENTS", 0)
    saved_storages = {}
    for fuse in (True, False):
        monkeypatch.setattr(module_seam, "FUSE_BN_ACT_INTO_DWCONV", fuse)
        bn, act, dw = make_layer(torch.float32)
        x = channels_last(torch.randn(8, 40, 16, 16)).requires_grad_()
        sizes = []

        def pack(t, sizes=sizes, x=x):
            if t.numel() >= x.numel():
                sizes.append(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module_seam.bn_act_dwconv(bn, act, dw, x, 5)
        saved_storages[fuse] = len(set(sizes))
    assert saved_storages[True] == 1 and saved_storages[False] == 2


def test_modules_with_hooks_are_called_as_modules(monkeypatch):
    """A forward hook on the batch norm (recalibrate_bn's kind) sees its input and output: the layer
    takes the two ops while the hook is registered, and the fused op again once it is removed."""
    monkeypatch.setattr(elastic_batchnorm, "FUSED_MIN_ELEMENTS", 0)
    calls = []
    op = fused.bn_act_dwconv2d
    monkeypatch.setattr(fused, "bn_act_dwconv2d", lambda *a, **k: calls.append(1) or op(*a, **k))
    bn, act, dw = make_layer(torch.float32)
    x = channels_last(torch.randn(2, 16, 8, 8))
    seen = []
    handle = bn.register_forward_hook(lambda m, inputs, output: seen.append(output.shape))
    module_seam.bn_act_dwconv(bn, act, dw, x, 3)
    assert seen == [x.shape] and not calls
    handle.remove()
    module_seam.bn_act_dwconv(bn, act, dw, x, 3)
    assert calls == [1]


def test_info_says_what_the_fusion_serves():
    from tofa_fast.info import info_text

    line = next(line for line in info_text().splitlines() if line.startswith("MBConv expansion batch norm"))
    assert "fused into the depthwise kernel's tile loads" in line and "hswish" in line
    assert "expansion before them" in line
