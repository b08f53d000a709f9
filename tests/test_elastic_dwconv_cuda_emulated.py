"""The tiled CUDA kernels (kernels/cuda/elastic_dwconv_tiled.cuh), run on the CPU.

CI has no GPU, so the kernels' logic — thread-to-(channel, column) mapping in both layouts, row
strips, the interior / border split, the stride-2 input gradient's parity bookkeeping, the filter
gradient's batch chunks and block reduction — would otherwise be tested only when a GPU session
happens. tests/cuda_emulation compiles the very same source with the host compiler: every CUDA
thread an OS thread, ``__syncthreads`` a barrier (cuda_emulation.h). Outputs start as NaN, so an
element no thread writes fails the comparison. The oracle is PyTorch's convolution in float64.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "cuda_emulation", "tiled_kernels.cpp")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # relative to max |oracle|


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    from torch.utils.cpp_extension import load

    build = tmp_path_factory.mktemp("tiled_emulation")
    return load(
        "tofa_fast_tiled_emulated",
        [SOURCE],
        extra_cflags=["-O1", "-std=c++20", "-Wno-unknown-pragmas", "-DTOFA_FAST_CUDA_EMULATION"],
        build_directory=str(build),
    )


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor: no unit stride anywhere
        wide = torch.empty(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def _cases() -> list[tuple]:
    """(batch, channels, height, width, k, stride, layout, dtype): every (k, stride) in both main
    layouts, sizes that leave partial channel / column tiles and row strips, maps smaller than k."""
    rng = random.Random(5)
    cases = []
    for k in (3, 5, 7):
        for stride in (1, 2):
            for layout in ("contiguous", "channels_last"):
                cases.append(
                    (
                        rng.choice([1, 2, 3]),
                        rng.choice([5, 33, 40]),
                        rng.randint(1, 15),
                        rng.randint(2, 37),
                        k,
                        stride,
                        layout,
                        torch.float32,
                    )
                )
    # channels_last with ≥ 24 channels: the shared-memory tile kernel (two channel tiles here)
    cases += [
        (2, 40, rng.randint(1, 12), rng.randint(1, 20), k, s, "channels_last", torch.float32)
        for k in (3, 5, 7)
        for s in (1, 2)
    ]
    cases += [
        (2, 40, 13, 37, 7, 1, "contiguous", torch.float32),  # two column tiles of 32 lanes
        (2, 70, 9, 9, 5, 2, "channels_last", torch.float32),  # three channel tiles of 32 lanes
        (5, 9, 12, 12, 3, 1, "channels_last", torch.float32),  # batch chunks in the filter gradient
        (1, 3, 1, 1, 7, 1, "contiguous", torch.float32),  # a 1×1 map under a 7×7 filter
        (2, 6, 10, 9, 7, 2, "strided", torch.float32),
        (2, 6, 11, 8, 3, 1, "strided", torch.float32),
        (2, 33, 14, 14, 7, 1, "channels_last", torch.bfloat16),
        (3, 12, 15, 13, 5, 2, "contiguous", torch.bfloat16),
        (2, 20, 9, 10, 3, 2, "channels_last", torch.float16),
        # channels_last, 16-byte channel groups (NhwcTile::PackedCopier): a partial second channel
        # tile, whole interior tiles (the unchecked stores), float16 at stride 2
        (2, 48, 11, 18, 7, 1, "channels_last", torch.bfloat16),
        (1, 32, 19, 35, 3, 1, "channels_last", torch.bfloat16),
        (2, 40, 13, 21, 5, 2, "channels_last", torch.float16),
        # the stride-2 input gradient's dy tile (grad_input_stride2_nhwc_kernel): whole interior
        # tiles, odd sizes
        (1, 32, 17, 35, 7, 2, "channels_last", torch.bfloat16),
        (2, 48, 11, 9, 3, 2, "channels_last", torch.bfloat16),
        # maps at most 8 wide: 2 columns per thread at stride 1
        (2, 40, 7, 7, 7, 1, "channels_last", torch.bfloat16),
        (1, 36, 9, 8, 5, 1, "channels_last", torch.float32),
    ]
    return cases


def _id(case) -> str:
    n, c, h, w, k, s, layout, dtype = case
    return f"N{n}C{c}_{h}x{w}_k{k}s{s}_{layout}_{str(dtype).removeprefix('torch.')}"


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, name: str):
    assert not got.isnan().any(), f"{name}: elements left unwritten (NaN)"
    error = (got.double() - want).abs().max().item()
    scale = want.abs().max().item() + 1e-12
    assert error <= TOLERANCE[dtype] * scale, f"{name}: max error {error:.3g} (scale {scale:.3g})"


@pytest.mark.slow
@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_tiled_kernels_match_pytorch_convolution(kernels, case):
    n, c, h, w, k, stride, layout, dtype = case
    gen = torch.Generator().manual_seed(hash(_id(case)) % 2**31)
    x64 = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    filters = torch.randn(c, k * k, generator=gen)  # the float32 active filters
    x = _layout(x64.to(dtype), layout)
    w64 = filters.double().view(c, 1, k, k)
    xq = x.double()  # the values the kernel sees
    oh, ow = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
    grad_y = _layout(torch.randn(n, c, oh, ow, generator=gen, dtype=torch.float64).to(dtype), layout)
    channels_last = layout == "channels_last"

    y = kernels.forward(x, filters, k, stride, channels_last)
    _assert_close(y, F.conv2d(xq, w64, None, stride, k // 2, 1, c), dtype, "forward")

    want_dx, want_dw, _ = torch.ops.aten.convolution_backward(
        grad_y.double(), xq, w64, None, [stride] * 2, [k // 2] * 2, [1, 1], False, [0, 0], c, [True, True, False]
    )
    grad_x = kernels.grad_input(grad_y, filters, h, w, k, stride, channels_last)
    _assert_close(grad_x, want_dx, dtype, "grad input")
    for multiprocessors in (1, 64):  # one batch chunk, and as many as the batch allows
        grad_w = kernels.grad_filters(x, grad_y, k, stride, channels_last, multiprocessors)
        assert grad_w.dtype == torch.float32 and grad_w.shape == (c, k * k)
        _assert_close(grad_w, want_dw.view(c, k * k), dtype, f"grad filter ({multiprocessors} SMs)")
