"""Builds tofa_fast and its compiled extension ``tofa_fast._C``.

* C++ sources: every ``csrc/**/*.cpp`` — always (op schemas, CPU kernels, estimator).
* CUDA sources: every ``kernels/cuda/**/*.cu`` — when nvcc and a CUDA build of PyTorch are present
  and a GPU is visible, or when forced with ``TOFA_FAST_BUILD_CUDA=1`` (CI uses this to compile the
  CUDA code on a machine without a GPU). ``TOFA_FAST_BUILD_CUDA=0`` turns CUDA off.
* ``TOFA_FAST_BUILD_EXTENSION=0`` skips the extension entirely; the package then runs on its
  pure-PyTorch fallbacks and ``tofa-fast info`` says so.

Build with ``pip install --no-build-isolation -e .`` after installing torch, so pip does not fetch a
second copy of torch into an isolated build environment. ``scripts/setup_env.sh`` does all of it.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(message: str) -> None:
    print(f"[tofa_fast setup] {message}", file=sys.stderr)


def _want_cuda(torch, cuda_home: str | None) -> tuple[bool, str]:
    flag = os.environ.get("TOFA_FAST_BUILD_CUDA", "").strip()
    if flag == "0":
        return False, "TOFA_FAST_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return False, "this PyTorch is a CPU-only build"
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return False, "nvcc not found (set CUDA_HOME)"
    if flag == "1":
        return True, "forced by TOFA_FAST_BUILD_CUDA=1"
    if not torch.cuda.is_available():
        return False, "no GPU visible (set TOFA_FAST_BUILD_CUDA=1 to compile the CUDA kernels anyway)"
    return True, "nvcc, CUDA PyTorch and a GPU are present"


def _extensions():
    if os.environ.get("TOFA_FAST_BUILD_EXTENSION", "1").strip() == "0":
        _log("TOFA_FAST_BUILD_EXTENSION=0: building no extension (pure-PyTorch fallbacks only)")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("kernels", "cuda", "**", "*.cu"), recursive=True))
    with_cuda, why = _want_cuda(torch, CUDA_HOME)
    # -fopenmp: at::parallel_for is header-inline OpenMP; without the flag it silently runs serial.
    # -Wno-psabi: GCC notes that a 32-byte vector returned by value from code compiled without AVX
    # passes differently from AVX code; the packed batch norm's lane helpers do so, always inlined, and
    # no vector crosses a call between separately compiled code.
    cxx_flags = ["-O3", "-fopenmp", "-Wno-psabi", "-DTORCH_EXTENSION_NAME=_C"]
    link_flags = ["-fopenmp"]
    if with_cuda and cuda_sources:
        _log(f"building C++ + CUDA extension ({why}): {len(cpp_sources)} C++ and {len(cuda_sources)} CUDA sources")
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not arch_list and not torch.cuda.is_available():
            # No GPU to query: compile for Hopper (the GPU machine we benchmark on) and Ampere.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        ext = CUDAExtension(
            "tofa_fast._C",
            cpp_sources + cuda_sources,
            define_macros=[("TOFA_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    else:
        _log(f"building CPU-only C++ extension ({why}): {len(cpp_sources)} C++ sources")
        ext = CppExtension("tofa_fast._C", cpp_sources, extra_compile_args=cxx_flags, extra_link_args=link_flags)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

# Triton kernels live in kernels/triton (the folder shows the architecture) and are installed
# as the subpackage tofa_fast.triton_kernels.
packages = find_packages(include=["tofa_fast", "tofa_fast.*"])
package_dir = {}
if os.path.exists(os.path.join(ROOT, "kernels", "triton", "__init__.py")):
    packages.append("tofa_fast.triton_kernels")
    package_dir["tofa_fast.triton_kernels"] = os.path.join("kernels", "triton")

setup(
    packages=packages,
    package_dir=package_dir,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
