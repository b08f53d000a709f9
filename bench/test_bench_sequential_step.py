"""CPU benchmark of the default run's training step: what fusing batch norm + activation buys, by
layout, and what the ops' eager path (tofa_fast/ops/eager_path.py) saves over torch.library dispatch.

The case is the default run's step (as in ``test_bench_fused_step.py``): the pseudo-label pass of
a_max, then a_max, a_min and two random members (different resolutions) with CE + FixMatch (+ KD for
the random ones) on 32 labelled + 32 unlabelled digits-sized images, forward and backward, sequential
(one member per pass), 2 threads. Implementations, on the same members and images:

* ``tofa_fast`` — channels-last: every batch norm + activation is one call of the compiled
  ``packed_batch_norm_act`` kernel (``ElasticBatchNorm2d.forward``'s fused path);
* ``channels_last_unfused`` — channels-last with that op pinned to its reference backend, which makes
  ``ElasticBatchNorm2d`` take ``F.batch_norm`` + the activation module: the fusion's own effect;
* ``nchw`` — contiguous NCHW, ``F.batch_norm`` + activation (the layout ``--channels-last`` does not ask for);
* ``library_dispatch`` — ``tofa_fast`` with every call of our ops through the ``torch.library``
  custom op (``use_library_dispatch``) instead of the eager path: the Python dispatch overhead.

The eager path's gain (≈ 4 %) is smaller than the drift of a shared machine's load between two
benchmarks run one after the other, so ``test_eager_path_vs_library_dispatch_interleaved`` also
alternates the two round by round and records the median of the per-round ratios. So does
``test_pointwise_gemm_vs_convolution_interleaved``, for the 1×1 convolutions of channels-last maps as
matrix products on their rows (``ElasticConv2d``, ours) against ``F.conv2d`` (mkldnn), and for an
MBConv's expansion batch norm + activation applied in the depthwise kernel's tile loads
(``nn/bn_act_dwconv.py``, ours) against the two ops, and for the expansion's backward with the batch
norm's grad_x folded in (one pass over dz and y, ``FUSE_EXPANSION_BACKWARD``) against that pass + two
matrix products: ``test_switch_interleaved``, on this step and on
the ``ofa_mbv3`` 128 px sequential step (``test_bench_fused_step.py``'s problem; needs ``ofa``).

``test_target`` fails the run when the fused path is not faster than the unfused one on the same
layout (ratio ≥ ``TARGET_VS_UNFUSED``), the eager path, interleaved, not faster than the library
dispatch (≥ ``TARGET_VS_LIBRARY_DISPATCH``), or a switch slower on than off (``TARGET_SWITCHES``, on
every case that ran), and records the ratios.

Run: ``python -m pytest bench/test_bench_sequential_step.py -p no:cacheprovider``
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import pytest
import torch

from tofa_fast.nn import bn_act_dwconv, elastic_conv
from tofa_fast.ops import packed_batch_norm as bn_op
from tofa_fast.ops.eager_path import use_library_dispatch
from tofa_fast.ops.elastic_dwconv_dispatch import cpu_memory_plan
from tofa_fast.train.step import ComputeFormat, StepBatch, choose_step_backend, train_step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_bench_fused_step import CYCLES, DigitsProblem, OfaProblem  # noqa: E402  (the same members and images)

SUITE = "sequential_step_cpu"
THREADS = 2
CYCLE = CYCLES["digits"]  # steps per round, each with other random members
CASE = "digits TOFA step, 32 labelled + 32 unlabelled, sequential"
MODE = "step (fwd+bwd)"
IMPLS = ("tofa_fast", "channels_last_unfused", "nchw", "library_dispatch")
TARGET_VS_UNFUSED = 1.05
# The eager path saves ≈ 0.4 ms per op call, ≈ 4 % of this step on the 2-core CI machine.
TARGET_VS_LIBRARY_DISPATCH = 1.02
TIME_PER_BENCH, MIN_ROUNDS, MAX_ROUNDS = 20.0, 7, 30
INTERLEAVED_ROUNDS = 16
# 1×1 convolutions as matrix products vs mkldnn, interleaved: 1.00–1.07× measured on the digits step,
# 1.03–1.10× on ofa_mbv3; the target only asks that they are not slower.
TARGET_POINTWISE_GEMM = 1.0
# The expansion batch norm + activation in the depthwise kernel's tile loads: two passes over the
# expanded tensor fewer forward; 1.07–1.20× on the fused layer alone (fwd + bwd, 2 threads), ≈ 5 % of
# the step. The target asks that it is not slower.
TARGET_BN_ACT_DWCONV = 1.0
# The expansion's backward in one pass over dz and y (tofa_fast/ops/bn_act_dwconv.py with an
# expansion): 1.2–1.8× the three ops on the layer's backward alone; interleaved, 1.054–1.074× the
# digits step and 1.019–1.024× the ofa_mbv3 one (three runs each), the latter within the machine's
# noise of 1.02. Like the others, the target asks that it is not slower.
TARGET_EXPANSION_BACKWARD = 1.0
# The depthwise kernel's channels-last memory plan (software prefetch + several channel blocks per pass,
# csrc/ops/cpu/dwconv_tiles_impl.h): 1.09× and 1.14× on the digits depthwise layers alone (fwd + bwd,
# interleaved, bench/test_elastic_dwconv_layout_cpu.py), the depthwise op being ≈ 18 % of the step:
# 1.013–1.036× the digits step (two runs), 1.056× the ofa_mbv3 one. Not slower, like the others.
TARGET_DWCONV_MEMORY_PLAN = 1.0
TARGET_SWITCHES = {
    "interleaved_pointwise_gemm_vs_convolution": TARGET_POINTWISE_GEMM,
    "interleaved_bn_act_dwconv_vs_two_ops": TARGET_BN_ACT_DWCONV,
    "interleaved_expansion_backward_vs_three_ops": TARGET_EXPANSION_BACKWARD,
    "interleaved_dwconv_memory_plan_vs_none": TARGET_DWCONV_MEMORY_PLAN,
}
# Measured, not asserted: the packed batch norm's normalise and grad_x passes on channel chunks in
# vector registers, on segments of ≤ 24 channels (csrc/ops/cpu/packed_batch_norm_cpu.cpp). On those
# batch norms alone 1.05–1.50× forward and 1.05–1.22× backward (bench/test_bench_packed_batch_norm.py
# asserts it there), but they are ≈ 10 % of the digits step and a few % of the ofa_mbv3 one: 1.018×
# and 0.989× the digits step in two runs (2026-12-08), 1.004× and 0.999× ofa_mbv3 — within the noise.
POINTWISE_ROUNDS = {
    "digits": INTERLEAVED_ROUNDS,
    "ofa_mbv3": 12,
}  # an ofa_mbv3 step takes ≈ 2 s; 8 rounds left a 2 % effect in the noise

pytestmark = pytest.mark.skipif(
    bool(bn_op.CPP.not_supported_reasons(bn_op.PackedBatchNormProblem("cpu", torch.float32, torch.float32))),
    reason="the C++ extension with the packed_batch_norm_act kernels is not loaded",
)


class Problem(DigitsProblem):
    """The fused-step bench's digits problem, stepped sequentially in a chosen layout."""

    def runner(self, impl: str):
        fmt = ComputeFormat("fp32", impl != "nchw")
        self.net = self.net.to(memory_format=fmt.memory_format)
        b = self.batch
        batch = StepBatch.to_device((b.x, b.y), (b.u_weak, b.u_strong), torch.device("cpu"), fmt)
        backend = choose_step_backend("sequential", self.net, torch.device("cpu"))

        def pin():
            if impl == "channels_last_unfused":
                return bn_op.use_backend("reference")
            return use_library_dispatch() if impl == "library_dispatch" else contextlib.nullcontext()

        def cycle():
            with pin():
                for plan in self.plans:
                    self.net.zero_grad(set_to_none=True)
                    train_step(self.net, plan, batch, self.settings, fmt, backend)

        return cycle


