"""The ops' eager path (tofa_fast/ops/eager_path.py) computes exactly what the torch.library op does.

Plain eager calls of ``elastic_dwconv2d`` and ``packed_batch_norm_act`` run the selected backend
through an ``autograd.Function`` instead of the custom op. Both paths call the same kernels, so the
oracle here is the op path itself (``use_library_dispatch``), compared bit for bit: outputs, every
gradient, the running statistics. The op path is checked against the reference in the ops' own test
files. Also: which path a call takes (eager only when nothing can be tracing), autocast, pins, errors.
"""

from __future__ import annotations

import pytest
import torch
from elastic_dwconv_cases import grid_cases, make_inputs
from torch.utils.flop_counter import FlopCounterMode

from tofa_fast.ops import elastic_dwconv, elastic_dwconv2d, packed_batch_norm_act
from tofa_fast.ops import elastic_dwconv_dispatch as dwconv_dispatch
from tofa_fast.ops import packed_batch_norm as packed_module
from tofa_fast.ops.eager_path import takes_eager_path, use_library_dispatch

HAS_CPP_DWCONV = not dwconv_dispatch.CPP.not_supported_reasons(
    dwconv_dispatch.DwconvProblem("cpu", torch.float32, 3, 7, 1, 2)
)
HAS_CPP_PACKED = not packed_module.CPP.not_supported_reasons(
    packed_module.PackedBatchNormProblem("cpu", torch.float32, torch.float32)
)
DWCONV_BACKENDS = ["reference"] + (["C++"] if HAS_CPP_DWCONV else [])
PACKED_BACKENDS = ["reference"] + (["C++"] if HAS_CPP_PACKED else [])


