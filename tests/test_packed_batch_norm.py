"""packed_batch_norm_act: the C++ kernel and the reference backend against the reference, registration, errors.

The oracle is ``packed_batch_norm_act_reference`` (F.batch_norm + activation per segment, differentiated
by autograd). The layouts are awkward on purpose: C = 13 (no whole SIMD vector), segments of 1 to 400
rows, an empty segment, a segment with no active channels, active prefixes that differ per segment,
and a non-trivial update order with a zero momentum factor, so that the order in which the segments
update the running statistics shows in the result.
"""

from __future__ import annotations

import pytest
import torch

from tofa_fast.ops import packed_batch_norm as op_module
from tofa_fast.ops import packed_batch_norm_act, packed_batch_norm_act_reference
from tofa_fast.ops.packed_batch_norm_reference import PACKED_ACTIVATIONS

needs_cpp = pytest.mark.skipif(
    bool(op_module.CPP.not_supported_reasons(op_module.PackedBatchNormProblem("cpu", torch.float32, torch.float32))),
    reason="the C++ extension with the packed_batch_norm_act kernels is not loaded",
)

# Norm-wise relative error, max|ours − reference| / max|reference|, per compute dtype (the brief of the
# kernel: 1e-5 in float32, 1e-10 in float64). bfloat16 x is held to bfloat16's resolution (2⁻⁸).
RELATIVE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}
EPS = 1e-5
WIDTH = 13
# Rows and active channels per segment: an empty segment (5 channels, no rows), a one-row segment with
# no active channel, one with 2 rows, one of 400 rows, a single-channel one. Eval also takes a one-row
# active segment (training refuses it: batch statistics of one row).
TRAINING_LAYOUT = ((37, 13), (0, 5), (1, 0), (400, 7), (2, 13), (100, 1), (5, 9))
EVAL_LAYOUT = TRAINING_LAYOUT + ((1, 11),)
MOMENTUM_FACTORS = (0.1, 0.3, 0.2, 0.0, 0.5, 0.7, 0.25, 0.4)  # segment 3 (the 400 rows) updates nothing
UPDATE_ORDER = (3, 0, 6, 5, 1, 4, 2, 7)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, except where a test asks for two: on a loaded 2-core machine every
    parallel region (ATen's in the reference too) waits for its second thread to be scheduled, which
    made this file 2× slower. The threaded kernels are checked, against one thread and the reference,
    in test_long_segments_span_several_tasks_and_threads_do_not_change_results."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    error = relative_error(actual, expected)
    assert error <= tolerance, f"{what}: relative error {error:.3g} > {tolerance:g}"


class Case:
    """Random inputs of one layout; x rows are shifted and scaled per channel (a non-zero mean)."""

    def __init__(self, layout, dtype=torch.float32, param_dtype=None, seed=0, width=WIDTH):
        generator = torch.Generator().manual_seed(seed)
        param_dtype = param_dtype or dtype
        self.offsets = [0]
        for rows, _ in layout:
            self.offsets.append(self.offsets[-1] + rows)
        self.channels = [c for _, c in layout]
        segments, rows = len(layout), self.offsets[-1]

        def randn(*shape, dtype=param_dtype):
            return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

        self.x = (randn(rows, width, dtype=torch.float64) * (1 + randn(width).abs()) + 3 * randn(width)).to(dtype)
        self.weight = randn(width)
        self.bias = randn(width)
        self.running_mean = randn(width)
        self.running_var = (0.5 + randn(width).abs()).to(param_dtype)
        self.grad_y = randn(rows, width, dtype=dtype)
        self.factors = list(MOMENTUM_FACTORS[:segments])
        self.order = [i for i in UPDATE_ORDER if i < segments]

    def run(self, fn, training, activation, order=None, **overrides):
        """(y, grad_x, grad_weight, grad_bias, running_mean, running_var) of ``fn`` (fresh leaves and stats)."""
        x = overrides.get("x", self.x).detach().clone().requires_grad_()
        weight = self.weight.detach().clone().requires_grad_()
        bias = self.bias.detach().clone().requires_grad_()
        running_mean, running_var = self.running_mean.clone(), self.running_var.clone()
        y = fn(
            x,
            self.offsets,
            self.channels,
            weight,
            bias,
            running_mean,
            running_var,
            training,
            self.factors,
            EPS,
            activation,
            self.order if order is None else order,
        )
        grads = torch.autograd.grad(y, (x, weight, bias), self.grad_y)
        return (y.detach(), *grads, running_mean, running_var)


def compare(case, training, activation, tolerance, fn=packed_batch_norm_act, oracle_case=None):
    names = ("y", "grad_x", "grad_weight", "grad_bias", "running_mean", "running_var")
    ours = case.run(fn, training, activation)
    expected = (oracle_case or case).run(packed_batch_norm_act_reference, training, activation)
    for name, got, want in zip(names, ours, expected):
        assert_relative(got, want.to(got.dtype), tolerance, f"{name} ({activation}, training={training})")
    return ours


# ---- against the reference ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["C++", "reference"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("activation", PACKED_ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_matches_reference(backend, dtype, activation, training):
    if backend == "C++" and needs_cpp.args[0]:
        pytest.skip(needs_cpp.kwargs["reason"])
    case = Case(TRAINING_LAYOUT if training else EVAL_LAYOUT, dtype, seed=len(activation))
    with op_module.use_backend(backend):
        y, grad_x, grad_weight, _, running_mean, running_var = compare(
            case, training, activation, RELATIVE_TOLERANCE[dtype]
        )
    # Padding columns, empty and inactive segments: exact zeros, zero gradients.
    for i, active in enumerate(case.channels):
        rows = slice(case.offsets[i], case.offsets[i + 1])
        assert y[rows, active:].abs().sum() == 0 and grad_x[rows, active:].abs().sum() == 0
    assert grad_weight[max(case.channels) :].abs().sum() == 0
    if training:  # some channels moved, and the statistics of the untouched tail did not
        assert not torch.equal(running_mean, case.running_mean)
        assert torch.equal(running_var[max(case.channels) :], case.running_var[max(case.channels) :])
    else:
        assert torch.equal(running_mean, case.running_mean) and torch.equal(running_var, case.running_var)


@needs_cpp
def test_update_order_matters_and_is_followed():
    case = Case(TRAINING_LAYOUT, torch.float64)
    with op_module.use_backend("C++"):
        in_order = case.run(packed_batch_norm_act, True, "relu", order=list(range(len(case.channels))))
        default = case.run(packed_batch_norm_act, True, "relu", order=None)  # Case.run's UPDATE_ORDER
        none_given = case.run(lambda *args: packed_batch_norm_act(*args[:-1], update_order=None), True, "relu")
    assert not torch.allclose(in_order[4], default[4])  # the order shows in the running mean
    torch.testing.assert_close(none_given[4], in_order[4], rtol=0, atol=0)  # None: segment order


@needs_cpp
def test_zero_factors_and_no_running_stats_update_nothing():
    case = Case(TRAINING_LAYOUT, torch.float64)
    case.factors = [0.0] * len(case.channels)
    with op_module.use_backend("C++"):
        *_, running_mean, running_var = case.run(packed_batch_norm_act, True, "hswish")
        assert torch.equal(running_mean, case.running_mean) and torch.equal(running_var, case.running_var)
        x = case.x.clone()
        y = packed_batch_norm_act(
            x, case.offsets, case.channels, case.weight, case.bias, None, None, True, case.factors, EPS
        )
    expected = packed_batch_norm_act_reference(
        x, case.offsets, case.channels, case.weight, case.bias, None, None, True, case.factors, EPS
    )
    assert_relative(y, expected, RELATIVE_TOLERANCE[torch.float64], "y without running statistics")


@needs_cpp
@pytest.mark.parametrize("activation", PACKED_ACTIVATIONS)
def test_bfloat16_x_with_float32_parameters(activation):
    """Mixed precision: bfloat16 x, float32 weight/bias/stats. The oracle is the float32 reference on
    the same (exactly widened) values: the kernel computes in float32 and rounds once at the end."""
    case = Case(TRAINING_LAYOUT, torch.bfloat16, param_dtype=torch.float32, seed=3)
    oracle = Case(TRAINING_LAYOUT, torch.bfloat16, param_dtype=torch.float32, seed=3)
    oracle.x, oracle.grad_y = case.x.float(), case.grad_y.float()
    with op_module.use_backend("C++"):
        y, grad_x, grad_weight, grad_bias, *_ = compare(
            case, True, activation, RELATIVE_TOLERANCE[torch.bfloat16], oracle_case=oracle
        )
    assert y.dtype == grad_x.dtype == torch.bfloat16
    assert grad_weight.dtype == grad_bias.dtype == torch.float32


# Wide rows: segments of 40, 33 and 17 active channels of 40 — the C++ kernel's elementwise passes walk
# the first two row by row and the third in channel chunks (csrc/ops/cpu/packed_batch_norm_cpu.cpp,
# takes_channel_chunks); WIDTH's layouts above take chunks only.
WIDE_LAYOUT = ((300, 40), (250, 33), (0, 40), (120, 17), (60, 0))


@needs_cpp
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("activation", PACKED_ACTIVATIONS)
def test_wide_rows_match_reference(activation, training):
    case = Case(WIDE_LAYOUT, torch.float32, seed=11, width=40)
    with op_module.use_backend("C++"):
        compare(case, training, activation, RELATIVE_TOLERANCE[torch.float32])


@needs_cpp
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("activation", PACKED_ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_channel_chunks_and_rows_give_the_same_bits(dtype, activation, training):
    """The elementwise passes on channel chunks (vector packs of 8 channels, then single ones) run the
    operations of the row-by-row loops in the same order: every output is bitwise the same, at
    widths that take chunks of two packs, one pack and single channels."""
    param_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    layout = ((200, 24), (150, 21), (90, 16), (70, 13), (40, 5), (0, 9))
    case = Case(layout, dtype, param_dtype=param_dtype, seed=13, width=24)
    with op_module.use_backend("C++"):
        with op_module.cpu_channel_chunks(True):
            chunked = case.run(packed_batch_norm_act, training, activation)
        with op_module.cpu_channel_chunks(False):
            by_rows = case.run(packed_batch_norm_act, training, activation)
    for got, want in zip(chunked, by_rows):
        assert torch.equal(got, want) or (got.isnan().any() and torch.equal(got.nan_to_num(), want.nan_to_num()))


@needs_cpp
def test_long_segments_span_several_tasks_and_threads_do_not_change_results():
    # 12 000 rows × 13 channels: several row chunks per segment, their partial sums added in order.
    case = Case(((12000, 13), (7000, 6), (3, 13)), torch.float64, seed=5)
    with op_module.use_backend("C++"):
        serial = case.run(packed_batch_norm_act, True, "swish")
        torch.set_num_threads(2)  # the fixture restores the count
        ours = compare(case, True, "swish", RELATIVE_TOLERANCE[torch.float64])
    for got, want in zip(serial, ours):
        assert torch.equal(got, want)  # fixed chunks, fixed order: bitwise the same


@needs_cpp
def test_strided_x():
    case = Case(TRAINING_LAYOUT, torch.float32, seed=7)
    wide = torch.zeros(case.x.shape[0], WIDTH + 3)
    wide[:, 2 : WIDTH + 2] = case.x
    x = wide[:, 2 : WIDTH + 2]
    assert not x.is_contiguous()
    with op_module.use_backend("C++"):
        ours = case.run(packed_batch_norm_act, True, "relu6", x=x)
    expected = case.run(packed_batch_norm_act_reference, True, "relu6")
    for got, want in zip(ours, expected):
        assert_relative(got, want, RELATIVE_TOLERANCE[torch.float32], "strided x")


# ---- registration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["C++", "reference"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_opcheck(backend, training):
    if backend == "C++" and needs_cpp.args[0]:
        pytest.skip(needs_cpp.kwargs["reason"])
    case = Case(((9, 5), (0, 3), (6, 2), (4, 0)), torch.float32, width=5)
    args = (
        case.x.requires_grad_(), case.offsets, case.channels, case.weight.requires_grad_(),
        case.bias.requires_grad_(), case.running_mean, case.running_var, training, case.factors, EPS, "hswish",
        case.order,
    )  # fmt: skip
    with op_module.use_backend(backend):
        torch.library.opcheck(torch.ops.tofa_fast.packed_batch_norm_act.default, args)
        _, save_mean, save_rstd, _, _ = torch.ops.tofa_fast.packed_batch_norm_act(*args)
        backward_args = (
            case.grad_y, case.x.detach(), case.offsets, case.channels, case.weight.detach(), case.bias.detach(),
            save_mean, save_rstd, training, "hswish", [True, False, True],
        )  # fmt: skip
        torch.library.opcheck(torch.ops.tofa_fast.packed_batch_norm_act_backward.default, backward_args)


def test_dispatch_table():
    cpu = op_module.PackedBatchNormProblem("cpu", torch.float32, torch.float32)
    half = op_module.PackedBatchNormProblem("cpu", torch.float16, torch.float32)
    cuda = op_module.PackedBatchNormProblem("cuda", torch.float32, torch.float32)
    assert op_module.select_backend_for(half) is op_module.REFERENCE
    if not needs_cpp.args[0]:  # with the extension loaded, the refusal names the dtype
        assert any("float16" in r for r in op_module.CPP.not_supported_reasons(half))
    assert op_module.select_backend_for(cuda) is op_module.REFERENCE
    expected = op_module.REFERENCE if op_module.CPP.not_supported_reasons(cpu) else op_module.CPP
    assert op_module.select_backend_for(cpu) is expected
    assert any(line.startswith("cpu, float32: served by") for line in op_module.describe_dispatch())
    with pytest.raises(ValueError, match="unknown backend"):
        with op_module.use_backend("Triton"):
            pass
    with op_module.use_backend("C++"), pytest.raises(RuntimeError, match="pinned backend C"):
        op_module.select_backend_for(half)


# ---- errors ---------------------------------------------------------------------------------------


def _error_args(**changes):
    case = Case(((4, 3), (3, 2)), torch.float32, width=3)
    args = dict(
        x=case.x, offsets=case.offsets, channels=case.channels, weight=case.weight, bias=case.bias,
        running_mean=case.running_mean, running_var=case.running_var, training=True, momentum_factors=[0.1, 0.1],
        eps=EPS, activation="relu", update_order=None,
    )  # fmt: skip
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(x=torch.zeros(7, 3, 1)), "x must be 2-D"),
        (dict(x=torch.zeros(7, 3, dtype=torch.int64)), "floating-point"),
        (dict(offsets=[0, 4]), "offsets must have len"),
        (dict(offsets=[0, 4, 8]), "entries from 0 to 7"),
        (dict(offsets=[0, 8, 7]), "entries from 0 to 7|non-decreasing"),
        (dict(offsets=[0, 5, 4, 7], channels=[3, 2, 1], momentum_factors=[0.1] * 3), "non-decreasing"),
        (dict(channels=[4, 2]), r"channels must be in \[0, 3\]"),
        (dict(weight=torch.ones(4)), r"weight must have shape \(3,\)"),
        (dict(bias=torch.ones(3, dtype=torch.float64)), "bias dtype torch.float64 does not match"),
        (dict(running_mean=torch.zeros(3, device="meta")), "running_mean is on meta"),
        (dict(running_var=None), "both be tensors or both be None"),
        (dict(running_mean=None, running_var=None, training=False), "eval mode normalises with running"),
        (dict(momentum_factors=[0.1]), "one entry per segment"),
        (dict(activation="gelu"), "activation must be one of"),
        (dict(update_order=[0, 0]), "permutation of range"),
        (dict(offsets=[0, 1, 7]), r"more than one row per active segment.*\[0\]"),
        (dict(eps=-1.0), "eps must be non-negative"),
    ],
)
def test_bad_arguments_raise_value_error(changes, message):
    with pytest.raises(ValueError, match=message):
        packed_batch_norm_act(**_error_args(**changes))


def test_one_row_segment_is_fine_without_active_channels_or_in_eval():
    args = _error_args(offsets=[0, 1, 7], channels=[0, 2])
    packed_batch_norm_act(**args)
    packed_batch_norm_act(**_error_args(offsets=[0, 1, 7], training=False))
