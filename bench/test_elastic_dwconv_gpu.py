"""GPU benchmark of elastic_dwconv2d: the CUDA and Triton kernels vs PyTorch's depthwise path.

Same OFA MobileNetV3 w1.2 depthwise shapes as the CPU suite, at resolution 224 (the GPU affords it),
read off tofa_fast's ``ofa_mbv3`` preset (held equal to the ``ofa`` package's model by
tests/test_spaces.py) so that this suite runs where ``ofa`` is not installed, as on the GPU machine;
batch 32, float32 and bfloat16, forward and forward+backward, each in NCHW and in channels_last
(``... channels_last`` implementations: x and dy in that memory format). The baseline is the
reference (slice + transform + ``F.conv2d``, i.e. cuDNN's depthwise convolution) in either layout.
Besides the medians the summary reports the achieved memory bandwidth of tofa_fast's CUDA kernels
(bytes the op must move at least: read x, write y; backward also reads dy and writes dx; weights are
negligible) in GB/s, and the device's copy bandwidth measured in the same run (``copy_GBps``: a
2 GiB device-to-device copy, bytes read + written), the ceiling issue 11's "fwd ≥ 70% of copy
bandwidth" target is read against.

Skipped without a CUDA device. Run: ``python -m pytest bench/test_elastic_dwconv_gpu.py -p no:cacheprovider``
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import tofa_fast
from tofa_fast.nn import ElasticDepthwiseConv2d
from tofa_fast.ops import elastic_dwconv2d, elastic_dwconv2d_reference
from tofa_fast.ops.elastic_dwconv_dispatch import CUDA, TRITON, DwconvProblem, use_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SUITE = "elastic_dwconv_gpu"
RESOLUTION = 224
BATCH = 32
KERNELS = (7, 3)
DTYPES = (torch.float32, torch.bfloat16)
MODES = ("forward", "forward+backward")
# name -> (backend pinned, or None for the reference; memory format of x and dy)
IMPLS = {
    "tofa_fast": ("CUDA", torch.contiguous_format),
    "tofa_fast channels_last": ("CUDA", torch.channels_last),
    "reference": (None, torch.contiguous_format),
    "reference channels_last": (None, torch.channels_last),
}
# The Triton kernels only with TOFA_BENCH_TRITON=1: the dispatch never picks them on a GPU (cuDNN,
# then the CUDA kernels, come first), their 72 cases cost half a minute of compiles and timings, and
# their last measurement is in bench/results/elastic_dwconv_gpu.md.
if os.environ.get("TOFA_BENCH_TRITON") == "1":
    IMPLS["triton"] = ("Triton", torch.contiguous_format)
ROUNDS = 10
MAX_KERNEL = 7


def mobilenet_v3_depthwise_shapes(resolution: int) -> list[tuple[int, int, int]]:
    """Distinct (max channels, input size, stride) of the elastic depthwise convs of OFA's MobileNetV3
    w1.2 (its five elastic stages; the fixed first block is no DynamicSeparableConv2d in OFA either)."""
    net = tofa_fast.Supernet(tofa_fast.spaces.get("ofa_mbv3", resolutions=(resolution,)), num_classes=1000).eval()
    net.set_active(net.space.max_arch())
    seen: list[tuple[int, int, int]] = []

    def hook(module, args, _output):
        shape = (args[0].shape[1], args[0].shape[2], module.stride)
        if shape not in seen:
            seen.append(shape)

    handles = [m.register_forward_hook(hook) for m in net.stages[1:].modules() if isinstance(m, ElasticDepthwiseConv2d)]
    with torch.no_grad():
        net(torch.zeros(1, 3, resolution, resolution))
    for handle in handles:
        handle.remove()
    return seen


SHAPES = mobilenet_v3_depthwise_shapes(RESOLUTION) if torch.cuda.is_available() else []


@pytest.fixture(scope="module")
def copy_bandwidth() -> float:
    """The device's copy bandwidth in GB/s (bytes read + written), median of 10 copies of 2 GiB."""
    src = torch.randn(2**29, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * src.numel() * src.element_size() / times[len(times) // 2] / 1e9


def _case_id(shape, kernel, dtype) -> str:
    channels, size, stride = shape
    return f"C{channels} {size}x{size} s{stride} k{kernel} {str(dtype).removeprefix('torch.')}"


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"k{k}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"C{s[0]}_{s[1]}x{s[1]}_s{s[2]}")
def test_elastic_dwconv_gpu(benchmark, bench_registry, copy_bandwidth, shape, kernel, dtype, mode, impl):
    backend, memory_format = IMPLS[impl]
    problem = DwconvProblem("cuda", dtype, kernel, MAX_KERNEL, shape[2], (MAX_KERNEL - kernel) // 2)
    refusing = {"CUDA": CUDA, "Triton": TRITON}.get(backend)
    if refusing is not None and (reasons := refusing.not_supported_reasons(problem)):
        pytest.skip(f"{backend}: {'; '.join(reasons)}")
    channels, size, stride = shape
    case = _case_id(shape, kernel, dtype)
    for i in IMPLS:
        bench_registry.expect(SUITE, case, mode, i)
    torch.manual_seed(0)
    x = torch.randn(BATCH, channels, size, size, device="cuda", dtype=dtype)
    x = x.to(memory_format=memory_format).requires_grad_()
    weight = torch.randn(channels, 1, MAX_KERNEL, MAX_KERNEL, device="cuda", dtype=dtype, requires_grad=True)
    chain = [
        torch.eye(t * t, device="cuda", dtype=dtype, requires_grad=True) for t in range(MAX_KERNEL - 2, kernel - 1, -2)
    ]
    leaves = [x, weight, *chain]
    op = elastic_dwconv2d if backend else elastic_dwconv2d_reference
    out_size = (size + 2 * (kernel // 2) - kernel) // stride + 1
    grad_output = torch.randn(BATCH, channels, out_size, out_size, device="cuda", dtype=dtype)
    grad_output = grad_output.to(memory_format=memory_format)

    def run():
        if mode == "forward":
            with torch.no_grad():
                op(x, weight, kernel, stride, chain)
        else:
            torch.autograd.grad(op(x, weight, kernel, stride, chain), leaves, grad_output)
        torch.cuda.synchronize()

    with use_backend(backend) if backend else contextlib.nullcontext():
        run()
        benchmark.group = f"{case} {mode}"
        benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    median = benchmark.stats.stats.median
    bench_registry.record(SUITE, case, mode, impl, median)
    moved = (x.numel() + grad_output.numel()) * x.element_size() * (1 if mode == "forward" else 2)
    bandwidth = moved / median / 1e9
    benchmark.extra_info["GB/s"] = bandwidth
    meta = bench_registry.REGISTRY[SUITE]["meta"]
    meta["copy_GBps"] = round(copy_bandwidth, 1)
    if impl.startswith("tofa_fast"):
        meta.setdefault("bandwidth_GBps", {})[f"{case} {mode} {impl}"] = round(bandwidth, 1)
    bench_registry.REGISTRY[SUITE]["meta"]["description"] = (
        f"elastic_dwconv2d on OFA MobileNetV3 w1.2 depthwise shapes at resolution {RESOLUTION}, batch {BATCH}: "
        "tofa_fast CUDA kernel and Triton kernel vs the reference (cuDNN depthwise)."
    )
