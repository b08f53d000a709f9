"""An MBConv's expansion inside the fused batch norm + activation + depthwise op, and its backward's
one-pass kernel (``_bn_grad_pointwise_backward``, csrc/ops/cpu/pointwise_tiles.h).

Oracles, independent of our kernels: for the kernel, the batch norm's input-gradient formula and two
matrix products in float64 PyTorch; for the op, ``F.conv2d`` (the 1×1 expansion) + ``F.batch_norm`` +
the activation + the pure-PyTorch reference depthwise convolution. Odd sizes (channel counts that fill
no SIMD vector, a single row), float32 and float64, training and eval, a strided weight view (the
expansion weight is a prefix of the widest one), every ISA path of the kernel. Then the module seam: an
MBConv layer gives the same results with and without the expansion inside the op, and runs it as a
module when a hook asks for that.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES, run_under_cpu_isa
from test_bn_act_dwconv import TORCH_ACTIVATION, assert_close_to_oracle, channels_last, make_case

import tofa_fast
from tofa_fast.nn import bn_act_dwconv as module_seam
from tofa_fast.nn import elastic_batchnorm
from tofa_fast.nn.mbconv import ElasticMBConv
from tofa_fast.ops import bn_act_dwconv as fused
from tofa_fast.ops import elastic_dwconv2d_reference

pytestmark = pytest.mark.skipif(
    bool(tofa_fast.backends.extension_reasons(*fused.OPS)),
    reason="the C++ extension with the fused expansion kernels is not loaded",
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (rows, in channels C, expanded channels E): a single row, channel counts off every vector width,
# tiles with a partial last one, C over one register block of vectors (136 = 8.5 AVX-512 vectors)
SHAPES = [(1, 1, 1), (7, 3, 5), (333, 24, 72), (1000, 17, 33), (517, 40, 240), (130, 136, 816), (2049, 8, 8)]


def kernel_case(rows, c, e, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    grad_z = torch.randn(rows, e, generator=g, dtype=dtype)
    y = torch.randn(rows, e, generator=g, dtype=dtype) * 1.3 + 0.2
    x = torch.randn(rows, c, generator=g, dtype=dtype)
    weight = torch.randn(e + 3, c + 5, generator=g, dtype=dtype)[:e, :c]  # a strided prefix view
    bn_weight = torch.rand(e, generator=g, dtype=dtype) + 0.5
    mean = torch.randn(1, e, generator=g, dtype=dtype)
    rstd = torch.rand(1, e, generator=g, dtype=dtype) + 0.5
    sums = torch.randn(2, e, generator=g, dtype=torch.float64) * rows
    return grad_z, y, x, weight, bn_weight, mean, rstd, sums


def kernel_oracle(grad_z, y, x, weight, bn_weight, mean, rstd, sums, training):
    """dy = w·rstd·(dz − Σdz/P − ŷ·Σdz·ŷ/P) (w·rstd·dz in eval); dx = dy·W, dW = dyᵀ·x; float64."""
    grad_z, y, x, weight, bn_weight, mean, rstd = (t.double() for t in (grad_z, y, x, weight, bn_weight, mean, rstd))
    gain = bn_weight * rstd[0]
    if training:
        yhat = (y - mean) * rstd
        dy = gain * (grad_z - sums[0] / y.shape[0] - yhat * sums[1] / y.shape[0])
    else:
        dy = gain * grad_z
    return dy @ weight, dy.t() @ x


def check_kernel(dtype):
    op = torch.ops.tofa_fast._bn_grad_pointwise_backward
    for rows, c, e in SHAPES:
        for training in (True, False):
            case = kernel_case(rows, c, e, dtype, seed=rows + c + e)
            grad_x, grad_weight = op(*case, training, [True, True])
            want_x, want_weight = kernel_oracle(*case, training)
            assert grad_x.dtype == dtype and grad_weight.dtype == dtype
            assert_close_to_oracle(grad_x, want_x, f"grad_x {rows}x{c}x{e}")
            assert_close_to_oracle(grad_weight, want_weight, f"grad_weight {rows}x{c}x{e}")
            # Each output alone: the same values (the other pass is skipped, not the arithmetic changed).
            only_x, none_weight = op(*case, training, [True, False])
            none_x, only_weight = op(*case, training, [False, True])
            assert torch.equal(only_x, grad_x) and torch.equal(only_weight, grad_weight)
            assert none_weight is None and none_x is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_matches_the_formula_and_two_matrix_products(dtype):
    check_kernel(dtype)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_narrower_isa_paths(isa):
    """The AVX2 and baseline kernels (this machine would pick its widest) against the oracle."""
    script = (
        f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})\n"
        "import torch, tofa_fast._C\n"
        "from test_bn_grad_pointwise import check_kernel\n"
        "check_kernel(torch.float32); check_kernel(torch.float64)\n"
        "print(torch.ops.tofa_fast._elastic_dwconv2d_cpu_isa())\n"
    )
    run_under_cpu_isa(isa, script)


def test_kernel_names_bad_arguments():
    op = torch.ops.tofa_fast._bn_grad_pointwise_backward
    grad_z, y, x, weight, bn_weight, mean, rstd, sums = kernel_case(10, 4, 6, torch.float32)
    with pytest.raises(RuntimeError, match="y must have shape"):
        op(grad_z, y[:, :5], x, weight, bn_weight, mean, rstd, sums, True, [True, True])
    with pytest.raises(RuntimeError, match="dtype"):
        op(grad_z, y, x.double(), weight, bn_weight, mean, rstd, sums, True, [True, True])
    with pytest.raises(RuntimeError, match="sums must hold"):
        op(grad_z, y, x, weight, bn_weight, mean, rstd, sums[:1], True, [True, True])


def expansion_case(dtype, in_channels=11, seed=0):
    """make_case's batch norm and depthwise conv on the expansion of an (N, in_channels, 9, 9) map."""
    _, bn_weight, bn_bias, running, dw_weight, transforms = make_case(dtype, seed=seed)
    e = bn_weight.shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    x = channels_last(torch.randn(3, in_channels, 9, 9, generator=g, dtype=dtype)).requires_grad_()
    full = (torch.randn(e + 4, in_channels + 3, generator=g, dtype=dtype) * 0.4).requires_grad_()
    return x, full, bn_weight, bn_bias, running, dw_weight, transforms


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation", fused.ACTIVATIONS)
@pytest.mark.parametrize(("kernel", "stride"), [(7, 1), (3, 2)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_expansion_matches_conv_batch_norm_reference_dwconv(dtype, activation, kernel, stride, mode):
    x, full, bn_weight, bn_bias, running, dw_weight, transforms = expansion_case(dtype)
    e, c = bn_weight.shape[0], x.shape[1]
    chain = transforms.get(kernel, [])
    training, factor, eps = mode == "train", 0.1, 1e-3
    ours_running = tuple(r.clone() for r in running)
    inputs = (x, full, bn_weight, bn_bias, dw_weight, *chain)
    assert fused.fusion_refusal(x, bn_weight, activation, dw_weight, kernel, stride, chain, full[:e, :c]) is None

    out = fused.bn_act_dwconv2d(
        x, bn_weight, bn_bias, *ours_running, training, factor, eps, activation, dw_weight, kernel, stride, chain,
        full[:e, :c],
    )  # fmt: skip
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)

    wide = [t.detach().double().requires_grad_() for t in inputs]
    ref_running = tuple(r.double() for r in running)
    y = F.conv2d(wide[0], wide[1][:e, :c, None, None])
    a = TORCH_ACTIVATION[activation](F.batch_norm(y, *ref_running, wide[2], wide[3], training, factor, eps))
    out_ref = elastic_dwconv2d_reference(a, wide[4], kernel, stride, wide[5:])
    grads_ref = torch.autograd.grad(out_ref, wide, grad_out.double())

    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_oracle(out, out_ref, "out")
    for name, got, want in zip(["x", "expansion", "bn_weight", "bn_bias", "dw_weight", "transforms"], grads, grads_ref):
        assert_close_to_oracle(got, want, f"grad of {name}")
    for got, want in zip(ours_running, ref_running):
        assert_close_to_oracle(got, want, "running statistics")


def test_expansion_gradcheck_float64():
    x, full, bn_weight, bn_bias, _, dw_weight, transforms = expansion_case(torch.float64, in_channels=3)
    x = x.detach()[:2, :, :5, :6].contiguous(memory_format=torch.channels_last).requires_grad_()
    e = 6
    w = full.detach()[:e, :3].clone().requires_grad_()

    def f(x, w, bn_weight, bn_bias, dw_weight):
        return fused.bn_act_dwconv2d(
            x, bn_weight, bn_bias, None, None, True, 0.0, 1e-3, "hswish", dw_weight, 3, 1, [], w
        )

    leaves = (x, w, bn_weight.detach()[:e].clone().requires_grad_(), bn_bias.detach()[:e].clone().requires_grad_())
    assert torch.autograd.gradcheck(f, (*leaves, dw_weight), eps=1e-6, atol=1e-7)


def test_expansion_weight_refusals():
    x, full, bn_weight, _, _, dw_weight, _ = expansion_case(torch.float32)
    e, c = bn_weight.shape[0], x.shape[1]
    refusal = fused.fusion_refusal(x, bn_weight, "relu", dw_weight, 3, 1, [], full[:e, :c].double())
    assert refusal is not None and "expansion weight" in refusal
    refusal = fused.fusion_refusal(x, bn_weight, "relu", dw_weight, 3, 1, [], full[:e, : c - 1])
    assert refusal is not None and "expansion weight" in refusal


def make_block(dtype):
    """The digits space's stage-2 residual layer: hswish, squeeze-excite, kernels 3 and 5 (transformed)."""
    torch.manual_seed(0)
    block = ElasticMBConv(tofa_fast.spaces.get("digits"), 2, 1, 24).to(dtype)
    with torch.no_grad():
        for bn in (block.expand_bn, block.dw_bn, block.project_bn):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
    block.set_active(5, 3, 24)  # 24 input channels → 72 expanded (4.5 AVX-512 vectors), 24 out: the residual
    return block.to(memory_format=torch.channels_last)


def count_expansions(monkeypatch) -> list:
    """The calls of the fused op that carry an expansion weight."""
    calls = []
    op = fused.bn_act_dwconv2d
    monkeypatch.setattr(
        fused, "bn_act_dwconv2d", lambda *a, **k: (calls.append(1) if a[-1] is not None else None) or op(*a, **k)
    )
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
def test_block_with_and_without_the_expansion_in_the_op(monkeypatch, dtype, training):
    monkeypatch.setattr(elastic_batchnorm, "FUSED_MIN_ELEMENTS", 0)
    calls = count_expansions(monkeypatch)
    results = []
    for fuse in (True, False):
        monkeypatch.setattr(module_seam, "FUSE_EXPANSION_BACKWARD", fuse)
        block = make_block(dtype).train(training)
        g = torch.Generator().manual_seed(1)
        x = channels_last(torch.randn(4, 24, 10, 10, dtype=dtype, generator=g)).requires_grad_()
        y = block(x)
        y.backward(channels_last(torch.randn(y.shape, dtype=dtype, generator=g)))
        results.append((y, x.grad, *(p.grad for p in block.parameters()), *block.buffers()))
        assert len(calls) == (1 if fuse else 0), "the expansion did not go into the op"
        calls.clear()
    rtol = TOLERANCES[dtype][0]
    for got, want in zip(*results):
        if want is None or not want.is_floating_point():
            assert torch.equal(got, want) if want is not None else got is None
        else:
            assert_close_to_oracle(got, want.double(), f"a result (rtol {rtol})")


def test_a_hooked_expansion_runs_as_a_module(monkeypatch):
    monkeypatch.setattr(elastic_batchnorm, "FUSED_MIN_ELEMENTS", 0)
    calls = count_expansions(monkeypatch)
    block = make_block(torch.float32)
    seen = []
    handle = block.expand_conv.register_forward_hook(lambda m, inputs, output: seen.append(output.shape))
    x = channels_last(torch.randn(2, 24, 8, 8))
    block(x)
    assert len(seen) == 1 and not calls
    handle.remove()
    block(x)
    assert len(calls) == 1
