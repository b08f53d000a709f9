"""Which compiled backends are usable here, and why the missing ones are missing: the one place.

Every reason a compiled backend cannot run is worded here once. The op dispatch table
(:mod:`tofa_fast.ops.elastic_dwconv_dispatch`), the estimator (:class:`tofa_fast.estimator.Estimator`)
and ``tofa-fast info`` all read these functions, so what ``info`` says is what the code does.

Each ``*_reasons`` function returns the reasons a backend cannot serve (an empty list: it can);
:func:`statuses` and :func:`estimator_status` turn them into the :class:`BackendStatus` lines ``info``
prints.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from dataclasses import dataclass

import torch

from . import _extension

REBUILD_HINT = "rebuild it: pip install --no-build-isolation -e ."
BUILT_WITHOUT_CUDA = (
    "the extension was built without CUDA kernels (needs nvcc + CUDA PyTorch + a GPU at build time, "
    "or TOFA_FAST_BUILD_CUDA=1)"
)
# The Triton kernel module whose decoration fixed interpreter vs compiler mode, once it is imported.
TRITON_KERNELS_MODULE = "tofa_fast.triton_kernels.elastic_dwconv"


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


# ---- reasons ------------------------------------------------------------------------------------


def extension_reasons(*ops: str) -> list[str]:
    """Why the compiled extension, holding every op ``torch.ops.tofa_fast.<name>`` of ``ops``, is unusable."""
    if not _extension.available():
        return [_extension.LOAD_ERROR or "the C++ extension is not loaded"]
    missing = [op for op in ops if not hasattr(torch.ops.tofa_fast, op)]
    if missing:
        return [f"the loaded extension has no {', '.join(missing)} kernel (a stale build: {REBUILD_HINT})"]
    return []


def cuda_build_reasons(*ops: str) -> list[str]:
    """Why the extension holds no usable CUDA kernels (whether a GPU is visible is not asked)."""
    if missing := extension_reasons(*ops):
        return missing
    return [] if _extension.built_with_cuda() else [BUILT_WITHOUT_CUDA]


def triton_package_reasons() -> list[str]:
    return [] if importlib.util.find_spec("triton") is not None else ["the triton package is not installed"]


def triton_interpreted() -> bool:
    """Whether the Triton kernels run in interpreter mode (on CPU tensors).

    Triton decides interpreter vs compiler when a kernel is decorated, so once the kernel module is
    imported its own flag is the truth; before that, the environment variable decides.
    """
    module = sys.modules.get(TRITON_KERNELS_MODULE)
    if module is not None:
        return bool(module.INTERPRETED)
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_device_reasons(device_type: str) -> list[str]:
    """Why the Triton kernels cannot run on tensors of ``device_type`` here."""
    if triton_interpreted():
        if device_type != "cpu":
            return ["the kernels were loaded in interpreter mode (TRITON_INTERPRET=1): CPU tensors only"]
        return []
    if device_type != "cuda":
        return [f"serves CUDA tensors only, got {device_type} (TRITON_INTERPRET=1 runs it on CPU)"]
    if not torch.cuda.is_available():
        return ["no CUDA device is visible"]
    return []


def estimator_reasons() -> list[str]:
    """Why the estimator's C++ table sums (``torch.ops.tofa_fast.estimator_sum``) are unusable."""
    return extension_reasons("estimator_sum")


# ---- statuses for `tofa-fast info` --------------------------------------------------------------


def cpp_status() -> BackendStatus:
    if missing := extension_reasons():
        return BackendStatus("C++", False, "; ".join(missing))
    threads = torch.get_num_threads()
    omp = "OpenMP" if _extension.built_with_openmp() else "no OpenMP (single-threaded kernels)"
    detail = f"CPU kernels, {omp}, {threads} threads"
    if hasattr(torch.ops.tofa_fast, "_elastic_dwconv2d_cpu_isa"):
        # Which of the compiled SIMD paths this CPU runs (TOFA_FAST_CPU_ISA caps it).
        detail += f", depthwise tiles: {torch.ops.tofa_fast._elastic_dwconv2d_cpu_isa()}"
    return BackendStatus("C++", True, detail)


def cuda_status() -> BackendStatus:
    if not _extension.available():
        return BackendStatus("CUDA", False, "the C++ extension is not loaded (see C++)")
    if missing := cuda_build_reasons():
        return BackendStatus("CUDA", False, "; ".join(missing))
    if not torch.cuda.is_available():
        return BackendStatus("CUDA", False, "CUDA kernels built, but no CUDA device is visible")
    return BackendStatus("CUDA", True, f"CUDA kernels on {torch.cuda.get_device_name()}")


def triton_status() -> BackendStatus:
    if missing := triton_package_reasons():
        return BackendStatus("Triton", False, "; ".join(missing))
    if triton_interpreted():
        return BackendStatus("Triton", True, "interpreter mode (TRITON_INTERPRET=1): kernels run on CPU tensors")
    if not torch.cuda.is_available():
        return BackendStatus(
            "Triton", False, "triton is installed but no CUDA device is visible (TRITON_INTERPRET=1 runs it on CPU)"
        )
    return BackendStatus("Triton", True, f"Triton kernels on {torch.cuda.get_device_name()}")


def statuses() -> list[BackendStatus]:
    return [cpp_status(), cuda_status(), triton_status()]


def estimator_status() -> BackendStatus:
    """The estimator's table sums: the C++ kernel, or the NumPy reference it falls back to, and why."""
    if missing := estimator_reasons():
        return BackendStatus("estimator", False, "NumPy reference (table_sum_reference): " + "; ".join(missing))
    return BackendStatus("estimator", True, "C++ table sums (torch.ops.tofa_fast.estimator_sum)")
