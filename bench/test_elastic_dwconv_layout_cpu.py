"""CPU benchmark of elastic_dwconv2d by memory layout: channels-last (the trainer's CPU default) vs NCHW.

Training computes in channels-last on the CPU (``ComputeFormat.resolve``), so the depthwise op runs
on NHWC tensors there. Its C++ kernel works on blocks of 8 (AVX2) or 16 (AVX-512) channels: an NCHW
block is 8 contiguous planes, an NHWC block a 32- or 64-byte slice of every pixel's channel row, so
the blocks of a sample share cache lines and the kernel sizes its batch chunks to stay in L2 while
they go through them (``task_plan`` in csrc/ops/cpu/elastic_dwconv_cpu.cpp). This suite measures what
that layout costs against NCHW, same kernel, same values:

* ``digits``: every distinct depthwise layer of the default run's space at 32 px (the max arch's
  channels and largest kernel), batch 64
  (32 labelled + 32 unlabelled images, as a training step sees them);
* ``ofa_mbv3``: the depthwise layers of OFA's MobileNetV3 w1.2 at 128 px, k = 7, batch 32 (the shapes
  of ``test_elastic_dwconv_cpu.py``).

``tofa_fast`` is the op on a channels-last input, ``nchw`` on a contiguous one; forward (no_grad) and
forward+backward (gradients of x, weight and the matrices); two threads.

Target (``test_target``; the run fails when it is missed): channels-last at least 0.9× NCHW's speed in
geometric mean over the shapes, forward and forward+backward.

Two ways the kernel reads channels-last memory, each switchable to measure it
(csrc/ops/cpu/dwconv_tiles_impl.h: a channel block is one line in C/lanes of every pixel, which the
hardware prefetchers follow poorly): ``channels_last_no_prefetch`` is the channels-last op with its
software prefetch off, ``channels_last_one_block`` with one channel block per pass instead of several
(both through ``elastic_dwconv_dispatch.cpu_memory_plan``). ``test_memory_plan_interleaved``
measures each switch alternately, round by round, over the digits layers (forward + backward), and
fails below ``TARGET_MEMORY_PLAN``.

Run: ``python -m pytest bench/test_elastic_dwconv_layout_cpu.py -p no:cacheprovider``
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import tofa_fast
from tofa_fast.nn.elastic_dwconv import ElasticDepthwiseConv2d
from tofa_fast.ops import elastic_dwconv2d
from tofa_fast.ops.elastic_dwconv_dispatch import cpu_memory_plan

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_elastic_dwconv_cpu import SHAPES as OFA_SHAPES  # noqa: E402

SUITE = "elastic_dwconv_layout_cpu"
MODES = ("forward", "forward+backward")
#: impl -> (software prefetch, several channel blocks per pass) of the C++ kernel
SWITCHES = {
    "tofa_fast": (True, True),
    "nchw": (True, True),
    "channels_last_no_prefetch": (False, True),
    "channels_last_one_block": (True, False),
}
IMPLS = tuple(SWITCHES)
TARGET_GEOMEAN = 0.9
#: what each switch must buy on the digits layers, interleaved (median per-round ratio)
TARGET_MEMORY_PLAN, MEMORY_PLAN_ROUNDS = {"channels_last_no_prefetch": 1.02, "channels_last_one_block": 1.02}, 16
TIME_PER_BENCH, MIN_ROUNDS, MAX_ROUNDS = 1.0, 3, 200


def digits_depthwise_layers() -> list[tuple[int, int, int, int]]:
    """Distinct (channels, input size, stride, kernel) of the digits max arch's depthwise layers at 32 px."""
    space = tofa_fast.spaces.get("digits")
    net = tofa_fast.Supernet(space, 10).eval()
    arch = space.max_arch()
    net.set_active(arch)
    seen: list[tuple[int, int, int, int]] = []

    def hook(module, args, _output):
        x, kernel = args
        layer = (x.shape[1], x.shape[2], module.stride, kernel)
        if layer not in seen:
            seen.append(layer)

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, ElasticDepthwiseConv2d)]
    with torch.no_grad():
        net(torch.zeros(1, 3, arch.resolution, arch.resolution))
    for handle in handles:
        handle.remove()
    return seen


CASES = [("digits", 64, *layer) for layer in digits_depthwise_layers()] + [
    ("ofa_mbv3", 32, channels, size, stride, 7) for channels, size, stride in OFA_SHAPES
]


def _case_id(case) -> str:
    space, batch, channels, size, stride, kernel = case
    return f"{space} N{batch} C{channels} {size}x{size} s{stride} k{kernel}"