@pytest.fixture(scope="module")
def problem() -> Problem:
    return Problem()


@pytest.mark.parametrize("impl", IMPLS)
def test_sequential_step(benchmark, bench_registry, problem, impl):
    for name in IMPLS:
        bench_registry.expect(SUITE, CASE, MODE, name)
    bench_registry.REGISTRY[SUITE]["meta"]["description"] = (
        f"The default run's training step (sequential members), {THREADS} threads, rounds of {CYCLE} steps with "
        "different random members (medians per step): tofa_fast = channels-last with batch norm + activation "
        "fused (packed_batch_norm_act, C++), channels_last_unfused = channels-last with F.batch_norm + activation, "
        "nchw = contiguous NCHW with F.batch_norm + activation, library_dispatch = tofa_fast with every call of "
        "our ops through the torch.library custom op (no eager path). Run: python -m pytest "
        "bench/test_bench_sequential_step.py -p no:cacheprovider"
    )
    bench_registry.measure(
        benchmark,
        problem.runner(impl),
        SUITE,
        CASE,
        MODE,
        impl,
        time_per_bench=TIME_PER_BENCH,
        min_rounds=MIN_ROUNDS,
        max_rounds=MAX_ROUNDS,
        warmup_rounds=0,
        per_round=CYCLE,
        group=CASE,
    )


def test_eager_path_vs_library_dispatch_interleaved(bench_registry, problem):
    """Eager path and torch.library dispatch alternate round by round (A B B A ...); the median of
    the per-round ratios goes into the results' ``meta``."""
    ratios = bench_registry.interleaved_ratios(
        problem.runner("library_dispatch"), problem.runner("tofa_fast"), INTERLEAVED_ROUNDS
    )
    bench_registry.REGISTRY[SUITE]["meta"]["interleaved_eager_vs_library_dispatch"] = bench_registry.note_interleaved(
        SUITE, ratios, "eager path {median:.3f}× library dispatch"
    )


