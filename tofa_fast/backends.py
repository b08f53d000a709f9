"""Which compiled backends are usable here, and why the missing ones are missing.

Each backend reports a :class:`BackendStatus`; ``tofa-fast info`` prints them. Op dispatch tables
(``tofa_fast.ops``) consult the same functions, so what ``info`` says is what the ops do.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import dataclass

import torch

from . import _extension


def cpu_model() -> str:
    """The CPU's marketing name (benchmarks and latency tables record the machine they ran on)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    detail: str  # what it serves when available, why not otherwise


def cpp_status() -> BackendStatus:
    if _extension.available():
        threads = torch.get_num_threads()
        omp = "OpenMP" if _extension.built_with_openmp() else "no OpenMP (single-threaded kernels)"
        detail = f"CPU kernels, {omp}, {threads} threads"
        if hasattr(torch.ops.tofa_fast, "_elastic_dwconv2d_cpu_isa"):
            # Which of the compiled SIMD paths this CPU runs (TOFA_FAST_CPU_ISA caps it).
            detail += f", depthwise tiles: {torch.ops.tofa_fast._elastic_dwconv2d_cpu_isa()}"
        return BackendStatus("C++", True, detail)
    return BackendStatus("C++", False, _extension.LOAD_ERROR or "extension not loaded")


def cuda_status() -> BackendStatus:
    if not _extension.available():
        return BackendStatus("CUDA", False, "the C++ extension is not loaded (see C++)")
    if not _extension.built_with_cuda():
        return BackendStatus(
            "CUDA",
            False,
            "extension built without CUDA kernels (needs nvcc + CUDA PyTorch + a GPU at build time, "
            "or TOFA_FAST_BUILD_CUDA=1)",
        )
    if not torch.cuda.is_available():
        return BackendStatus("CUDA", False, "CUDA kernels built, but no CUDA device is visible")
    return BackendStatus("CUDA", True, f"CUDA kernels on {torch.cuda.get_device_name()}")


def triton_status() -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus("Triton", False, "the triton package is not installed")
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        return BackendStatus("Triton", True, "interpreter mode (TRITON_INTERPRET=1): kernels run on CPU tensors")
    if not torch.cuda.is_available():
        return BackendStatus(
            "Triton", False, "triton is installed but no CUDA device is visible (TRITON_INTERPRET=1 runs it on CPU)"
        )
    return BackendStatus("Triton", True, f"Triton kernels on {torch.cuda.get_device_name()}")


def statuses() -> list[BackendStatus]:
    return [cpp_status(), cuda_status(), triton_status()]
