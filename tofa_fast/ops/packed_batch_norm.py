"""The ``tofa_fast::packed_batch_norm_act`` operator (SPEC §5): schema, fake kernels, autograd, backends.

The fused multi-subnet step batch-normalises the packed activations of all its members at once; the
layout, the math and the oracle are in :mod:`.packed_batch_norm_reference`. Run there, it is one
``F.batch_norm`` + activation + pad per member and a concatenation: several passes over the data and
a chain of small ops per layer, on the hot path of every training step. The compiled CPU kernel
(csrc/ops/cpu/packed_batch_norm_cpu.cpp) does the whole layer in two passes forward and two backward.

Like ``elastic_dwconv2d`` it is a ``torch.library`` custom op (``torch.compile`` and
``torch.library.opcheck`` see one opaque op) whose backward is a second custom op, and which backend
computes a call is decided by a small table (:data:`DISPATCH_TABLE`, run by the same
:class:`.dispatch_table.BackendTable`): every backend lists the reasons it refuses a problem, the
first one with none serves it, the reference ends every list. Today that is the C++ kernel for
CPU tensors when the extension is built, the reference everywhere else (CUDA tensors, no
extension, float16). :func:`describe_dispatch` words the choice for ``tofa-fast info``.

The op returns, like ``aten::native_batch_norm``, the output and the statistics that normalised it —
per segment (S, C) mean and 1/sqrt(var + eps), in float32 (float64 for float64 x): the batch
statistics in training, the running ones in eval; the backward reads them instead of recomputing
them. The op itself is functional, like ``aten::_native_batch_norm_legit_functional``: ``torch.library``
refuses an autograd formula on an op that mutates its inputs, so instead of updating the running
statistics in place it returns updated copies (C elements each), and :func:`packed_batch_norm_act`
— which returns the output alone — writes them back into ``running_mean`` / ``running_var``, as the
reference's ``F.batch_norm`` calls do. (The internal compiled op does update its arguments in place:
the op hands it the copies.) Gradients are first order (the backward is itself an opaque op).

Mixed precision works without autocast: bfloat16 (or float16) x with float32 weight, bias and running
statistics; the compute and every sum run in float32, y and grad_x come back in x's dtype, the
parameter gradients in float32.

In plain eager mode :func:`packed_batch_norm_act` calls the selected backend through
:class:`_EagerPackedBatchNormAct` instead (:mod:`.eager_path`: the op's Python dispatch costs more
than the kernel on all but large inputs); the backend then updates the running statistics in place,
as ``F.batch_norm`` does, where the op path updates copies and writes them back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .. import backends
from .dispatch_table import Backend, BackendTable
from .eager_path import takes_eager_path
from .packed_batch_norm_reference import check_packed_batch_norm_args, packed_batch_norm_act_reference

__all__ = ["describe_dispatch", "packed_batch_norm_act", "select_backend", "use_backend"]

# x dtypes that take float32 parameters (autocast's fp32 master weights).
MIXED_PRECISION_DTYPES = (torch.bfloat16, torch.float16)

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def compute_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the math, the sums and the saved statistics."""
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def check_packed_batch_norm_tensors(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: float,
) -> None:
    """Raise ``ValueError`` on dtypes and devices the op does not take (the layout rules are
    :func:`check_packed_batch_norm_args`'s)."""
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype and not (x.dtype in MIXED_PRECISION_DTYPES and t.dtype == torch.float32):
            raise ValueError(
                f"{name} dtype {t.dtype} does not match x dtype {x.dtype} "
                "(float32 parameters also serve bfloat16/float16 x: mixed precision)"
            )
    if not eps >= 0:
        raise ValueError(f"eps must be non-negative, got {eps}")


# ---- backends -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedBatchNormProblem:
    """What a backend needs to know to accept or refuse a call (no tensor data)."""

    device_type: str
    dtype: torch.dtype
    weight_dtype: torch.dtype

    @classmethod
    def of(cls, x: torch.Tensor, weight: torch.Tensor) -> PackedBatchNormProblem:
        return cls(x.device.type, x.dtype, weight.dtype)