class Problem:
    def __init__(self, case):
        _, batch, channels, size, stride, kernel = case
        torch.manual_seed(0)
        self.kernel, self.stride = kernel, stride
        self.weight = torch.randn(channels, 1, kernel, kernel, requires_grad=True)
        x = torch.randn(batch, channels, size, size)
        self.inputs = {
            "nchw": x.clone().requires_grad_(),
            "tofa_fast": x.contiguous(memory_format=torch.channels_last).requires_grad_(),
        }
        for impl in ("channels_last_no_prefetch", "channels_last_one_block"):
            self.inputs[impl] = self.inputs["tofa_fast"]
        out_size = (size + 2 * (kernel // 2) - kernel) // stride + 1
        grad = torch.randn(batch, channels, out_size, out_size)
        self.grads = {"nchw": grad, "tofa_fast": grad.contiguous(memory_format=torch.channels_last)}
        for impl in ("channels_last_no_prefetch", "channels_last_one_block"):
            self.grads[impl] = self.grads["tofa_fast"]

    def runner(self, impl: str, mode: str):
        x = self.inputs[impl]
        if mode == "forward":

            def run():
                with torch.no_grad():
                    return elastic_dwconv2d(x, self.weight, self.kernel, self.stride)

        else:

            def run():
                y = elastic_dwconv2d(x, self.weight, self.kernel, self.stride)
                return torch.autograd.grad(y, (x, self.weight), self.grads[impl])

        return with_switches(run, *SWITCHES[impl])


def with_switches(fn, prefetch: bool, multi_block: bool):
    """``fn`` with the depthwise kernel's software prefetch and multi-block passes on or off (both
    restored after the call)."""

    def run():
        with cpu_memory_plan(prefetch, multi_block):
            return fn()

    return run


_PROBLEMS: dict[tuple, Problem] = {}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_layout(benchmark, bench_registry, case, mode, impl):
    for expected in CASES:  # the full grid: a filtered (-k) run is partial and saves nothing
        for expected_mode in MODES:
            for name in IMPLS:
                bench_registry.expect(SUITE, _case_id(expected), expected_mode, name)
    bench_registry.REGISTRY[SUITE]["meta"]["description"] = (
        "elastic_dwconv2d (C++ kernel) on the same values in two layouts, 2 threads: tofa_fast = channels-last "
        "input (the trainer's CPU default), nchw = contiguous input, channels_last_no_prefetch / "
        "channels_last_one_block = channels-last with the kernel's software prefetch / multi-block passes off. digits: the default run's depthwise layers "
        "(max arch, 32 px, batch 64); ofa_mbv3: OFA MobileNetV3 w1.2 at 128 px, k7, batch 32. Run: python -m "
        "pytest bench/test_elastic_dwconv_layout_cpu.py -p no:cacheprovider"
    )
    if case not in _PROBLEMS:
        _PROBLEMS[case] = Problem(case)
    problem = _PROBLEMS[case]
    bench_registry.measure(
        benchmark,
        problem.runner(impl, mode),
        SUITE,
        _case_id(case),
        mode,
        impl,
        time_per_bench=TIME_PER_BENCH,
        min_rounds=MIN_ROUNDS,
        max_rounds=MAX_ROUNDS,
    )


@pytest.mark.parametrize("baseline", list(TARGET_MEMORY_PLAN))
def test_memory_plan_interleaved(bench_registry, baseline):
    """One switch off (``baseline``) and all on, alternating round by round, each round every digits layer
    forward + backward on channels-last inputs: the median per-round ratio must reach its target."""
    problems = [_PROBLEMS.get(case) or Problem(case) for case in CASES if case[0] == "digits"]

    def cycle(impl: str):
        runs = [problem.runner(impl, "forward+backward") for problem in problems]
        return lambda: [run() for run in runs]

    ratios = bench_registry.interleaved_ratios(cycle(baseline), cycle("tofa_fast"), MEMORY_PLAN_ROUNDS)
    what = {
        "channels_last_no_prefetch": "software prefetch",
        "channels_last_one_block": "several channel blocks per pass",
    }
    result = bench_registry.note_interleaved(
        SUITE, ratios, f"digits depthwise layers, forward+backward: {what[baseline]} {{median:.3f}}× without"
    )
    bench_registry.REGISTRY[SUITE]["meta"].setdefault("memory_plan_interleaved", {})[baseline] = result
    target = TARGET_MEMORY_PLAN[baseline]
    assert result["median"] >= target, f"{what[baseline]} {result['median']:.3f}× < {target}× without it (interleaved)"


def test_target(bench_registry):
    """Fails the run when channels-last costs more than TARGET_GEOMEAN allows (needs the grid above)."""
    if not bench_registry.complete(SUITE):
        pytest.skip("the benchmark did not run completely (filtered, or --benchmark-disable)")
    means = bench_registry.geometric_means(SUITE)
    bench_registry.REGISTRY[SUITE]["meta"]["geometric_means"] = {f"{k[0]}, {k[1]}": v for k, v in means.items()}
    misses = []
    for mode in MODES:
        ratio = means[(mode, "nchw")]  # NCHW median / channels-last median
        print(f"\n{SUITE}: channels-last {ratio:.2f}× NCHW's speed ({mode}, geometric mean)")
        if ratio < TARGET_GEOMEAN:
            misses.append(f"{mode}: channels-last {ratio:.2f}× NCHW < {TARGET_GEOMEAN}×")
    assert not misses, "; ".join(misses)