def assert_identical(got, want, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{tuple(got.shape)}"
    assert got.stride() == want.stride(), f"{what}: strides {got.stride()} != {want.stride()}"
    assert torch.equal(got, want), f"{what}: max |difference| {(got.double() - want.double()).abs().max():.3g}"


class CallCounter:
    """Counts the calls of a module-level function that the public entry reaches through its module."""

    def __init__(self, monkeypatch, module, name):
        original = getattr(module, name)
        self.calls = 0

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


# ---- elastic_dwconv2d -----------------------------------------------------------------------------


def dwconv_outputs(x, weight, kernel, stride, transforms, grad_output):
    """(y, grad_x, grad_weight, *grad_transforms) of one call on fresh leaves."""
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    transforms = [m.detach().clone().requires_grad_() for m in transforms]
    y = elastic_dwconv2d(x, weight, kernel, stride, transforms)
    return (y.detach(), *torch.autograd.grad(y, [x, weight, *transforms], grad_output))


@pytest.mark.parametrize("backend", DWCONV_BACKENDS)
@pytest.mark.parametrize("case", grid_cases(10, seed=21, max_batch=5), ids=str)
def test_dwconv_eager_path_equals_the_op(backend, case):
    x, weight, transforms = make_inputs(case)
    probe = elastic_dwconv2d(x, weight, case.kernel, case.stride, transforms)
    grad_output = torch.randn(probe.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad_output = grad_output.to(probe.dtype)
    with dwconv_dispatch.use_backend(backend):
        eager = dwconv_outputs(x, weight, case.kernel, case.stride, transforms, grad_output)
        with use_library_dispatch():
            library = dwconv_outputs(x, weight, case.kernel, case.stride, transforms, grad_output)
    names = ["y", "grad_x", "grad_weight"] + [f"grad_transform{i}" for i in range(len(transforms))]
    for name, got, want in zip(names, eager, library, strict=True):
        assert_identical(got, want, name)


@pytest.mark.skipif(not HAS_CPP_DWCONV, reason="the C++ extension is not loaded")
@pytest.mark.parametrize("backward_in_autocast", [False, True], ids=["backward_outside", "backward_inside"])
def test_dwconv_eager_path_under_cpu_autocast_equals_the_op(backward_in_autocast):
    """bf16 autocast: x is cast, the filter formed in float32; gradients of weight and transforms in float32."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 10, 9, 11, generator=generator).to(memory_format=torch.channels_last)
    weight = torch.randn(12, 1, 7, 7, generator=generator)
    transforms = [torch.randn(25, 25, generator=generator), torch.randn(9, 9, generator=generator)]

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, weight, *transforms)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = elastic_dwconv2d(leaves[0], leaves[1], 3, 2, leaves[2:])
            if backward_in_autocast:
                y.float().square().sum().backward()
        if not backward_in_autocast:
            y.float().square().sum().backward()
        return (y.detach(), *(t.grad for t in leaves))

    eager = run()
    with use_library_dispatch():
        library = run()
    assert eager[0].dtype == torch.bfloat16 and eager[1].dtype == torch.float32 and eager[2].dtype == torch.float32
    for name, got, want in zip(("y", "grad_x", "grad_weight", "grad_t0", "grad_t1"), eager, library, strict=True):
        assert_identical(got, want, name)


def test_dwconv_plain_call_takes_the_eager_path_and_tracing_takes_the_op(monkeypatch):
    op = CallCounter(monkeypatch, elastic_dwconv, "_elastic_dwconv2d_op")
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    weight = torch.randn(4, 1, 5, 5, requires_grad=True)
    elastic_dwconv2d(x, weight, 3).sum().backward()
    assert op.calls == 0
    with use_library_dispatch():
        elastic_dwconv2d(x, weight, 3)
    assert op.calls == 1
    with FlopCounterMode(display=False):  # a TorchDispatchMode: it must see the op
        elastic_dwconv2d(x, weight, 3)
    assert op.calls == 2
    with torch.no_grad():  # no autograd needed: still the eager path
        elastic_dwconv2d(x, weight, 3)
    assert op.calls == 2


def test_tracing_contexts_refuse_the_eager_path():
    x = torch.randn(2, 3)
    assert takes_eager_path(x, None)
    with use_library_dispatch():
        assert not takes_eager_path(x)
    with FlopCounterMode(display=False):
        assert not takes_eager_path(x)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert not takes_eager_path(fake)
    assert not takes_eager_path(fake)  # a tensor subclass, even outside its mode

    def inside_vmap(row):
        assert not takes_eager_path(row)
        return row

    torch.vmap(inside_vmap)(x)


@pytest.mark.skipif(not HAS_CPP_DWCONV, reason="the C++ extension is not loaded")
def test_dwconv_eager_path_keeps_a_pin_for_its_backward():
    """The backend chosen (or pinned) at the forward computes the backward, on any thread."""
    x = torch.randn(2, 5, 7, 7, requires_grad=True)
    weight = torch.randn(5, 1, 3, 3, requires_grad=True)
    with dwconv_dispatch.use_backend("reference"):
        y = elastic_dwconv2d(x, weight, 3)
    assert y.grad_fn.backend is dwconv_dispatch.REFERENCE  # ctx of the eager autograd.Function
    y.sum().backward()
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        y2 = elastic_dwconv2d(x, weight, 3)
        (g,) = torch.autograd.grad(y2.sum(), [x], create_graph=True)
        g.sum().backward()


def test_dwconv_bad_input_raises_the_same_error_on_both_paths():
    x = torch.randn(2, 4, 6, 6)
    weight = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        elastic_dwconv2d(x, weight, 3)
    with use_library_dispatch(), pytest.raises(ValueError, match="dtype"):
        elastic_dwconv2d(x, weight, 3)


# ---- packed_batch_norm_act ------------------------------------------------------------------------

# Segments of different row counts and active prefixes, one empty, one inactive (C = 13: no whole SIMD vector).
PACKED_LAYOUT = ((37, 13), (0, 5), (1, 0), (150, 7), (2, 13))


def packed_outputs(x, weight, bias, running_mean, running_var, training, activation, grad_y, order):
    offsets = [0]
    for rows, _ in PACKED_LAYOUT:
        offsets.append(offsets[-1] + rows)
    channels = [c for _, c in PACKED_LAYOUT]
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    running = [running_mean.clone(), running_var.clone()]
    factors = [0.1, 0.3, 0.2, 0.0, 0.5]
    y = packed_batch_norm_act(
        leaves[0], offsets, channels, *leaves[1:], *running, training, factors, 1e-5, activation, order
    )
    return (y.detach(), *torch.autograd.grad(y, leaves, grad_y), *running)


@pytest.mark.parametrize("backend", PACKED_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize(
    "dtype,activation", [(torch.float32, "hswish"), (torch.float64, "swish"), (torch.bfloat16, "relu")], ids=str
)
def test_packed_eager_path_equals_the_op(backend, training, dtype, activation):
    if backend == "reference" and dtype == torch.bfloat16:
        pytest.skip("covered by the C++ row")
    generator = torch.Generator().manual_seed(3)
    rows = sum(r for r, _ in PACKED_LAYOUT)
    param_dtype = torch.float32 if dtype == torch.bfloat16 else dtype

    def randn(*shape, dtype=param_dtype):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    x = (randn(rows, 13, dtype=torch.float64) * 2 + randn(13, dtype=torch.float64)).to(dtype)
    weight, bias, running_mean = randn(13), randn(13), randn(13)
    running_var = 0.5 + randn(13).abs()
    grad_y = randn(rows, 13, dtype=dtype)
    args = (x, weight, bias, running_mean, running_var, training, activation, grad_y, [3, 0, 4, 1, 2])
    with packed_module.use_backend(backend):
        eager = packed_outputs(*args)
        with use_library_dispatch():
            library = packed_outputs(*args)
    names = ("y", "grad_x", "grad_weight", "grad_bias", "running_mean", "running_var")
    for name, got, want in zip(names, eager, library, strict=True):
        assert_identical(got, want, name)
    if training:
        assert not torch.equal(eager[4], running_mean)  # the running statistics did move


def test_packed_plain_call_takes_the_eager_path(monkeypatch):
    op = CallCounter(monkeypatch, packed_module, "_packed_batch_norm_act_op")
    x = torch.randn(20, 6, requires_grad=True)
    weight, bias = torch.ones(6, requires_grad=True), torch.zeros(6, requires_grad=True)
    running = (torch.zeros(6), torch.ones(6))
    args = ([0, 20], [6], weight, bias, *running, True, [0.1], 1e-5, "relu")
    packed_batch_norm_act(x, *args).sum().backward()
    assert op.calls == 0 and weight.grad is not None
    with use_library_dispatch():
        packed_batch_norm_act(x, *args)
    assert op.calls == 1


def test_info_says_which_calls_take_the_eager_path():
    from tofa_fast.info import info_text
    from tofa_fast.ops.eager_path import EAGER_PATH_LINE

    assert f"op calls: {EAGER_PATH_LINE}" in info_text()


def test_torch_export_records_the_custom_ops():
    """Under torch.export the calls are the torch.library ops (an autograd.Function would be traced
    through, or refused), and the exported program computes what the eager path does."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(6, 1, 5, 5))
            self.gamma = torch.nn.Parameter(torch.rand(6) + 0.5)
            self.beta = torch.nn.Parameter(torch.randn(6))

        def forward(self, x):
            y = elastic_dwconv2d(x, self.weight, 3, 2)
            n, c, h, w = y.shape
            rows = y.permute(0, 2, 3, 1).reshape(n * h * w, c)
            z = packed_batch_norm_act(rows, [0, n * h * w], [c], self.gamma, self.beta, None, None, True, [0.0], 1e-5)
            return z.view(n, h, w, c).permute(0, 3, 1, 2)

    block, x = Block(), torch.randn(2, 6, 9, 9)
    program = torch.export.export(block, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "tofa_fast.elastic_dwconv2d.default" in targets, targets
    assert "tofa_fast.packed_batch_norm_act.default" in targets, targets
    torch.testing.assert_close(program.module()(x), block(x), rtol=0, atol=0)
