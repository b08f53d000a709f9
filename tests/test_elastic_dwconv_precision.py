"""elastic_dwconv2d in bfloat16/float16: mixed precision (fp32 weights), autocast, and a whole supernet.

The oracle is the reference run in float64 on the same (upcast) values; the rule is tests/conftest.py's
(kernel error ≤ 2 × the PyTorch reference's own error in that dtype + tolerance(dtype)), with the
compute dtype (x's) setting the tolerance and each gradient checked in its input's dtype.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tolerance
from elastic_dwconv_cases import (
    AUTOCAST_GRADIENT_COSINE,
    DwconvCase,
    assert_backend_matches_oracle,
    assert_matches_oracle,
    grid_cases,
    make_inputs,
    oracle_outputs,
    reference_outputs,
)

import tofa_fast
from tofa_fast.ops import elastic_dwconv2d, elastic_dwconv2d_reference
from tofa_fast.ops import elastic_dwconv_dispatch as dispatch

LOW_PRECISION = (torch.bfloat16, torch.float16)
CPP_READY = not dispatch.CPP.not_supported_reasons(dispatch.DwconvProblem("cpu", torch.bfloat16, 3, 7, 1, 2))
needs_cpp = pytest.mark.skipif(
    not CPP_READY, reason="the C++ extension with the elastic_dwconv2d kernels is not loaded"
)
BACKENDS = ["C++", "reference"] if CPP_READY else ["reference"]


def _mixed(case: DwconvCase) -> DwconvCase:
    return dataclasses.replace(case, weight_dtype=torch.float32)


# Every layout and (K, k) pair, odd sizes, both low-precision dtypes; weights float32 (mixed, what
# autocast gives) and, fewer, in x's own dtype.
MIXED_CASES = [_mixed(c) for c in grid_cases(18, seed=21, dtypes=LOW_PRECISION, max_batch=8)]
SAME_DTYPE_CASES = grid_cases(6, seed=22, dtypes=LOW_PRECISION, max_batch=8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", MIXED_CASES, ids=str)
def test_mixed_precision_matches_oracle(backend, case):
    assert_backend_matches_oracle(backend, case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SAME_DTYPE_CASES, ids=str)
def test_low_precision_weights_match_oracle(backend, case):
    assert_backend_matches_oracle(backend, case)


@needs_cpp
def test_cpp_serves_low_precision():
    x, weight = torch.randn(1, 4, 6, 6).bfloat16(), torch.randn(4, 1, 7, 7)
    assert dispatch.select_backend(x, weight, 3, 1, []) is dispatch.CPP
    assert dispatch.select_backend(x.half(), weight.half(), 5, 2, []) is dispatch.CPP
    assert "cpu, bfloat16 (autocast, float32 weights): served by C++" in dispatch.describe_dispatch()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_mixed_precision(backend, dtype, layout):
    case = DwconvCase(2, 5, 6, 7, 6, 7, 3, 2, layout, True, dtype, torch.float32)
    x, weight, chain = make_inputs(case)
    args = (x.requires_grad_(), weight.requires_grad_(), 3, 2, [m.requires_grad_() for m in chain])
    with dispatch.use_backend(backend):
        torch.library.opcheck(torch.ops.tofa_fast.elastic_dwconv2d.default, args)


def test_mixed_precision_refuses_other_weight_dtypes():
    x = torch.randn(1, 4, 6, 6, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="weight dtype torch.float16 does not match x dtype torch.bfloat16"):
        elastic_dwconv2d(x, torch.randn(4, 1, 3, 3, dtype=torch.float16), 3)
    with pytest.raises(ValueError, match="weight dtype torch.float64 does not match"):
        elastic_dwconv2d(x, torch.randn(4, 1, 3, 3, dtype=torch.float64), 3)


# ---- autocast ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_autocast_casts_x_and_keeps_fp32_weights(backend, dtype, layout):
    """Under autocast: output in the autocast dtype, every gradient in its leaf's dtype (float32), values
    as the mixed-precision call on the cast x — which the oracle rule checks."""
    case = DwconvCase(3, 9, 12, 11, 7, 7, 3, 1, layout, True, torch.float32)
    x, weight, transforms = make_inputs(case)
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, *transforms)]
    with dispatch.use_backend(backend), torch.autocast("cpu", dtype=dtype):
        out = elastic_dwconv2d(leaves[0], leaves[1], 3, 1, leaves[2:])
    assert out.dtype == dtype
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    with dispatch.use_backend(backend):
        grads = torch.autograd.grad(out, leaves, grad_output)
    assert all(g.dtype == torch.float32 for g in grads)
    mixed_x = x.to(dtype)
    expected, _, expected_grads = reference_outputs(mixed_x, weight, 3, 1, transforms, grad_output)
    oracle, _, oracle_grads = oracle_outputs(mixed_x, weight, 3, 1, transforms, grad_output)
    # x's gradient reaches the float32 leaf through the cast: compare it in x's compute dtype.
    grads = [grads[0].to(dtype), *grads[1:]]
    for got, want, exact in zip([out, *grads], [expected, *expected_grads], [oracle, *oracle_grads]):
        assert_matches_oracle(got, want, exact, dtype, tolerance)


def test_autocast_matches_the_reference_under_autocast():
    """The reference called under autocast means the same thing: chain in fp32, conv in bf16."""
    x, weight, transforms = make_inputs(DwconvCase(2, 6, 8, 9, 9, 5, 3, 1, "contiguous", True))
    with dispatch.use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = elastic_dwconv2d(x, weight, 3, 1, transforms)
        theirs = elastic_dwconv2d_reference(x, weight, 3, 1, transforms)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_autocast_backward_inside_the_region_keeps_fp32_grads():
    """A backward run inside the autocast region must not take the chain rule to bf16."""
    x, weight, transforms = make_inputs(DwconvCase(2, 6, 8, 9, 9, 5, 3, 1, "contiguous", True))
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, *transforms)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = elastic_dwconv2d(leaves[0], leaves[1], 3, 1, leaves[2:])
        grads = torch.autograd.grad(out.float().square().sum(), leaves)
    assert [g.dtype for g in grads] == [torch.float32] * len(leaves)


def test_float64_passes_through_autocast():
    x, weight, _ = make_inputs(DwconvCase(1, 3, 3, 5, 5, 3, 3, 1, "contiguous", False, torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = elastic_dwconv2d(x, weight, 3)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, elastic_dwconv2d_reference(x, weight, 3), **tolerance(torch.float64))


# ---- a whole supernet --------------------------------------------------------------------------


def test_supernet_forward_under_cpu_bf16_autocast():
    """Issue 11's reproduction: this raised 'weight dtype float32 does not match x dtype bfloat16'."""
    net = tofa_fast.Supernet("digits", num_classes=10).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10) and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_supernet_backward_under_cpu_bf16_autocast(channels_last):
    """Backward through every layer of the max subnet, its first layer per stage at k = 3 (through the
    5→3 transform): parameters stay fp32 and so do their gradients, which point the same way as the
    fp32 run's."""
    torch.manual_seed(0)
    net = tofa_fast.Supernet("digits", num_classes=10).train()
    net.set_regularization(dropout=0.0, drop_connect=0.0)
    arch = net.space.max_arch().to_dict()
    for stage in arch["stages"]:
        stage["kernel"][0] = 3
    net.set_active(arch)
    x = torch.randn(4, 3, 32, 32)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(4) % 10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(net(x), labels)
    loss.backward()
    bf16_grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    torch.nn.functional.cross_entropy(net(x), labels).backward()
    fp32_grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert set(bf16_grads) == set(fp32_grads)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in bf16_grads.values())
    assert any(n.endswith("dw_conv.weight") for n in bf16_grads) and any("transform_" in n for n in bf16_grads)
    flat = torch.cat([bf16_grads[n].flatten() for n in sorted(bf16_grads)])
    reference = torch.cat([fp32_grads[n].flatten() for n in sorted(fp32_grads)])
    assert torch.nn.functional.cosine_similarity(flat, reference, dim=0) >= AUTOCAST_GRADIENT_COSINE[torch.bfloat16]
