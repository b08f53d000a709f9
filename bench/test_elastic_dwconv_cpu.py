"""CPU benchmark of elastic_dwconv2d: tofa_fast vs the PyTorch reference vs the `ofa` package.

Shapes: every distinct depthwise layer of OFA's MobileNetV3 supernet (``OFAMobileNetV3``, width 1.2,
kernels {3,5,7}, expands {3,4,6}, depths {2,3,4}) at its largest width: the max middle channels of
each stage and the spatial size the layer sees, read off the `ofa` model itself with forward hooks.
Input resolution 128 (the smallest OFA trains at, ``RESOLUTION``): at 224 the first stage's
144×112×112 maps make one reference forward+backward take tens of seconds on two cores, and the
shapes 128 gives (64² … 4² planes) still span the range of kernel behaviours. Batch 32, two threads.

Each shape runs with the largest kernel (k = 7, no transform) and with k = 3 through OFA's 7→5→3
transform chain; forward (under no_grad) and forward+backward (gradients of x, weight and matrices).
All three implementations read the same `ofa` module's parameters, and run back to back per shape.

Targets (asserted by ``test_targets``, so the run fails when they are missed): forward+backward at
least 3× faster than the reference in geometric mean over the shapes, and the forward never slower.

Run: ``python -m pytest bench/test_elastic_dwconv_cpu.py -p no:cacheprovider``
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from ofa.imagenet_classification.elastic_nn.modules.dynamic_op import DynamicSeparableConv2d
from ofa.imagenet_classification.elastic_nn.networks import OFAMobileNetV3

from tofa_fast.ops import elastic_dwconv2d, elastic_dwconv2d_reference
from tofa_fast.ops.elastic_dwconv_dispatch import use_backend

SUITE = "elastic_dwconv_cpu"
RESOLUTION = 128
BATCH = 32
THREADS = 2
MAX_KERNEL = 7
KERNELS = (7, 3)  # 7: the max kernel, plain; 3: OFA's 7→5→3 chain
MODES = ("forward", "forward+backward")
IMPLS = ("tofa_fast", "reference", "ofa")
TARGET_FWD_BWD_GEOMEAN = 3.0
TARGET_FORWARD_MIN = 1.0
# Rounds: enough for about TIME_PER_BENCH seconds, within [MIN_ROUNDS, MAX_ROUNDS].
TIME_PER_BENCH, MIN_ROUNDS, MAX_ROUNDS = 1.5, 3, 200


def mobilenet_v3_depthwise_shapes(resolution: int) -> list[tuple[int, int, int]]:
    """Distinct (max channels, input size, stride) of the depthwise convs of OFA's MobileNetV3 w1.2."""
    net = OFAMobileNetV3(width_mult=1.2, ks_list=[3, 5, 7], expand_ratio_list=[3, 4, 6], depth_list=[2, 3, 4]).eval()
    seen: list[tuple[int, int, int]] = []

    def hook(module, args, _output):
        shape = (args[0].shape[1], args[0].shape[2], module.stride)
        if shape not in seen:
            seen.append(shape)

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, DynamicSeparableConv2d)]
    with torch.no_grad():
        net(torch.zeros(1, 3, resolution, resolution))
    for handle in handles:
        handle.remove()
    return seen


SHAPES = mobilenet_v3_depthwise_shapes(RESOLUTION)


def _case_id(shape, kernel) -> str:
    channels, size, stride = shape
    return f"C{channels} {size}x{size} s{stride} k{kernel}{'(7→5→3)' if kernel < MAX_KERNEL else ''}"


