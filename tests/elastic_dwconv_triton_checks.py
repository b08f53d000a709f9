"""Triton kernels of elastic_dwconv2d against the reference (collected by test_elastic_dwconv_triton.py).

On a GPU they run on CUDA tensors in the test process. Without one they run on CPU tensors under
``TRITON_INTERPRET=1``, which must be set before triton itself is imported (the interpreter also
imports parts of triton lazily while running), so test_elastic_dwconv_triton.py then runs this file in
a pytest subprocess started with the variable set.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import tolerance
from elastic_dwconv_cases import (
    DwconvCase,
    assert_matches_oracle,
    make_inputs,
    oracle_outputs,
    reference_outputs,
    transform_chain,
)

from tofa_fast.ops import active_filter_reference, elastic_dwconv2d
from tofa_fast.ops import elastic_dwconv_dispatch as dispatch

pytest.importorskip("triton")
KERNELS = importlib.import_module("tofa_fast.triton_kernels.elastic_dwconv")
DEVICE = "cpu" if KERNELS.INTERPRETED else "cuda"

CASES = [
    DwconvCase(32, 3, 4, 5, 3, 5, 3, 2, "contiguous", True),  # batch 32
    DwconvCase(2, 5, 6, 9, 7, 7, 7, 1, "contiguous", False, torch.float64),
    DwconvCase(2, 6, 16, 9, 8, 7, 3, 2, "channels_last", True),
    DwconvCase(1, 7, 20, 5, 5, 3, 3, 1, "channels_last", False, torch.float64),
    DwconvCase(3, 3, 40, 11, 6, 5, 5, 2, "strided", False),
    DwconvCase(2, 4, 20, 8, 8, 7, 5, 1, "strided", True, torch.float64),
    DwconvCase(2, 8, 8, 7, 9, 3, 1, 2, "contiguous", True),
    DwconvCase(1, 3, 3, 1, 1, 7, 7, 1, "contiguous", False),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(case):
    x, weight, transforms = make_inputs(case, device=DEVICE)
    expected, grad_output, expected_grads = reference_outputs(x, weight, case.kernel, case.stride, transforms)
    oracle, _, oracle_grads = oracle_outputs(x, weight, case.kernel, case.stride, transforms, grad_output)
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, *transforms)]
    with dispatch.use_backend("Triton"):
        out = elastic_dwconv2d(leaves[0], leaves[1], case.kernel, case.stride, leaves[2:])
        grads = torch.autograd.grad(out, leaves, grad_output)
    names = ["output", "grad x", "grad weight"] + [f"grad transforms[{i}]" for i in range(len(transforms))]
    for name, got, want, exact in zip(names, [out, *grads], [expected, *expected_grads], [oracle, *oracle_grads]):
        assert_matches_oracle(got, want, exact, case.dtype, tolerance, name)
    if case.layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_triton_three_step_chain():
    """9→7→5→3: the longest chain the kernel takes, forward and backward in one launch each."""
    case = DwconvCase(2, 5, 7, 6, 5, 9, 3, 1, "contiguous", True, torch.float64)
    x, weight, transforms = make_inputs(case, device=DEVICE)
    assert len(transforms) == 3
    torch.testing.assert_close(
        KERNELS.active_filter(weight, 3, transforms, 5).view(5, 1, 3, 3),
        active_filter_reference(weight, 3, transforms)[:5],
        **tolerance(torch.float64),
    )
    expected, grad_output, expected_grads = reference_outputs(x, weight, 3, 1, transforms)
    grads = KERNELS.elastic_dwconv2d_backward(grad_output, x, weight, 3, 1, transforms, [True, True, True])
    for got, want in zip([grads[0], grads[1], *grads[2]], expected_grads):
        torch.testing.assert_close(got, want, **tolerance(torch.float64))


def test_triton_refuses_long_chains():
    problem = dispatch.DwconvProblem(DEVICE, torch.float32, 1, 9, 1, 4)
    assert any("4 transforms" in r for r in dispatch.TRITON.not_supported_reasons(problem))
    weight = torch.randn(3, 1, 9, 9, device=DEVICE)
    with pytest.raises(ValueError, match="at most 3 transforms"):
        KERNELS.active_filter(weight, 1, transform_chain(9, 1, torch.float32, DEVICE), 3)


def test_triton_opcheck():
    case = DwconvCase(2, 3, 4, 5, 4, 5, 3, 2, "contiguous", True)
    x, weight, transforms = make_inputs(case, device=DEVICE)
    args = (x.requires_grad_(), weight.requires_grad_(), 3, 2, [m.requires_grad_() for m in transforms])
    with dispatch.use_backend("Triton"):
        torch.library.opcheck(torch.ops.tofa_fast.elastic_dwconv2d.default, args)


def test_triton_partial_gradients():
    case = DwconvCase(2, 4, 6, 5, 7, 5, 3, 1, "contiguous", True, torch.float64)
    x, weight, transforms = make_inputs(case, device=DEVICE)
    _, grad_output, expected_grads = reference_outputs(x, weight, 3, 1, transforms)
    grad_x, grad_weight, grad_transforms = KERNELS.elastic_dwconv2d_backward(
        grad_output, x, weight, 3, 1, transforms, [False, False, True]
    )
    assert grad_x.numel() == 0 and grad_weight.numel() == 0
    torch.testing.assert_close(grad_transforms[0], expected_grads[2])
