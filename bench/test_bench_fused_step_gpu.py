"""GPU benchmark of the multi-member steps (``--step fused``, ``--step shared``) against the sequential one.

The GPU case of issue 13: ``ofa_mbv3`` w1.2 at 128 px, batch 32, a sandwich step of 4 members (max,
min = ks 3 / e 3 / d 2, two random members drawn from the space with a fixed seed), CE, forward and
backward, in the GPU's default compute format (bf16 autocast + channels_last, as ``--precision auto``
picks on CUDA) and in fp32 + contiguous for comparison. Random weights from the preset (the ``ofa``
package is not needed, so this runs on the GPU machine as it is). A round is a fixed cycle of steps,
the same cycle for both implementations; each round ends with a device synchronisation, and the
medians are per step. Peak device memory of one step (``torch.cuda.max_memory_allocated`` above the
weights and gradients) goes into the results' ``meta``.

``shared`` computes the stem, the first block and the first expansion of the four members once
(they see the same images), ``tofa_fast`` all members in one packed pass, ``graphed`` replays a_max
and a_min from CUDA graphs and the random members layer by layer (tofa_fast/train/member_graphs.py;
a layer is recorded the second time it is met, so the warm-up rounds record and the timed rounds
replay: the cycle's random members repeat, as their layers' configurations do in training). The
first round's time and the number of recordings go into the results' ``meta``.

Target (``test_targets``; the run fails when it is missed): the fastest of the three, bf16, ≥ 2×
sequential.

Skipped without a CUDA device; scripts/gpu_check.sh runs it (stage ``fused-bench``).
Run: ``python -m pytest bench/test_bench_fused_step_gpu.py -p no:cacheprovider``
"""

from __future__ import annotations

import random
import time

import pytest
import torch

import tofa_fast
from tofa_fast.train import Member, StepPlan
from tofa_fast.train.step import ComputeFormat, LossSettings, StepBatch, choose_step_backend, train_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SUITE = "fused_step_gpu"
TARGET_BF16 = 2.0
STEPS_PER_ROUND, ROUNDS, WARMUP_ROUNDS = 3, 10, 2
FORMATS = {"bf16 channels_last": ComputeFormat("bf16", True), "fp32": ComputeFormat("fp32", False)}
MODE = "step (fwd+bwd)"
IMPLS = ("tofa_fast", "shared", "graphed", "sequential")
MULTI_MEMBER = ("tofa_fast", "shared", "graphed")  # --step fused, --step shared, --step graphed


def _case(fmt_name: str) -> str:
    return f"ofa_mbv3 w1.2 128px, batch 32, 4 members, {fmt_name}"


class Problem:
    """The members, images and network of the case (``device`` and ``batch`` for
    bench/profile_step_gpu.py's CPU smoke test)."""

    def __init__(self, device: torch.device | str = "cuda", batch: int = 32):
        torch.manual_seed(0)
        self.device = torch.device(device)
        space = tofa_fast.spaces.get("ofa_mbv3", resolutions=(128,))
        self.net = tofa_fast.Supernet(space, num_classes=1000).to(self.device).train()
        rng = random.Random(0)
        self.plans = [
            StepPlan(
                (
                    Member(space.max_arch()),
                    Member(space.min_arch()),
                    Member(space.sample(rng)),
                    Member(space.sample(rng)),
                )
            )
            for _ in range(STEPS_PER_ROUND)
        ]
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch, 3, 128, 128, generator=g)
        self.labels = torch.randint(0, 1000, (batch,), generator=g)

    def runner(self, impl: str, fmt: ComputeFormat):
        device = self.device
        backend = choose_step_backend("fused" if impl == "tofa_fast" else impl, self.net, device)
        self.net.to(memory_format=fmt.memory_format)
        batch = StepBatch.to_device((self.images, self.labels), None, device, fmt)
        settings = LossSettings(0.0, 0.95)

        def cycle():
            for plan in self.plans:
                self.net.zero_grad(set_to_none=True)
                train_step(self.net, plan, batch, settings, fmt, backend)
            if device.type == "cuda":
                torch.cuda.synchronize()

        return cycle


_PROBLEM: list[Problem] = []


def _problem() -> Problem:
    if not _PROBLEM:
        _PROBLEM.append(Problem())
    return _PROBLEM[0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_fused_step_gpu(benchmark, bench_registry, fmt_name, impl):
    for name in FORMATS:
        for i in IMPLS:
            bench_registry.expect(SUITE, _case(name), MODE, i)
    bench_registry.REGISTRY[SUITE]["meta"]["description"] = (
        f"One sandwich training step (4 members fwd+bwd, CE) on ofa_mbv3 w1.2 at 128 px, batch 32, rounds of "
        f"{STEPS_PER_ROUND} steps (medians per step): tofa_fast = --step fused (Supernet.forward_many), "
        "shared = --step shared (Supernet.backward_many), graphed = --step graphed (a_max and a_min whole, "
        "the random members layer by layer, replayed from CUDA graphs), sequential = --step sequential. Run: python -m pytest bench/test_bench_fused_step_gpu.py -p no:cacheprovider"
    )
    problem = _problem()
    fmt = FORMATS[fmt_name]
    fn = problem.runner(impl, fmt)
    start = time.perf_counter()
    fn()  # warm-up: cuDNN plans, Triton compiles, the caching allocator, graphed's first recordings
    meta = bench_registry.REGISTRY[SUITE]["meta"]
    meta.setdefault("first_round_s", {})[f"{_case(fmt_name)} {impl}"] = round(time.perf_counter() - start, 2)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    benchmark.group = _case(fmt_name)
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    bench_registry.REGISTRY[SUITE]["meta"].setdefault("peak_memory_MiB", {})[f"{_case(fmt_name)} {impl}"] = round(
        peak, 1
    )
    if impl == "graphed":  # what the timed rounds replayed
        graphs = choose_step_backend("graphed", problem.net, problem.device).graphs_of(problem.net, problem.device)
        meta.setdefault("recordings", {})[_case(fmt_name)] = {
            "members": len(graphs._members),
            "layers and heads": len(graphs._layer_recordings),
        }
    if benchmark.stats is not None:
        bench_registry.record(SUITE, _case(fmt_name), MODE, impl, benchmark.stats.stats.median / STEPS_PER_ROUND)


def test_targets(bench_registry):
    """Fails the run when no bf16 multi-member step is ≥ 2× the sequential one (needs the benchmark above)."""
    if not bench_registry.complete(SUITE):
        pytest.skip("the benchmark did not run completely (filtered, or --benchmark-disable)")
    medians = bench_registry.REGISTRY[SUITE]["medians"][(_case("bf16 channels_last"), MODE)]
    ratios = {impl: medians["sequential"] / medians[impl] for impl in MULTI_MEMBER}
    bench_registry.REGISTRY[SUITE]["meta"]["bf16_vs_sequential"] = ratios
    best = max(ratios, key=ratios.__getitem__)
    assert ratios[best] >= TARGET_BF16, f"bf16: {best} {ratios[best]:.2f}× sequential < {TARGET_BF16}×"