@contextlib.contextmanager
def _module_switch(module, switch: str, value: bool):
    """The module-level switch ``module.<switch>`` set to ``value`` inside the block (restored after)."""
    previous = getattr(module, switch)
    setattr(module, switch, value)
    try:
        yield
    finally:
        setattr(module, switch, previous)


def _switched(switch, value: bool, cycle):
    """``cycle`` inside ``switch(value)`` (a context manager)."""

    def run():
        with switch(value):
            cycle()

    return run


#: interleaved A/B of one switch on the sequential step: meta key → (value → context, what it does)
SWITCHES = {
    "interleaved_pointwise_gemm_vs_convolution": (
        functools.partial(_module_switch, elastic_conv, "POINTWISE_AS_GEMM"),
        "1×1 convolutions as matrix products {median:.3f}× F.conv2d (mkldnn)",
    ),
    "interleaved_bn_act_dwconv_vs_two_ops": (
        functools.partial(_module_switch, bn_act_dwconv, "FUSE_BN_ACT_INTO_DWCONV"),
        "expansion batch norm + activation in the depthwise kernel's loads {median:.3f}× the two ops",
    ),
    "interleaved_expansion_backward_vs_three_ops": (
        functools.partial(_module_switch, bn_act_dwconv, "FUSE_EXPANSION_BACKWARD"),
        "expansion backward with the batch norm's grad_x in one pass {median:.3f}× grad_x pass + two matrix products",
    ),
    "interleaved_dwconv_memory_plan_vs_none": (
        lambda on: cpu_memory_plan(prefetch=on, multi_block=on),
        "depthwise kernels' channels-last prefetch + multi-block passes {median:.3f}× neither",
    ),
    "interleaved_bn_channel_chunks_vs_rows": (
        bn_op.cpu_channel_chunks,
        "packed batch norm's elementwise passes on channel chunks {median:.3f}× row by row",
    ),
}


def _case_cycle(problem, case: str):
    if case == "ofa_mbv3":
        pytest.importorskip("ofa", reason="the ofa_mbv3 problem is built from the ofa package's model")
        return OfaProblem().runner("sequential")
    return problem.runner("tofa_fast")


@pytest.mark.parametrize("case", list(POINTWISE_ROUNDS))
@pytest.mark.parametrize("key", list(SWITCHES))
def test_switch_interleaved(bench_registry, problem, key, case):
    """A switch of SWITCHES off (baseline) and on (ours), alternating round by round (A B B A ...):
    what each of the step's kernel choices buys. The median of the per-round ratios goes into the
    results' ``meta``."""
    switch, what = SWITCHES[key]
    cycle = _case_cycle(problem, case)
    ratios = bench_registry.interleaved_ratios(
        _switched(switch, False, cycle), _switched(switch, True, cycle), POINTWISE_ROUNDS[case]
    )
    results = bench_registry.REGISTRY[SUITE]["meta"].setdefault(key, {})
    results[case] = bench_registry.note_interleaved(SUITE, ratios, f"{case} sequential step: {what}")


def test_target(bench_registry):
    """Fails the run when fusing batch norm + activation does not pay (needs the benchmark above)."""
    if not bench_registry.complete(SUITE):
        pytest.skip("the benchmark did not run completely (filtered, or --benchmark-disable)")
    ratios = bench_registry.speedups(SUITE)[(CASE, MODE)]
    bench_registry.REGISTRY[SUITE]["meta"]["speedups"] = ratios
    interleaved = bench_registry.REGISTRY[SUITE]["meta"].get("interleaved_eager_vs_library_dispatch")
    if interleaved is None:
        pytest.skip("the interleaved eager-path benchmark did not run")
    eager_gain = interleaved["median"]
    print(
        f"\n{SUITE}: fused {ratios['channels_last_unfused']:.2f}× unfused channels-last, {ratios['nchw']:.2f}× NCHW, "
        f"eager path {eager_gain:.3f}× library dispatch (interleaved; {ratios['library_dispatch']:.2f}× one after the other)"
    )
    assert ratios["channels_last_unfused"] >= TARGET_VS_UNFUSED, (
        f"{ratios['channels_last_unfused']:.2f}× < {TARGET_VS_UNFUSED}× vs channels-last with F.batch_norm"
    )
    assert eager_gain >= TARGET_VS_LIBRARY_DISPATCH, (
        f"eager path {eager_gain:.3f}× < {TARGET_VS_LIBRARY_DISPATCH}× vs torch.library dispatch (interleaved)"
    )
    for key, target in TARGET_SWITCHES.items():
        results = bench_registry.REGISTRY[SUITE]["meta"].get(key, {})
        if "digits" not in results:
            pytest.skip(f"the interleaved benchmark {key} did not run")
        for case, result in results.items():
            assert result["median"] >= target, f"{case}: {key} {result['median']:.3f}× < {target}× (interleaved)"
