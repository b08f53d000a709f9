"""CUDA kernels of elastic_dwconv2d: they compile wherever nvcc is, and match the reference on a GPU.

The compile check builds every kernels/cuda/*.cu into an object file against this torch's headers
(an object is enough to catch syntax, template and API errors without a GPU or a full link).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest
import torch
from elastic_dwconv_cases import DwconvCase, assert_backend_matches_oracle, make_inputs

import tofa_fast
from tofa_fast.ops import elastic_dwconv_dispatch as dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "kernels", "cuda", "**", "*.cu"), recursive=True))


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _compile_skip_reason() -> str | None:
    if _nvcc() is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if torch.version.cuda is None:
        return "this PyTorch is a CPU-only build (no c10/cuda headers to compile against)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_compile_skip_reason() is not None, reason=_compile_skip_reason() or "")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: os.path.relpath(p, ROOT))
def test_cuda_sources_compile(source, tmp_path):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    arch = os.environ.get("TOFA_FAST_TEST_CUDA_ARCH", "90")  # Hopper: the GPU the benchmarks run on
    command = [
        _nvcc(),
        "-c",
        source,
        "-o",
        str(tmp_path / "kernel.o"),
        "-std=c++20",
        "-Xcompiler",
        "-fPIC",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *COMMON_NVCC_FLAGS,
        *[f"-I{path}" for path in include_paths()],
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "kernel.o").stat().st_size > 0


gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_cuda_kernels = pytest.mark.skipif(
    not torch.cuda.is_available()
    or bool(dispatch.CUDA.not_supported_reasons(dispatch.DwconvProblem("cuda", torch.float32, 3, 7, 1, 2))),
    reason="needs a CUDA device and the extension built with the CUDA kernels",
)

GPU_CASES = [
    DwconvCase(32, 19, 33, 12, 11, 7, 3, 2, "contiguous", True),
    DwconvCase(2, 16, 16, 9, 7, 7, 7, 1, "channels_last", False),
    DwconvCase(3, 5, 8, 8, 8, 5, 5, 2, "strided", False, torch.float64),
    DwconvCase(2, 6, 8, 7, 9, 7, 5, 1, "contiguous", True, torch.float64),
    DwconvCase(4, 24, 32, 14, 14, 7, 7, 1, "channels_last", False, torch.bfloat16),
    DwconvCase(4, 24, 32, 14, 14, 5, 3, 2, "contiguous", True, torch.float16),
    # Mixed precision, what autocast hands the op: x bf16/fp16, weights and transforms fp32.
    DwconvCase(8, 24, 32, 14, 13, 7, 3, 1, "channels_last", True, torch.bfloat16, torch.float32),
    DwconvCase(4, 17, 20, 9, 11, 5, 3, 2, "contiguous", True, torch.float16, torch.float32),
    DwconvCase(4, 16, 16, 8, 8, 7, 7, 2, "strided", False, torch.bfloat16, torch.float32),
]


@gpu
@needs_cuda_kernels
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_cuda_matches_reference(case):
    assert_backend_matches_oracle("CUDA", case, "cuda")


@gpu
@needs_cuda_kernels
@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32)])
def test_cuda_opcheck(dtype, weight_dtype):
    case = DwconvCase(2, 5, 6, 7, 6, 7, 3, 2, "channels_last", True, dtype, weight_dtype)
    x, weight, transforms = make_inputs(case, device="cuda")
    args = (x.requires_grad_(), weight.requires_grad_(), 3, 2, [m.requires_grad_() for m in transforms])
    with dispatch.use_backend("CUDA"):
        torch.library.opcheck(torch.ops.tofa_fast.elastic_dwconv2d.default, args)


@gpu
@needs_gpu
@needs_cuda_kernels
def test_cuda_dispatch_picks_the_first_backend_that_serves():
    """The CUDA kernels lead the CUDA row; Triton, a fallback, has no reason to refuse either."""
    x, weight = torch.randn(2, 4, 6, 6, device="cuda"), torch.randn(4, 1, 7, 7, device="cuda")
    chosen = dispatch.select_backend(x, weight, 3, 1, [])
    explained = dispatch.explain(dispatch.DwconvProblem.of(x, weight, 3, 1, []))
    assert chosen.name == "CUDA" == next(name for name, reasons in explained if not reasons)
    if not dispatch.TRITON.not_supported_reasons(dispatch.DwconvProblem.of(x, weight, 3, 1, [])):
        with dispatch.use_backend("Triton"):
            assert dispatch.select_backend(x, weight, 3, 1, []).name == "Triton"


@gpu
@needs_gpu
def test_supernet_trains_under_cuda_bf16_autocast():
    """What the trainer does on a GPU: bf16 autocast, channels_last, fp32 master weights and grads."""
    net = tofa_fast.Supernet("digits", num_classes=10).cuda().to(memory_format=torch.channels_last).train()
    x = torch.randn(8, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(net(x), torch.arange(8, device="cuda"))
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
