"""Which backend computes ``elastic_dwconv2d`` for a call, and why the others do not (xformers-style).

A call is described by a :class:`DwconvProblem` (device, dtype, kernel sizes, stride, chain length:
no tensor data). Every backend declares what it supports through
:meth:`ElasticDwconvBackend.not_supported_reasons`; :data:`DISPATCH_TABLE` lists, per device type,
the backends in order of preference; the first one with no reason to refuse serves the call. The
reference (slice + transform + ``F.conv2d``) accepts everything, so it ends every list and serves
devices the table does not name. Why a compiled backend is missing here (no extension, a build
without CUDA, no triton, no device) is worded once in :mod:`tofa_fast.backends`; the backends add
what they refuse per call (dtype, kernel size, stride). ``tofa-fast info`` prints
:func:`describe_dispatch`, so what it says is what the op does.

The mechanics of the table — the pin, the selection, the refusal messages — are the same for every
op (``packed_batch_norm_act`` too) and live in :mod:`.dispatch_table`; this module declares only
the problem, the backends and the rows, and exposes :data:`BACKEND_TABLE`'s functions under the
names the op, ``tofa-fast info`` and the tests use (:func:`select_backend_for`, :func:`explain`).

Tests and benchmarks pin a backend with :func:`use_backend` (``"C++"``, ``"CUDA"``, ``"Triton"``,
``"reference"``); a pinned backend that refuses a call raises instead of falling back. The Triton
kernels under ``TRITON_INTERPRET=1`` are reachable on CPU tensors only that way.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .. import backends
from .dispatch_table import Backend, BackendTable
from .elastic_dwconv_reference import (
    MIXED_PRECISION_DTYPES,
    active_filter_backward_reference,
    active_filter_reference,
    elastic_dwconv2d_reference,
    output_memory_format,
)

Grads = tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]


@dataclass(frozen=True)
class DwconvProblem:
    """What a backend needs to know to accept or refuse a call (no tensor data)."""

    device_type: str
    dtype: torch.dtype
    kernel_size: int
    max_kernel_size: int
    stride: int
    num_transforms: int

    @classmethod
    def of(
        cls, x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, transforms: Sequence[torch.Tensor]
    ) -> DwconvProblem:
        return cls(x.device.type, x.dtype, kernel_size, weight.shape[-1], stride, len(transforms))


class ElasticDwconvBackend(Backend[DwconvProblem]):
    """One implementation of the op: forward and backward, plus the reasons it refuses a problem."""

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, transforms: list[torch.Tensor]
    ) -> torch.Tensor:
        """(N, C, H, W) → (N, C, H_out, W_out) in ``output_memory_format(x)``."""
        raise NotImplementedError

    def backward(
        self,
        grad_output: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        kernel_size: int,
        stride: int,
        transforms: list[torch.Tensor],
        output_mask: list[bool],
    ) -> Grads:
        """(grad_x, grad_weight, grad_transforms); masked-off entries are empty (0,) tensors."""
        raise NotImplementedError


class ReferenceBackend(ElasticDwconvBackend):
    name = "reference"
    supports = "every device and dtype (slice + transform + F.conv2d; ATen conv backward + the chain rule)"

    def not_supported_reasons(self, problem: DwconvProblem) -> list[str]:
        return []

    def forward(self, x, weight, kernel_size, stride, transforms):
        out = elastic_dwconv2d_reference(x, weight, kernel_size, stride, transforms)
        return out.contiguous(memory_format=output_memory_format(x))

    def backward(self, grad_output, x, weight, kernel_size, stride, transforms, output_mask):
        # Custom-op implementations run below autograd, so the reference backward is written out:
        # ATen's convolution backward for the depthwise part, then the transform chain rule.
        need_x, need_weight, need_transforms = output_mask
        channels = x.shape[1]
        filters = active_filter_reference(weight, kernel_size, transforms)[:channels].to(x.dtype).contiguous()
        need_filter = need_weight or need_transforms
        grad_x, grad_filter, _ = torch.ops.aten.convolution_backward(
            grad_output.to(x.dtype),
            x,
            filters,
            None,
            [stride, stride],
            [kernel_size // 2] * 2,
            [1, 1],
            False,
            [0, 0],
            channels,
            [need_x, need_filter, False],
        )

        def empty() -> torch.Tensor:  # masked-off gradients: distinct (0,) tensors (op outputs must not alias)
            return x.new_empty((0,))

        grad_x = grad_x.contiguous(memory_format=output_memory_format(x)) if need_x else empty()
        if not need_filter:
            return grad_x, empty(), [empty() for _ in transforms]
        # Mixed precision: the conv's filter gradient (compute dtype) enters the chain in the weight's dtype.
        grad_weight, grad_transforms = active_filter_backward_reference(
            grad_filter.to(weight.dtype), weight, transforms
        )
        return (
            grad_x,
            grad_weight if need_weight else empty(),
            [g.contiguous() if need_transforms else empty() for g in grad_transforms],
        )


class _CompiledOpBackend(ElasticDwconvBackend):
    """Backends living in the compiled extension: the torch dispatcher routes by device to the kernel."""

    OPS = ("_elastic_dwconv2d_compiled_forward", "_elastic_dwconv2d_compiled_backward")

    def forward(self, x, weight, kernel_size, stride, transforms):
        return torch.ops.tofa_fast._elastic_dwconv2d_compiled_forward(x, weight, kernel_size, stride, transforms)

    def backward(self, grad_output, x, weight, kernel_size, stride, transforms, output_mask):
        grad_x, grad_weight, grad_transforms = torch.ops.tofa_fast._elastic_dwconv2d_compiled_backward(
            grad_output, x, weight, kernel_size, stride, transforms, output_mask
        )
        return grad_x, grad_weight, list(grad_transforms)


class CppBackend(_CompiledOpBackend):
    name = "C++"
    supports = (
        "CPU; float32/float64, bfloat16/float16 through float32 (weights float32 or x's dtype); k in {1,3,5,7}; "
        "stride 1 or 2; NCHW and channels_last (csrc/ops/cpu)"
    )
    DTYPES = (torch.float32, torch.float64, *MIXED_PRECISION_DTYPES)
    KERNEL_SIZES = (1, 3, 5, 7)
    STRIDES = (1, 2)

    def not_supported_reasons(self, problem: DwconvProblem) -> list[str]:
        if missing := backends.extension_reasons(*self.OPS):
            return missing
        reasons = []
        if problem.device_type != "cpu":
            reasons.append(f"serves CPU tensors only, got {problem.device_type}")
        if problem.dtype not in self.DTYPES:
            reasons.append(f"dtype {problem.dtype} is not compiled (float32, float64, bfloat16, float16)")
        if problem.kernel_size not in self.KERNEL_SIZES:
            reasons.append(f"kernel_size {problem.kernel_size} is not compiled (1, 3, 5, 7)")
        if problem.stride not in self.STRIDES:
            reasons.append(f"stride {problem.stride} is not compiled (1, 2)")
        return reasons


class CudaBackend(_CompiledOpBackend):
    name = "CUDA"
    supports = "CUDA; float32/float64/float16/bfloat16 (float32 accumulation); any k; any stride; ≤ 8 transforms (kernels/cuda)"
    DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    MAX_TRANSFORMS = 8  # the active-filter kernel takes the matrices as one by-value parameter struct

    def not_supported_reasons(self, problem: DwconvProblem) -> list[str]:
        if missing := backends.cuda_build_reasons(*self.OPS):
            return missing
        reasons = []
        if problem.device_type != "cuda":
            reasons.append(f"serves CUDA tensors only, got {problem.device_type}")
        if problem.dtype not in self.DTYPES:
            reasons.append(f"dtype {problem.dtype} is not compiled (float32, float64, float16, bfloat16)")
        if problem.num_transforms > self.MAX_TRANSFORMS:
            reasons.append(f"{problem.num_transforms} transforms exceed the {self.MAX_TRANSFORMS} the kernel takes")
        return reasons


class TritonBackend(ElasticDwconvBackend):
    name = "Triton"
    supports = (
        "CUDA (CPU tensors under TRITON_INTERPRET=1); float32/float64/float16/bfloat16 (float32 accumulation); "
        "≤ 3 transforms (kernels/triton)"
    )
    DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    MAX_TRANSFORMS = 3  # one pointer argument per chain step; OFA's 7→5→3 needs two

    def not_supported_reasons(self, problem: DwconvProblem) -> list[str]:
        if missing := backends.triton_package_reasons():
            return missing
        reasons = backends.triton_device_reasons(problem.device_type)
        if problem.dtype not in self.DTYPES:
            reasons.append(f"dtype {problem.dtype} is not supported (float32, float64, float16, bfloat16)")
        if problem.num_transforms > self.MAX_TRANSFORMS:
            reasons.append(f"{problem.num_transforms} transforms exceed the {self.MAX_TRANSFORMS} the kernel takes")
        return reasons

    @staticmethod
    def _kernels():
        return importlib.import_module(backends.TRITON_KERNELS_MODULE)

    def forward(self, x, weight, kernel_size, stride, transforms):
        return self._kernels().elastic_dwconv2d_forward(x, weight, kernel_size, stride, transforms)

    def backward(self, grad_output, x, weight, kernel_size, stride, transforms, output_mask):
        return self._kernels().elastic_dwconv2d_backward(
            grad_output, x, weight, kernel_size, stride, transforms, output_mask
        )


REFERENCE = ReferenceBackend()
CPP = CppBackend()
CUDA = CudaBackend()
TRITON = TritonBackend()

# Device type → backends in order of preference. CUDA before Triton: no JIT warm-up, and it takes
# every dtype and kernel size. Devices not listed get the reference.
#
# Why not cuDNN (the reference on CUDA tensors) first? Tried, on an H200 (bench/results/gpu_check_h200.md,
# run 2), when our kernels were per-element: elastic training calls the convolution with ever new
# channel counts and kernel sizes, and with cuDNN first the default digits run took 7-20 s a step
# instead of 0.26 s, and the ofa_mbv3 fused step 349 ms instead of 254 ms (likely cuDNN's set-up of an
# execution plan for every new shape; a kernel of our own has none). Since then the tiled kernels
# (kernels/cuda/elastic_dwconv_tiled.cuh) run forward + backward at 1.36x the speed of cuDNN in its
# best layout, geometric mean on an H100, launch for launch (bench/results/gpu_check_h100.md).
DISPATCH_TABLE: dict[str, tuple[ElasticDwconvBackend, ...]] = {
    "cpu": (CPP, REFERENCE),
    "cuda": (CUDA, TRITON, REFERENCE),
}
FALLBACK: tuple[ElasticDwconvBackend, ...] = (REFERENCE,)

BACKEND_TABLE: BackendTable[DwconvProblem, ElasticDwconvBackend] = BackendTable(
    "elastic_dwconv2d", DISPATCH_TABLE, FALLBACK
)
BACKENDS = BACKEND_TABLE.backends  # name → backend: every one the table can reach, and so pin
# The table's functions under this module's names: the op selects through them, tests and
# benchmarks pin through them.
use_backend = BACKEND_TABLE.use_backend
pinned_backend = BACKEND_TABLE.pinned_backend
candidates = BACKEND_TABLE.candidates
select_backend_for = BACKEND_TABLE.select_backend_for
explain = BACKEND_TABLE.explain


@contextlib.contextmanager
def cpu_memory_plan(prefetch: bool = True, multi_block: bool = True) -> Iterator[None]:
    """Inside the block, the C++ kernels read and write channels-last memory with (or without) software
    prefetch and passes of several channel blocks (csrc/ops/cpu/dwconv_tiles_impl.h; both on by
    default, process-wide); the previous settings come back after it. The values never change: this is
    for benchmarks that measure what each buys, and for tests that check so."""
    ops = torch.ops.tofa_fast
    previous = ops._set_dwconv_cpu_prefetch(prefetch), ops._set_dwconv_cpu_multi_block(multi_block)
    try:
        yield
    finally:
        ops._set_dwconv_cpu_prefetch(previous[0])
        ops._set_dwconv_cpu_multi_block(previous[1])


def select_backend(
    x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, transforms: Sequence[torch.Tensor]
) -> ElasticDwconvBackend:
    """The backend that serves this call."""
    return select_backend_for(DwconvProblem.of(x, weight, kernel_size, stride, transforms))


def describe_dispatch() -> list[str]:
    """Lines for ``tofa-fast info``: per device, which backend serves a typical call and why others do not."""
    lines = []
    for device in DISPATCH_TABLE:
        # A typical supernet call: float32, OFA's 7→5→3 chain, stride 1.
        problem = DwconvProblem(device, torch.float32, 3, 7, 1, 2)
        chosen = select_backend_for(problem)
        lines.append(f"{device}: served by {chosen.name} (float32, k=3 of K=7, stride 1)")
        for name, reasons in explain(problem):
            backend = BACKENDS[name]
            verdict = "serves" if backend is chosen else ("fallback" if not reasons else "no: " + "; ".join(reasons))
            lines.append(f"    {name:<9} {verdict}")
            lines.append(f"    {'':<9} supports {backend.supports}")
        # The same call in mixed precision (bf16 autocast: x bfloat16, weights float32).
        mixed = DwconvProblem(device, torch.bfloat16, 3, 7, 1, 2)
        chosen = select_backend_for(mixed)
        lines.append(f"{device}, bfloat16 (autocast, float32 weights): served by {chosen.name}")
        for name, reasons in explain(mixed):
            if BACKENDS[name] is chosen:
                break
            lines.append(f"    {name:<9} no: {'; '.join(reasons)}")
    return lines