class Problem:
    """One shape: the `ofa` module (its parameters are everyone's) and the input."""

    def __init__(self, shape, kernel):
        channels, size, stride = shape
        torch.manual_seed(0)
        self.kernel, self.stride = kernel, stride
        self.ofa = DynamicSeparableConv2d(channels, [3, 5, 7], stride)
        with torch.no_grad():
            for name in ("7to5_matrix", "5to3_matrix"):  # identity init plus noise: not a no-op chain
                getattr(self.ofa, name).add_(0.05 * torch.randn_like(getattr(self.ofa, name)))
        self.weight = self.ofa.conv.weight
        chain = [getattr(self.ofa, "7to5_matrix"), getattr(self.ofa, "5to3_matrix")]
        self.transforms = chain[: (MAX_KERNEL - kernel) // 2]
        self.x = torch.randn(BATCH, channels, size, size, requires_grad=True)
        out_size = (size + 2 * (kernel // 2) - kernel) // stride + 1
        self.grad_output = torch.randn(BATCH, channels, out_size, out_size)
        self.leaves = [self.x, self.weight, *self.transforms]

    def call(self, impl: str) -> torch.Tensor:
        if impl == "tofa_fast":
            return elastic_dwconv2d(self.x, self.weight, self.kernel, self.stride, self.transforms)
        if impl == "reference":
            return elastic_dwconv2d_reference(self.x, self.weight, self.kernel, self.stride, self.transforms)
        return self.ofa(self.x, self.kernel)

    def runner(self, impl: str, mode: str):
        if mode == "forward":

            def forward():
                with torch.no_grad():
                    return self.call(impl)

            return forward

        def forward_backward():
            return torch.autograd.grad(self.call(impl), self.leaves, self.grad_output)

        return forward_backward


_PROBLEMS: dict[tuple, Problem] = {}


def _expect_full_grid(registry) -> None:
    """Results count as complete (and are saved) only when every shape × kernel × mode × impl ran."""
    for shape in SHAPES:
        for kernel in KERNELS:
            for mode in MODES:
                for impl in IMPLS:
                    registry.expect(SUITE, _case_id(shape, kernel), mode, impl)
    registry.REGISTRY[SUITE]["meta"]["description"] = (
        f"elastic_dwconv2d on OFA MobileNetV3 w1.2 depthwise shapes at resolution {RESOLUTION}, batch {BATCH}, "
        f"{THREADS} threads; tofa_fast (dispatch: C++ kernel) vs reference (slice + transform + F.conv2d) vs "
        "ofa DynamicSeparableConv2d (the ofa package). Run: python -m pytest bench/test_elastic_dwconv_cpu.py "
        "-p no:cacheprovider"
    )


@pytest.mark.parametrize("impl", IMPLS)  # innermost loop: the implementations of one case run back to back
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"k{k}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"C{s[0]}_{s[1]}x{s[1]}_s{s[2]}")
def test_elastic_dwconv_cpu(benchmark, bench_registry, shape, kernel, mode, impl):
    case = _case_id(shape, kernel)
    _expect_full_grid(bench_registry)
    problem = _PROBLEMS.setdefault((shape, kernel), Problem(shape, kernel))
    with use_backend("C++") if impl == "tofa_fast" else contextlib.nullcontext():
        fn = problem.runner(impl, mode)
        bench_registry.measure(
            benchmark,
            fn,
            SUITE,
            case,
            mode,
            impl,
            time_per_bench=TIME_PER_BENCH,
            min_rounds=MIN_ROUNDS,
            max_rounds=MAX_ROUNDS,
        )


def test_targets(bench_registry):
    """Fails the run when tofa_fast misses its CPU targets (needs the full benchmark above)."""
    if not bench_registry.complete(SUITE):
        pytest.skip("the benchmark did not run completely (filtered, or --benchmark-disable)")
    means = bench_registry.geometric_means(SUITE)
    speedups = bench_registry.speedups(SUITE)
    fwd_bwd = means[("forward+backward", "reference")]
    assert fwd_bwd >= TARGET_FWD_BWD_GEOMEAN, f"forward+backward geomean {fwd_bwd:.2f}× < {TARGET_FWD_BWD_GEOMEAN}×"
    slower = {
        case: r["reference"]
        for (case, mode), r in speedups.items()
        if mode == "forward" and r["reference"] < TARGET_FORWARD_MIN
    }
    assert not slower, f"forward slower than the reference on {slower}"
