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
from elastic_dwconv_cases import DwconvCase, assert_backend_matches_oracle, grid_cases, make_inputs

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
def test_cuda_sources_compile(tmp_path):
    """Every kernels/cuda/*.cu compiles for sm_90, as many at once as there are cores (one
    translation unit per dtype for the tiled kernels: minutes one after another on two cores).

    Device code is compiled without optimisation (``-Xcicc -O0 -Xptxas -O0``): the front end, the
    PTX generator and ptxas still see every kernel, so syntax, template, API and resource errors
    (static shared memory, launch bounds) fail here as they would in the real build, at 37 s a
    translation unit instead of 65 s. The real build (setup.py, scripts/gpu_check.sh) optimises."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    assert CUDA_SOURCES, "no kernels/cuda/*.cu found"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    arch = os.environ.get("TOFA_FAST_TEST_CUDA_ARCH", "90")  # Hopper: the GPU the benchmarks run on

    def command(source: str) -> list[str]:
        return [
            _nvcc(),
            "-c",
            source,
            "-o",
            str(tmp_path / (os.path.basename(source) + ".o")),
            "-std=c++20",
            "-Xcompiler",
            "-fPIC",
            f"-gencode=arch=compute_{arch},code=sm_{arch}",
            "-Xcicc",
            "-O0",
            "-Xptxas",
            "-O0",
            "-DTORCH_API_INCLUDE_EXTENSION_H",
            "-DTORCH_EXTENSION_NAME=_C",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *COMMON_NVCC_FLAGS,
            *[f"-I{path}" for path in include_paths()],
        ]

    pending, running, failures = list(CUDA_SOURCES), [], []
    while pending or running:
        while pending and len(running) < (os.cpu_count() or 1):
            source = pending.pop(0)
            running.append(
                (source, subprocess.Popen(command(source), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            )
        source, process = running.pop(0)
        output, _ = process.communicate(timeout=900)
        if process.returncode != 0:
            failures.append(f"{' '.join(command(source))}\n{output}")
        elif not (tmp_path / (os.path.basename(source) + ".o")).stat().st_size:
            failures.append(f"{source}: empty object file")
    assert not failures, "\n\n".join(failures)


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


# The tiled kernels (kernels/cuda/elastic_dwconv_tiled.cuh, K ∈ {3, 5, 7}, stride 1/2, not float64) at
# sizes that leave partial tiles everywhere: several channel tiles (channels_last lanes walk 32
# channels), several column tiles (NCHW lanes walk 32 columns), row strips cut short, the batch split
# into chunks for the filter gradient, maps narrower than a warp. The grid cases add odd small maps
# in all three layouts; float64 cases there run the per-element kernels.
TILED_CASES = [
    DwconvCase(32, 40, 48, 30, 29, 7, 7, 2, "channels_last", False),
    DwconvCase(32, 40, 48, 30, 29, 7, 7, 1, "contiguous", False),
    DwconvCase(17, 70, 72, 45, 37, 5, 5, 1, "channels_last", True),
    DwconvCase(17, 33, 72, 45, 67, 5, 3, 2, "contiguous", True),
    DwconvCase(64, 130, 144, 9, 9, 7, 3, 1, "channels_last", True, torch.bfloat16, torch.float32),
    DwconvCase(64, 130, 144, 9, 9, 7, 5, 2, "contiguous", True, torch.bfloat16, torch.float32),
    DwconvCase(5, 96, 96, 57, 56, 7, 7, 2, "strided", False, torch.float16),
    DwconvCase(3, 7, 8, 1, 70, 3, 3, 2, "contiguous", False),
    DwconvCase(3, 7, 8, 70, 1, 3, 3, 1, "channels_last", False, torch.bfloat16),
]


@gpu
@needs_cuda_kernels
@pytest.mark.parametrize(
    "case",
    TILED_CASES + grid_cases(36, seed=11, dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64)),
    ids=str,
)
def test_cuda_tiled_kernels_match_reference(case):
    assert_backend_matches_oracle("CUDA", case, "cuda")


@gpu
@needs_cuda_kernels
def test_cuda_kernels_outside_the_tiles_match_reference():
    """(k, stride) pairs with no tiled kernel run the per-element kernels."""
    for case in [
        DwconvCase(4, 6, 8, 11, 10, 9, 9, 1, "channels_last", False),
        DwconvCase(4, 6, 8, 11, 10, 3, 3, 3, "contiguous", False),
        DwconvCase(4, 6, 8, 11, 10, 1, 1, 1, "channels_last", False),
    ]:
        assert_backend_matches_oracle("CUDA", case, "cuda")


@gpu
@needs_cuda_kernels
def test_cuda_filter_gradient_is_deterministic():
    """No atomics in the filter gradient: two runs give the same bits."""
    case = DwconvCase(32, 40, 48, 30, 29, 7, 7, 1, "channels_last", False)
    x, weight, transforms = make_inputs(case, device="cuda")
    grad_output = torch.randn(32, 40, 30, 29, device="cuda").contiguous(memory_format=torch.channels_last)
    with dispatch.use_backend("CUDA"):
        grads = [
            torch.autograd.grad(tofa_fast.ops.elastic_dwconv2d(x, w, 7, 1), w, grad_output)[0]
            for w in (weight.clone().requires_grad_(), weight.clone().requires_grad_())
        ]
    assert torch.equal(grads[0], grads[1])


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