class PackedBatchNormBackend(Backend[PackedBatchNormProblem]):
    """One implementation of the op: forward and backward, plus the reasons it refuses a problem."""

    def forward(
        self, x, offsets, channels, weight, bias, running_mean, running_var, training, factors, eps, activation, order
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(y, save_mean, save_rstd); updates the running statistics in training."""
        raise NotImplementedError

    def backward(
        self, grad_y, x, offsets, channels, weight, bias, save_mean, save_rstd, training, activation, output_mask
    ) -> Grads:
        """(grad_x, grad_weight, grad_bias); masked-off entries are empty (0,) tensors."""
        raise NotImplementedError


def _empty(x: torch.Tensor) -> torch.Tensor:
    """A masked-off gradient: a fresh (0,) tensor (outputs of an op must not alias each other)."""
    return x.new_empty((0,))


# dy · activation'(z), PyTorch's backward conventions at the kinks (as the compiled kernel).
def _activation_grad(activation: str, z: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    if activation == "none":
        return dy
    if activation == "relu":
        return torch.where(z > 0, dy, torch.zeros_like(dy))
    if activation == "relu6":
        return torch.where((z > 0) & (z < 6), dy, torch.zeros_like(dy))
    if activation == "hswish":
        return torch.where(z < -3, torch.zeros_like(dy), torch.where(z <= 3, dy * (z / 3 + 0.5), dy))
    s = torch.sigmoid(z)  # swish
    return dy * s * (1 + z * (1 - s))


class ReferenceBackend(PackedBatchNormBackend):
    name = "reference"
    supports = "every device and dtype (F.batch_norm + activation per segment; the backward written out)"

    def not_supported_reasons(self, problem: PackedBatchNormProblem) -> list[str]:
        return []

    def forward(
        self, x, offsets, channels, weight, bias, running_mean, running_var, training, factors, eps, activation, order
    ):
        compute = compute_dtype(x.dtype)
        save_mean = x.new_zeros((len(channels), x.shape[1]), dtype=compute)
        save_rstd = torch.zeros_like(save_mean)
        # The statistics the reference normalises with, read before it updates the running ones.
        for i, c in enumerate(channels):
            rows = x[offsets[i] : offsets[i + 1], :c]
            if c == 0 or rows.shape[0] == 0:
                continue
            if training:
                var, mean = torch.var_mean(rows.to(compute), dim=0, unbiased=False)
            else:
                mean, var = running_mean[:c].to(compute), running_var[:c].to(compute)
            save_mean[i, :c] = mean
            save_rstd[i, :c] = torch.rsqrt(var + eps)
        with torch.no_grad():
            y = packed_batch_norm_act_reference(
                x, offsets, channels, weight, bias, running_mean, running_var, training, factors, eps, activation, order
            )
        return y.contiguous(), save_mean, save_rstd

    def backward(
        self, grad_y, x, offsets, channels, weight, bias, save_mean, save_rstd, training, activation, output_mask
    ):
        # Custom-op implementations run below autograd, so the batch-norm backward is written out:
        # dz = dy·act'(z); grad_w = Σ dz·x̂, grad_b = Σ dz; grad_x = w·rstd·(dz − mean(dz) − x̂·mean(dz·x̂))
        # in training (the batch statistics depend on x), w·rstd·dz in eval.
        need_x, need_weight, need_bias = output_mask
        compute = save_mean.dtype
        w, b = weight.to(compute), bias.to(compute)
        grad_x = torch.zeros_like(x, memory_format=torch.contiguous_format) if need_x else _empty(x)
        grad_w = weight.new_zeros(weight.shape, dtype=compute)
        grad_b = torch.zeros_like(grad_w)
        for i, c in enumerate(channels):
            start, stop = offsets[i], offsets[i + 1]
            if c == 0 or stop == start:
                continue
            mean, rstd = save_mean[i, :c], save_rstd[i, :c]
            xhat = (x[start:stop, :c].to(compute) - mean) * rstd
            dz = _activation_grad(activation, xhat * w[:c] + b[:c], grad_y[start:stop, :c].to(compute))
            sum_dz, sum_dz_xhat = dz.sum(0), (dz * xhat).sum(0)
            grad_w[:c] += sum_dz_xhat
            grad_b[:c] += sum_dz
            if need_x:
                if training:
                    n = stop - start
                    dz = dz - sum_dz / n - xhat * (sum_dz_xhat / n)
                grad_x[start:stop, :c] = (w[:c] * rstd * dz).to(x.dtype)
        return (
            grad_x,
            grad_w.to(weight.dtype) if need_weight else _empty(x),
            grad_b.to(bias.dtype) if need_bias else _empty(x),
        )


class CppBackend(PackedBatchNormBackend):
    name = "C++"
    supports = (
        "CPU; float32/float64, bfloat16 through float32 (parameters float32 or x's dtype); "
        "two passes forward, two backward (csrc/ops/cpu)"
    )
    OPS = ("_packed_batch_norm_act_forward", "_packed_batch_norm_act_backward")
    DTYPES = (torch.float32, torch.float64, torch.bfloat16)

    def not_supported_reasons(self, problem: PackedBatchNormProblem) -> list[str]:
        if missing := backends.extension_reasons(*self.OPS):
            return missing
        reasons = []
        if problem.device_type != "cpu":
            reasons.append(f"serves CPU tensors only, got {problem.device_type}")
        if problem.dtype not in self.DTYPES:
            reasons.append(f"dtype {problem.dtype} is not compiled (float32, float64, bfloat16)")
        return reasons

    def forward(
        self, x, offsets, channels, weight, bias, running_mean, running_var, training, factors, eps, activation, order
    ):
        return torch.ops.tofa_fast._packed_batch_norm_act_forward(
            x, offsets, channels, weight, bias, running_mean, running_var, training, factors, eps, activation, order
        )

    def backward(
        self, grad_y, x, offsets, channels, weight, bias, save_mean, save_rstd, training, activation, output_mask
    ):
        return torch.ops.tofa_fast._packed_batch_norm_act_backward(
            grad_y, x, offsets, channels, weight, bias, save_mean, save_rstd, training, activation, output_mask
        )


REFERENCE = ReferenceBackend()
CPP = CppBackend()

# Device type → backends in order of preference; devices not listed get the reference. (No CUDA or
# Triton kernel yet: CUDA tensors take the reference.)
DISPATCH_TABLE: dict[str, tuple[PackedBatchNormBackend, ...]] = {"cpu": (CPP, REFERENCE)}
FALLBACK: tuple[PackedBatchNormBackend, ...] = (REFERENCE,)

# The pin, the selection and the refusal messages are shared with elastic_dwconv2d (.dispatch_table).
BACKEND_TABLE: BackendTable[PackedBatchNormProblem, PackedBatchNormBackend] = BackendTable(
    "packed_batch_norm_act", DISPATCH_TABLE, FALLBACK
)
BACKENDS = BACKEND_TABLE.backends
use_backend = BACKEND_TABLE.use_backend  # "C++" or "reference"
pinned_backend = BACKEND_TABLE.pinned_backend
candidates = BACKEND_TABLE.candidates
select_backend_for = BACKEND_TABLE.select_backend_for
explain = BACKEND_TABLE.explain


@contextlib.contextmanager
def cpu_channel_chunks(enabled: bool = True) -> Iterator[None]:
    """Inside the block, the C++ kernel's normalise and grad_x passes take channel chunks on narrow
    segments (``enabled``, the default) or walk every segment row by row; the previous setting comes
    back after it (process-wide; csrc/ops/cpu/packed_batch_norm_cpu.cpp says where each is faster). The
    values do not change: this is for benchmarks that measure what the chunks buy, and for tests that
    check so."""
    previous = torch.ops.tofa_fast._set_packed_bn_cpu_chunks(enabled)
    try:
        yield
    finally:
        torch.ops.tofa_fast._set_packed_bn_cpu_chunks(previous)


def select_backend(x: torch.Tensor, weight: torch.Tensor) -> PackedBatchNormBackend:
    """The backend that serves this call."""
    return select_backend_for(PackedBatchNormProblem.of(x, weight))


def describe_dispatch() -> list[str]:
    """Lines for ``tofa-fast info``: per device, which backend serves a typical call and why others do not."""
    lines = []
    for device in (*DISPATCH_TABLE, "cuda"):
        for dtype, label in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16 x, float32 parameters")):
            problem = PackedBatchNormProblem(device, dtype, torch.float32)
            chosen = select_backend_for(problem)
            lines.append(f"{device}, {label}: served by {chosen.name}")
            for name, reasons in explain(problem):
                if BACKENDS[name] is chosen:
                    break
                lines.append(f"    {name:<9} no: {'; '.join(reasons)}")
    return lines


# ---- the operator -------------------------------------------------------------------------------


def _check(x, offsets, channels, weight, bias, running_mean, running_var, training, factors, eps, activation, order):
    check_packed_batch_norm_args(
        x, offsets, channels, weight, bias, running_mean, running_var, training, factors, activation, order
    )
    check_packed_batch_norm_tensors(x, weight, bias, running_mean, running_var, eps)


@torch.library.custom_op("tofa_fast::packed_batch_norm_act", mutates_args=())
def _packed_batch_norm_act_op(
    x: torch.Tensor,
    offsets: list[int],
    channels: list[int],
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum_factors: list[float],
    eps: float,
    activation: str,
    update_order: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, save_mean, save_rstd, new_running_mean, new_running_var): see the module docstring. The
    running statistics come back updated in new tensors ((0,) when None); the inputs are not touched."""
    _check(
        x,
        offsets,
        channels,
        weight,
        bias,
        running_mean,
        running_var,
        training,
        momentum_factors,
        eps,
        activation,
        update_order,
    )
    new_mean = running_mean.clone() if running_mean is not None else None
    new_var = running_var.clone() if running_var is not None else None
    y, save_mean, save_rstd = select_backend(x, weight).forward(
        x, offsets, channels, weight, bias, new_mean, new_var, training, momentum_factors, eps, activation, update_order
    )
    if new_mean is None:
        new_mean, new_var = _empty(x), _empty(x)
    return y, save_mean, save_rstd, new_mean, new_var


@_packed_batch_norm_act_op.register_fake
def _(
    x,
    offsets,
    channels,
    weight,
    bias,
    running_mean,
    running_var,
    training,
    momentum_factors,
    eps,
    activation,
    update_order,
):
    _check(
        x,
        offsets,
        channels,
        weight,
        bias,
        running_mean,
        running_var,
        training,
        momentum_factors,
        eps,
        activation,
        update_order,
    )
    stats = x.new_empty((len(channels), x.shape[1]), dtype=compute_dtype(x.dtype))
    new_mean = torch.empty_like(running_mean) if running_mean is not None else _empty(x)
    new_var = torch.empty_like(running_var) if running_var is not None else _empty(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats), new_mean, new_var


@torch.library.custom_op("tofa_fast::packed_batch_norm_act_backward", mutates_args=())
def _packed_batch_norm_act_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    offsets: list[int],
    channels: list[int],
    weight: torch.Tensor,
    bias: torch.Tensor,
    save_mean: torch.Tensor,
    save_rstd: torch.Tensor,
    training: bool,
    activation: str,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (x, weight, bias), each in its input's dtype; entries masked off in ``output_mask``
    are empty (0,)."""
    return select_backend(x, weight).backward(
        grad_y, x, offsets, channels, weight, bias, save_mean, save_rstd, training, activation, output_mask
    )


@_packed_batch_norm_act_backward_op.register_fake
def _(grad_y, x, offsets, channels, weight, bias, save_mean, save_rstd, training, activation, output_mask):
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if output_mask[0] else _empty(x)
    grad_weight = torch.empty_like(weight) if output_mask[1] else _empty(x)
    grad_bias = torch.empty_like(bias) if output_mask[2] else _empty(x)
    return grad_x, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    x, offsets, channels, weight, bias, _, _, training, _, _, activation, _ = inputs
    _, save_mean, save_rstd, new_mean, new_var = output
    ctx.mark_non_differentiable(save_mean, save_rstd, new_mean, new_var)
    ctx.offsets, ctx.channels, ctx.training, ctx.activation = offsets, channels, training, activation
    # A pin (use_backend) is a context variable; the autograd engine may run the backward on another
    # thread, where it is unset: the backward re-enters the forward's pin.
    ctx.pinned_backend = pinned_backend()
    ctx.save_for_backward(x, weight, bias, save_mean, save_rstd)


def _backward(ctx, grad_y, *_grads_of_non_differentiable_outputs):
    x, weight, bias, save_mean, save_rstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [bool(needs[0]), bool(needs[3]), bool(needs[4])]  # x, weight, bias
    grads: list[torch.Tensor | None] = [None] * len(needs)
    if not any(mask):
        return tuple(grads)
    with use_backend(ctx.pinned_backend) if ctx.pinned_backend else contextlib.nullcontext():
        grad_x, grad_weight, grad_bias = _packed_batch_norm_act_backward_op(
            grad_y, x, ctx.offsets, ctx.channels, weight, bias, save_mean, save_rstd, ctx.training, ctx.activation, mask
        )
    for index, need, grad in ((0, mask[0], grad_x), (3, mask[1], grad_weight), (4, mask[2], grad_bias)):
        grads[index] = grad if need else None
    return tuple(grads)


_packed_batch_norm_act_op.register_autograd(_backward, setup_context=_setup_context)


# ---- the eager path (eager_path.py) ---------------------------------------------------------------


class _EagerPackedBatchNormAct(torch.autograd.Function):
    """The op's forward and backward on one backend, without the custom op's dispatch.

    ``args`` are the op's arguments in its order; x, weight and bias come again after them, where
    autograd sees them. The running statistics are updated in place by the backend, as
    ``F.batch_norm`` does: not graph inputs."""

    @staticmethod
    def forward(ctx, backend: PackedBatchNormBackend, args: tuple, x, weight, bias):
        _, offsets, channels, _, _, _, _, training, _, _, activation, _ = args
        y, save_mean, save_rstd = backend.forward(*args)
        ctx.backend, ctx.layout = backend, (offsets, channels, training, activation)
        ctx.save_for_backward(x, weight, bias, save_mean, save_rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # first order, as the op
    def backward(ctx, grad_y):
        x, weight, bias, save_mean, save_rstd = ctx.saved_tensors
        _, _, *needs = ctx.needs_input_grad  # x, weight, bias
        if not any(needs):
            return None, None, None, None, None
        offsets, channels, training, activation = ctx.layout
        grads = ctx.backend.backward(
            grad_y, x, offsets, channels, weight, bias, save_mean, save_rstd, training, activation, needs
        )
        return (None, None, *(g if need else None for g, need in zip(grads, needs)))


def packed_batch_norm_act(
    x: torch.Tensor,
    offsets: Sequence[int],
    channels: Sequence[int],
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum_factors: Sequence[float],
    eps: float,
    activation: str = "none",
    update_order: Sequence[int] | None = None,
) -> torch.Tensor:
    """Batch norm + ``activation`` of the packed rows ``x`` (P, C), segment by segment.

    Segment ``i`` holds rows ``offsets[i]:offsets[i + 1]`` and its first ``channels[i]`` columns; it is
    normalised with its own batch statistics in training (running statistics in eval), scaled by
    ``weight``, shifted by ``bias``, passed through ``activation`` (none, relu, relu6, hswish, swish),
    and its other columns come out as exact zeros. In training, ``running_mean`` / ``running_var``
    (optional then) are updated in place segment after segment in ``update_order`` (default: segment
    order) with ``momentum_factors[i]`` as ``F.batch_norm``'s momentum; a factor of 0 updates nothing.
    The semantics are :func:`packed_batch_norm_act_reference`'s (module
    :mod:`tofa_fast.ops.packed_batch_norm_reference`).

    Args:
        x: (P, C); float32, float64, bfloat16 or float16.
        weight, bias, running_mean, running_var: (C,), x's dtype or float32 with a bfloat16/float16 x.

    Returns:
        (P, C) in x's dtype. Gradients flow to x, weight and bias (first order).

    Raises:
        ValueError: an argument breaks the layout rules, a dtype or a device does not fit, or a
            training segment with active channels has a single row.
    """
    order = list(range(len(channels))) if update_order is None else [int(i) for i in update_order]
    factors = [float(f) for f in momentum_factors]
    offsets, channels = [int(o) for o in offsets], [int(c) for c in channels]
    _check(x, offsets, channels, weight, bias, running_mean, running_var, training, factors, eps, activation, order)
    args = (x, offsets, channels, weight, bias, running_mean, running_var, bool(training), factors, float(eps))
    args += (activation, order)
    if takes_eager_path(x, weight, bias, running_mean, running_var):
        return _EagerPackedBatchNormAct.apply(select_backend(x, weight), args, x, weight, bias)
    y, _, _, new_mean, new_var = _packed_batch_norm_act_op(*args)
    if training and running_mean is not None and any(factors):
        with torch.no_grad():  # buffers: the write-back is not part of the graph
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return y
