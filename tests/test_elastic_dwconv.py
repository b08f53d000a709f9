"""elastic_dwconv2d on the CPU: the op's registration, the C++ kernel against the reference, errors.

The reference (slice + transform + F.conv2d, differentiated by autograd) is the oracle throughout.
Triton (interpreter) and CUDA checks live in test_elastic_dwconv_triton.py / _cuda.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import run_under_cpu_isa, tolerance
from elastic_dwconv_cases import (
    DwconvCase,
    assert_backend_matches_oracle,
    assert_matches_oracle,
    grid_cases,
    large_plane_cases,
    make_inputs,
    oracle_outputs,
    reference_outputs,
    transform_chain,
)

import tofa_fast
from tofa_fast import _extension
from tofa_fast.ops import (
    active_filter_backward_reference,
    active_filter_reference,
    elastic_dwconv2d,
    elastic_dwconv2d_reference,
)
from tofa_fast.ops import elastic_dwconv_dispatch as dispatch

needs_cpp = pytest.mark.skipif(
    bool(dispatch.CPP.not_supported_reasons(dispatch.DwconvProblem("cpu", torch.float32, 3, 7, 1, 2))),
    reason="the C++ extension with the elastic_dwconv2d kernels is not loaded",
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the reference and its written-out backward ---------------------------------------------------


def test_active_filter_backward_reference_matches_autograd():
    torch.manual_seed(0)
    weight = torch.randn(6, 1, 7, 7, dtype=torch.float64, requires_grad=True)
    transforms = [m.requires_grad_() for m in transform_chain(7, 3, torch.float64)]
    grad_filter = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    active = active_filter_reference(weight, 3, transforms)[:4]
    expected = torch.autograd.grad(active, [weight, *transforms], grad_filter)
    grad_weight, grad_transforms = active_filter_backward_reference(grad_filter, weight.detach(), transforms)
    torch.testing.assert_close(grad_weight, expected[0])
    for got, want in zip(grad_transforms, expected[1:]):
        torch.testing.assert_close(got, want)
    assert grad_weight[4:].abs().sum() == 0 and grad_weight[:, :, 0].abs().sum() == 0


@pytest.mark.parametrize("case", grid_cases(6, seed=11), ids=str)
def test_reference_backend_matches_autograd(case):
    assert_backend_matches_oracle("reference", case)


# ---- torch.library registration -------------------------------------------------------------------


def _opcheck_inputs(dtype=torch.float32, layout="contiguous", kernel=3, transforms=True):
    case = DwconvCase(2, 5, 6, 7, 6, 7, kernel, 2, layout, transforms, dtype)
    x, weight, chain = make_inputs(case)
    return x.requires_grad_(), weight.requires_grad_(), [m.requires_grad_() for m in chain]


@pytest.mark.parametrize("backend", ["C++", "reference"])
@pytest.mark.parametrize(
    "layout,kernel,transforms", [("contiguous", 3, True), ("channels_last", 5, False), ("strided", 7, False)]
)
def test_opcheck(backend, layout, kernel, transforms):
    if backend == "C++" and dispatch.CPP.not_supported_reasons(
        dispatch.DwconvProblem("cpu", torch.float32, 3, 7, 1, 2)
    ):
        pytest.skip("the C++ extension is not loaded")
    x, weight, chain = _opcheck_inputs(layout=layout, kernel=kernel, transforms=transforms)
    with dispatch.use_backend(backend):
        torch.library.opcheck(torch.ops.tofa_fast.elastic_dwconv2d.default, (x, weight, kernel, 2, chain))


@needs_cpp
def test_gradcheck_float64():
    x, weight, chain = _opcheck_inputs(torch.float64, kernel=3, transforms=True)
    x, weight = x[:, :, :5, :5].detach().requires_grad_(), weight.detach().requires_grad_()

    def fn(x, weight, m0, m1):
        return elastic_dwconv2d(x, weight, 3, 2, [m0, m1])

    with dispatch.use_backend("C++"):
        assert torch.autograd.gradcheck(fn, (x, weight, *chain), fast_mode=True)
        assert torch.autograd.gradcheck(lambda x, w: elastic_dwconv2d(x, w, 5, 1), (x, weight), fast_mode=True)


@needs_cpp
def test_torch_compile_matches_eager():
    x, weight, chain = _opcheck_inputs(kernel=5, transforms=True)

    def loss(x, weight, chain):
        return elastic_dwconv2d(x, weight, 5, 2, chain).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager_value = loss(x, weight, chain)
    eager_grads = torch.autograd.grad(eager_value, [x, weight, *chain])
    compiled_value = compiled(x, weight, chain)
    compiled_grads = torch.autograd.grad(compiled_value, [x, weight, *chain])
    torch.testing.assert_close(compiled_value, eager_value)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want)


# ---- the C++ kernel against the reference ---------------------------------------------------------


@needs_cpp
@pytest.mark.parametrize("case", grid_cases(40, seed=3), ids=str)
def test_cpp_matches_reference(case):
    assert_backend_matches_oracle("C++", case)


@needs_cpp
@pytest.mark.parametrize(
    "case",
    [
        DwconvCase(2, 16, 16, 64, 64, 7, 7, 2, "contiguous", False),  # large plane, several row tiles
        DwconvCase(3, 17, 40, 8, 8, 7, 7, 1, "channels_last", True),  # a partial channel block
        DwconvCase(1, 4, 4, 4, 4, 7, 7, 2, "contiguous", False),  # kernel larger than the plane
        DwconvCase(2, 5, 5, 9, 7, 3, 1, 2, "strided", True),  # k = 1 with a chain 3→1
        DwconvCase(2, 3, 5, 1, 1, 5, 5, 1, "contiguous", False),  # 1×1 plane
        DwconvCase(2, 5, 7, 6, 5, 9, 3, 1, "contiguous", True, torch.float64),  # chain 9→7→5→3
        # channels-last planes under 256 pixels with many blocks: NCHW's task plan (a block over batch
        # chunks, the filter-gradient partials of several chunks added); the last block partial
        DwconvCase(5, 100, 120, 4, 4, 7, 5, 1, "channels_last", True),
        DwconvCase(6, 72, 80, 8, 8, 7, 3, 2, "channels_last", True, torch.float64),
    ],
    ids=str,
)
def test_cpp_edge_shapes(case):
    assert_backend_matches_oracle("C++", case)


@needs_cpp
@pytest.mark.parametrize(
    "needs", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]
)
def test_cpp_partial_gradients(needs):
    case = DwconvCase(2, 6, 8, 7, 9, 7, 3, 1, "contiguous", True, torch.float64)
    x, weight, chain = make_inputs(case)
    expected, grad_output, expected_grads = reference_outputs(x, weight, 3, 1, chain)
    leaves = [x.clone().requires_grad_(needs[0]), weight.clone().requires_grad_(needs[1])]
    leaves += [m.clone().requires_grad_(needs[2]) for m in chain]
    with dispatch.use_backend("C++"):
        out = elastic_dwconv2d(leaves[0], leaves[1], 3, 1, leaves[2:])
    wanted = [(t, e) for t, e in zip(leaves, expected_grads) if t.requires_grad]
    grads = torch.autograd.grad(out, [t for t, _ in wanted], grad_output)
    for got, (_, want) in zip(grads, wanted):
        torch.testing.assert_close(got, want)


@needs_cpp
def test_cpp_empty_batch():
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    weight = torch.randn(4, 1, 3, 3, requires_grad=True)
    with dispatch.use_backend("C++"):
        out = elastic_dwconv2d(x, weight, 3, 2)
        assert out.shape == (0, 4, 3, 3)
        out.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() == 0


_ISA_SCRIPT = textwrap.dedent(
    """
    import torch, sys
    sys.path.insert(0, {tests!r})
    from elastic_dwconv_cases import (
        assert_matches_oracle, grid_cases, large_plane_cases, make_inputs, oracle_outputs, reference_outputs,
    )
    from conftest import tolerance
    from tofa_fast.ops import elastic_dwconv2d
    from tofa_fast.ops.elastic_dwconv_dispatch import use_backend
    print(torch.ops.tofa_fast._elastic_dwconv2d_cpu_isa())
    for case in grid_cases(12, seed=5, max_batch=4) + large_plane_cases():
        x, w, chain = make_inputs(case)
        ref, gy, ref_grads = reference_outputs(x, w, case.kernel, case.stride, chain)
        oracle, _, oracle_grads = oracle_outputs(x, w, case.kernel, case.stride, chain, gy)
        leaves = [t.clone().requires_grad_() for t in (x, w, *chain)]
        with use_backend("C++"):
            out = elastic_dwconv2d(leaves[0], leaves[1], case.kernel, case.stride, leaves[2:])
        grads = torch.autograd.grad(out, leaves, gy)
        for got, want, exact in zip([out, *grads], [ref, *ref_grads], [oracle, *oracle_grads]):
            assert_matches_oracle(got, want, exact, case.dtype, tolerance)
    """
)


@needs_cpp
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_cpp_narrower_isa_paths(isa):
    """The AVX2 and baseline tile kernels (this machine would pick its widest) against the reference."""
    run_under_cpu_isa(isa, _ISA_SCRIPT.format(tests=os.path.join(ROOT, "tests")))


@needs_cpp
@pytest.mark.parametrize("case", large_plane_cases(), ids=str)
def test_cpp_channels_last_memory_plans(case):
    """Channels-last planes of >= 256 pixels, several channel blocks: the kernels' software prefetch and
    several blocks per pass change how memory is read and written, never a value — every combination
    of the two switches gives the same bits, and they match the oracle."""
    x, weight, chain = make_inputs(case)
    ref, grad_output, ref_grads = reference_outputs(x, weight, case.kernel, case.stride, chain)
    oracle, _, oracle_grads = oracle_outputs(x, weight, case.kernel, case.stride, chain, grad_output)

    def run(prefetch: bool, multi_block: bool) -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_() for t in (x, weight, *chain)]
        with dispatch.use_backend("C++"), dispatch.cpu_memory_plan(prefetch, multi_block):
            out = elastic_dwconv2d(leaves[0], leaves[1], case.kernel, case.stride, leaves[2:])
            return [out, *torch.autograd.grad(out, leaves, grad_output)]

    plain = run(False, False)
    for got, want, exact in zip(plain, [ref, *ref_grads], [oracle, *oracle_grads]):
        assert_matches_oracle(got, want, exact, case.dtype, tolerance)
    for switches in [(True, False), (False, True), (True, True)]:
        for got, want in zip(run(*switches), plain):
            assert torch.equal(got, want), switches


# ---- dispatch ---------------------------------------------------------------------------------------


@needs_cpp
def test_dispatch_prefers_cpp_and_falls_back_with_reasons():
    x, weight = torch.randn(1, 4, 6, 6), torch.randn(4, 1, 9, 9)
    assert dispatch.select_backend(x, weight, 7, 1, []) is dispatch.CPP
    assert dispatch.select_backend(x, weight, 9, 1, []) is dispatch.REFERENCE  # k = 9 is not compiled
    assert dispatch.select_backend(x, weight, 3, 3, []) is dispatch.REFERENCE  # stride 3
    # bfloat16/float16 run through float32 copies (test_elastic_dwconv_precision.py checks the values).
    assert dispatch.select_backend(x.bfloat16(), weight.bfloat16(), 3, 1, []) is dispatch.CPP
    reasons = dict(dispatch.explain(dispatch.DwconvProblem("cpu", torch.bfloat16, 9, 9, 3, 0)))
    assert not any("bfloat16" in r for r in reasons["C++"]) and any("kernel_size 9" in r for r in reasons["C++"])
    assert any("stride 3" in r for r in reasons["C++"]) and reasons["reference"] == []
    out = elastic_dwconv2d(x, weight, 9, 3)
    torch.testing.assert_close(out, elastic_dwconv2d_reference(x, weight, 9, 3))


def test_pinned_backend_refuses_instead_of_falling_back():
    x, weight = torch.randn(1, 4, 6, 6), torch.randn(4, 1, 3, 3)
    with pytest.raises(RuntimeError, match="pinned backend CUDA cannot serve"), dispatch.use_backend("CUDA"):
        elastic_dwconv2d(x, weight, 3)
    with pytest.raises(ValueError, match="unknown backend"), dispatch.use_backend("cudnn"):
        pass


def test_describe_dispatch_names_every_backend():
    text = "\n".join(dispatch.describe_dispatch())
    for name in ("C++", "CUDA", "Triton", "reference"):
        assert name in text
    assert text.startswith("cpu: served by")


def test_extension_disabled_falls_back_to_reference():
    script = textwrap.dedent(
        """
        import torch
        import tofa_fast
        from tofa_fast import _extension
        from tofa_fast.ops import elastic_dwconv2d, elastic_dwconv2d_reference
        from tofa_fast.ops.elastic_dwconv_dispatch import REFERENCE, select_backend, describe_dispatch
        assert not _extension.available()
        x = torch.randn(2, 5, 9, 7, dtype=torch.float64, requires_grad=True)
        w = torch.randn(6, 1, 5, 5, dtype=torch.float64, requires_grad=True)
        m = torch.randn(9, 9, dtype=torch.float64, requires_grad=True)
        assert select_backend(x, w, 3, 2, [m]) is REFERENCE
        assert torch.autograd.gradcheck(lambda x, w, m: elastic_dwconv2d(x, w, 3, 2, [m]), (x, w, m))
        torch.library.opcheck(torch.ops.tofa_fast.elastic_dwconv2d.default, (x, w, 3, 2, [m]))
        print("\\n".join(describe_dispatch()))
        """
    )
    env = dict(os.environ, TOFA_FAST_DISABLE_EXTENSION="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "disabled by TOFA_FAST_DISABLE_EXTENSION=1" in result.stdout
    assert "cpu: served by reference" in result.stdout


def test_info_reports_the_dispatch():
    from tofa_fast.info import info_text

    text = info_text()
    assert "elastic_dwconv2d" in text and "cpu: served by" in text


# ---- bad input -----------------------------------------------------------------------------------


def _good():
    return torch.randn(2, 4, 6, 6), torch.randn(5, 1, 7, 7), transform_chain(7, 3, torch.float32)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda x, w, ms: (x, w, 4, ms), "kernel_size must be odd"),
        (lambda x, w, ms: (x, w, 9, ms), "kernel_size must be odd and between 1 and K=7"),
        (lambda x, w, ms: (torch.randn(2, 6, 6, 6), w, 3, ms), "C_max=5"),
        (lambda x, w, ms: (x[0], w, 3, ms), "x must have shape"),
        (lambda x, w, ms: (x, w[:, 0], 3, ms), "weight must have shape"),
        (lambda x, w, ms: (x, torch.randn(5, 2, 7, 7), 3, ms), "weight must have shape"),
        (lambda x, w, ms: (x, torch.randn(5, 1, 6, 6), 3, ms), "weight must have shape"),
        (lambda x, w, ms: (x, torch.randn(5, 1, 7, 5), 3, ms), "weight must have shape"),
        (lambda x, w, ms: (x, w, 3, ms[:1]), "transforms must lead from K=7 down to kernel_size=3"),
        (lambda x, w, ms: (x, w, 3, ms + [torch.eye(9)]), r"transforms\[2\]"),
        (lambda x, w, ms: (x, w, 3, [torch.eye(25), torch.eye(8)]), r"transforms\[1\] must be a t²×t² matrix"),
        (lambda x, w, ms: (x, w, 3, [torch.eye(49), torch.eye(9)]), r"transforms\[0\] must be a t²×t² matrix"),
        (lambda x, w, ms: (x, w, 3, [torch.randn(25, 9), ms[1]]), r"transforms\[0\]"),
        (lambda x, w, ms: (x, w.double(), 3, ms), "weight dtype torch.float64 does not match x dtype"),
        (lambda x, w, ms: (x, w, 3, [ms[0], ms[1].double()]), r"transforms\[1\] dtype"),
        (lambda x, w, ms: (x, w.to("meta"), 3, ms), "weight is on meta"),
        (lambda x, w, ms: (x, w, 3, [ms[0].to("meta"), ms[1]]), r"transforms\[0\] is on meta"),
        (lambda x, w, ms: (x.int(), w, 3, ms), "x must be a floating-point tensor"),
        (lambda x, w, ms: (x, w, 3.0, ms), "kernel_size must be an int"),
        (lambda x, w, ms: (x, w, 7, ms), "transforms must lead from K=7 down to kernel_size=7"),
    ],
)
def test_bad_inputs_name_the_argument(mutate, match):
    x, weight, kernel, chain = mutate(*_good())
    with pytest.raises((ValueError, TypeError), match=match):
        elastic_dwconv2d(x, weight, kernel, 1, chain)


def test_bad_stride_names_the_argument():
    x, weight, chain = _good()
    with pytest.raises(ValueError, match="stride must be a positive int"):
        elastic_dwconv2d(x, weight, 3, 0, chain)


@needs_cpp
def test_compiled_op_checks_its_arguments_too():
    """The C++ op validates on its own (TORCH_CHECK), for callers that bypass the Python wrapper."""
    op = torch.ops.tofa_fast._elastic_dwconv2d_compiled_forward
    x, weight, chain = _good()
    with pytest.raises(RuntimeError, match="kernel_size must be odd"):
        op(x, weight, 4, 1, chain)
    with pytest.raises(RuntimeError, match="C_max=5"):
        op(torch.randn(1, 6, 5, 5), weight, 3, 1, chain)
    with pytest.raises(RuntimeError, match=r"transforms\[1\]"):
        op(x, weight, 3, 1, [chain[0], torch.eye(8)])
    with pytest.raises(RuntimeError, match="weight dtype"):
        op(x, weight.double(), 3, 1, [])
    with pytest.raises(RuntimeError, match="compiled for kernel_size in"):
        op(x, torch.randn(5, 1, 9, 9), 9, 1, [])
    with pytest.raises(RuntimeError, match="grad_output must have shape"):
        torch.ops.tofa_fast._elastic_dwconv2d_compiled_backward(
            torch.randn(2, 4, 5, 5), x, weight, 3, 1, chain, [True, True, True]
        )


def test_extension_module_is_what_dispatch_reports():
    assert tofa_fast._extension is _extension
    if _extension.available():
        assert hasattr(torch.ops.tofa_fast, "_elastic_dwconv2d_compiled_forward")
