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
    assert_backend_matches_oracle,
    make_inputs,
    reference_outputs,
    transform_chain,
)

from tofa_fast.ops import active_filter_reference
from tofa_fast.ops import elastic_dwconv_dispatch as dispatch

pytest.importorskip("triton")
KERNELS = importlib.import_module("tofa_fast.triton_kernels.elastic_dwconv")
DEVICE = "cpu" if KERNELS.INTERPRETED else "cuda"
# On a GPU these run in the test process: `pytest -m gpu` (scripts/gpu_check.sh) selects them.
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []

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
    assert_backend_matches_oracle("Triton", case, DEVICE)


# Mixed precision (x bf16/fp16, weights fp32: what autocast hands the op) and low-precision weights.
LOW_PRECISION_CASES = [
    DwconvCase(3, 6, 8, 9, 7, 5, 3, 1, "contiguous", True, torch.bfloat16, torch.float32),
    DwconvCase(2, 5, 9, 8, 11, 7, 5, 2, "channels_last", True, torch.float16, torch.float32),
    DwconvCase(2, 4, 4, 7, 5, 7, 7, 1, "strided", False, torch.bfloat16, torch.float32),
    DwconvCase(2, 7, 8, 6, 9, 5, 5, 2, "channels_last", False, torch.bfloat16),
]


@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=str)
def test_triton_low_precision_matches_oracle(case):
    assert_backend_matches_oracle("Triton", case, DEVICE)


@pytest.mark.parametrize("tiles", ["compiled", "interpreter"] if DEVICE == "cpu" else ["compiled"])
@pytest.mark.parametrize("split", [1, 3])
def test_triton_tiles_and_grad_filter_split(tiles, split):
    """Both tilings on whichever device runs here (under the interpreter: the GPU's one channel per
    program), and the grad-filter reduction split over several programs per channel block, summed by
    atomic adds (on a GPU the default whenever N·H_out·W_out is large; forced here)."""
    tiling = {"compiled": KERNELS.COMPILED_TILES, "interpreter": KERNELS.INTERPRETER_TILES}[tiles]
    case = DwconvCase(5, 6, 9, 13, 11, 5, 3, 1, "channels_last", True, torch.float64)
    x, weight, transforms = make_inputs(case, device=DEVICE)
    expected, grad_output, expected_grads = reference_outputs(x, weight, 3, 1, transforms)
    out = KERNELS.elastic_dwconv2d_forward(x, weight, 3, 1, transforms, tiles=tiling)
    grads = KERNELS.elastic_dwconv2d_backward(
        grad_output, x, weight, 3, 1, transforms, [True, True, True], tiles=tiling, grad_filter_split=split
    )
    for got, want in zip([out, grads[0], grads[1], *grads[2]], [expected, *expected_grads]):
        torch.testing.assert_close(got, want, **tolerance(torch.float64))


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


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32)])
def test_triton_opcheck(dtype, weight_dtype):
    case = DwconvCase(2, 3, 4, 5, 4, 5, 3, 2, "contiguous", True, dtype, weight_dtype)
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
