"""CPU benchmark of the multi-member steps (``--step fused`` and ``--step shared``) against the sequential one and OFA.

Cases, each run back to back by every implementation on the same members and images, 2 threads:

* ``digits TOFA step``: the default run's step — the pseudo-label pass of a_max, then a_max, a_min
  and two random members (different resolutions) with CE + FixMatch (+ KD for the random ones) on a
  labelled batch of 32 and an unlabelled batch of 32 (weak + strong views). Forward and backward.
  ``tofa_fast`` is the fused step, ``shared`` the shared-prefix step (members with the same
  images — here the two random ones when they draw the same resolution — compute what they agree
  on once), ``sequential`` one member per pass, all in the trainer's default CPU format (fp32,
  channels-last: ``ComputeFormat.resolve("auto", None, cpu)``).
* ``ofa_mbv3 w1.2 128px``: a sandwich step of 4 members — max, min (ks 3, e 3, d 2) and two random
  ones drawn by the ``ofa`` package's own sampler —, CE on a batch of 32 at 128 px, forward and
  backward, on ``ofa_mbv3`` (the same network as OFA's ``OFAMobileNetV3(width_mult=1.2)``).
  All four members see the same images, so ``shared`` computes the stem, the first block and the
  first expansion once. Baselines: our sequential step, the ``ofa`` package's own step on its own
  model (``ofa``), and the same after ``tofa_fast.accelerate`` (``ofa+accelerate``).
* ``digits ps step``: a ``ps`` step of the expand phase on digits — four subnets on one batch of 64
  at one resolution (as OFA), CE + distillation from the frozen full net, ``ps``'s regularisation
  (no drop-connect) — where ``shared`` shares the most.

A round is a fixed cycle of steps (different random members each), the same cycle for everyone;
medians are per step. ``test_shared_vs_sequential_interleaved`` and ``test_tree_fusion_interleaved``
(the shared step's expansion + only-depthwise-child nodes as one fused op, against two nodes)
alternate their two sides round by round and record the median per-round ratio.

Memory: the bytes of activations autograd holds for backward (saved tensors, parameters excluded)
at the peak of a step (:class:`LiveSavedBytes`) — for ``sequential`` the largest single member's
pass, for ``fused`` all members at once, for ``shared`` the live path of the member tree —
reported in the results' ``meta``.

Targets (``test_targets``; the run fails when one is missed), for the faster of our two
multi-member steps in each case: ≥ 1.8× sequential on the digits step; on ofa_mbv3 ≥ 1.5×
sequential and ≤ 0.4× the ``ofa`` step's time; peak activation memory ≤ 1.5× sequential's.

Run: ``python -m pytest bench/test_bench_fused_step.py -p no:cacheprovider``
"""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

import tofa_fast
from tofa_fast.train import Member, StepPlan, TrainConfig
from tofa_fast.train.step import ComputeFormat, LossSettings, StepBatch, choose_step_backend, train_step
from tofa_fast.train.strategies import build_strategy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ofa_step import make_ofa_mbv3, ofa_sandwich_archs, ofa_sandwich_step  # noqa: E402

SUITE = "fused_step_cpu"
THREADS = int(os.environ.get("TOFA_BENCH_THREADS", "2"))  # 1: robust against a busy second core
# Steps per round, each with other random members. The ofa package's step takes about a minute on
# two cores (its depthwise backward), so that case runs one step per round.
CYCLES = {"digits": 3, "ps": 3, "ofa": 1}
TARGET_DIGITS = 1.8
TARGET_OFA_SEQUENTIAL = 1.5
TARGET_OFA_PACKAGE = 0.4  # fused time / ofa time
TARGET_MEMORY = 1.5
TIME_PER_BENCH, MIN_ROUNDS, MAX_ROUNDS = 6.0, 3, 20

DIGITS_CASE = "digits TOFA step, 32 labelled + 32 unlabelled"
OFA_CASE = "ofa_mbv3 w1.2 128px, batch 32, 4 members"
PS_CASE = "digits ps step (expand phase), 4 subnets, batch 64"
#: what the trainer computes in on the CPU by default (``--precision auto``, channels-last)
CPU_FORMAT = ComputeFormat.resolve("auto", None, torch.device("cpu"))
CASES = {
    DIGITS_CASE: ("tofa_fast", "shared", "sequential"),
    PS_CASE: ("tofa_fast", "shared", "sequential"),
    OFA_CASE: ("tofa_fast", "shared", "sequential", "ofa", "ofa+accelerate"),
}
#: our multi-member steps: ``tofa_fast`` is --step fused, ``shared`` --step shared
MULTI_MEMBER = ("tofa_fast", "shared")
MODE = "step (fwd+bwd)"


class StrategyStepProblem:
    """Steps of a strategy on digits, planned by the strategy itself, with its default config and
    regularisation (what ``tofa-fast train --strategy NAME`` runs), from epoch ``epoch`` on."""

    def __init__(self, strategy_name: str, cycle: int, labelled: int, unlabelled: int = 0, epoch: int = 0):
        torch.manual_seed(0)
        space = tofa_fast.spaces.get("digits")
        self.net = tofa_fast.Supernet(space, 10).train()
        config = TrainConfig(strategy=strategy_name, space="digits").resolved()
        # the run's regularisation: residual drop-connect masks limit what members can share
        self.net.set_regularization(dropout=config.dropout, drop_connect=config.drop_connect)
        strategy = build_strategy(strategy_name, space, 25, 10, config)
        rng = random.Random(0)
        if epoch:
            strategy.on_epoch_start(epoch, rng, self.net, torch.optim.SGD(self.net.parameters(), lr=0.1))
        self.teacher = strategy.teacher()
        self.plans = [strategy.plan(rng) for _ in range(cycle)]
        x = torch.randn(labelled, 3, 32, 32)
        u_weak, u_strong = (torch.randn(unlabelled, 3, 32, 32) for _ in range(2)) if unlabelled else (None, None)
        self.batch = StepBatch(x, torch.randint(0, 10, (labelled,)), u_weak, u_strong)
        self.settings = LossSettings(config.label_smoothing, config.threshold)

    def runner(self, impl: str):
        backend = choose_step_backend("fused" if impl == "tofa_fast" else impl, self.net, torch.device("cpu"))
        fmt = CPU_FORMAT
        self.net = self.net.to(memory_format=fmt.memory_format)
        b = self.batch
        unlabelled = (b.u_weak, b.u_strong) if b.u_weak is not None else None
        batch = StepBatch.to_device((b.x, b.y), unlabelled, torch.device("cpu"), fmt)

        def cycle():
            for plan in self.plans:
                self.net.zero_grad(set_to_none=True)
                train_step(self.net, plan, batch, self.settings, fmt, backend, self.teacher)

        return cycle


class DigitsProblem(StrategyStepProblem):
    """The default run's step: TOFA, 32 labelled + 32 unlabelled images."""

    def __init__(self):
        super().__init__("tofa", CYCLES["digits"], labelled=32, unlabelled=32)


class PsProblem(StrategyStepProblem):
    """A ``ps`` step of the last (expand) phase: four subnets on one batch of 64 labelled images at
    one resolution, CE + distillation from the frozen full net (frozen at the phase boundary)."""

    def __init__(self):
        probe = build_strategy("ps", tofa_fast.spaces.get("digits"), 25, 10, TrainConfig(strategy="ps").resolved())
        super().__init__("ps", CYCLES["ps"], labelled=64, epoch=probe.phases[-1].start)


class OfaProblem:
    def __init__(self):
        from tofa_fast.transfer import from_ofa, ofa_arch

        self.ofa = make_ofa_mbv3(1.2)
        self.accelerated = None
        if hasattr(tofa_fast, "accelerate"):
            self.accelerated = make_ofa_mbv3(1.2)
            tofa_fast.accelerate(self.accelerated)
        self.net = from_ofa(self.ofa).train()
        rng = random.Random(0)
        self.settings = [ofa_sandwich_archs(self.ofa, rng) for _ in range(CYCLES["ofa"])]
        self.plans = [
            StepPlan(tuple(Member(ofa_arch(self.net.space, resolution=128, **s)) for s in settings))
            for settings in self.settings
        ]
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(32, 3, 128, 128, generator=g)
        self.labels = torch.randint(0, 1000, (32,), generator=g)

    def runner(self, impl: str):
        if impl in ("ofa", "ofa+accelerate"):
            model = self.ofa if impl == "ofa" else self.accelerated

            def cycle():
                for settings in self.settings:
                    model.zero_grad(set_to_none=True)
                    ofa_sandwich_step(model, self.images, settings, self.labels)

            return cycle
        backend = choose_step_backend("fused" if impl == "tofa_fast" else impl, self.net, torch.device("cpu"))
        settings, fmt = LossSettings(0.0, 0.95), CPU_FORMAT
        self.net = self.net.to(memory_format=fmt.memory_format)
        batch = StepBatch.to_device((self.images, self.labels), None, torch.device("cpu"), fmt)

        def cycle():
            for plan in self.plans:
                self.net.zero_grad(set_to_none=True)
                train_step(self.net, plan, batch, settings, fmt, backend)

        return cycle


class LiveSavedBytes:
    """Peak bytes of the distinct tensors autograd holds for backward (parameters excluded) while a
    step runs: for ``sequential`` the largest member's pass, for ``fused`` all members at once, for
    ``shared`` the path of the member tree that is alive."""

    def __init__(self, net: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in net.parameters()}
        self.refs: dict[int, int] = {}
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor):
        return _Saved(t, self)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda saved: saved.tensor)

    def add(self, key: int, nbytes: int) -> None:
        self.refs[key] = self.refs.get(key, 0) + 1
        if self.refs[key] == 1:
            self.live += nbytes
            self.peak = max(self.peak, self.live)

    def release(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= nbytes


class _Saved:
    """A saved tensor, counted while autograd holds it (until its graph is freed)."""

    def __init__(self, tensor: torch.Tensor, meter: LiveSavedBytes):
        self.tensor, self.meter = tensor, meter
        storage = tensor.untyped_storage()
        self.key, self.nbytes = storage.data_ptr(), storage.nbytes()
        self.counted = self.key not in meter.params
        if self.counted:
            meter.add(self.key, self.nbytes)

    def __del__(self):
        if self.counted:
            self.meter.release(self.key, self.nbytes)


def peak_activation_bytes(problem, impl: str) -> int:
    """:class:`LiveSavedBytes`' peak over one step (the problem's first plan) of ``impl``."""
    plans = problem.plans
    problem.plans = plans[:1]
    try:
        step = problem.runner(impl)
        meter = LiveSavedBytes(problem.net)
        with meter.hooks():
            step()
    finally:
        problem.plans = plans
    problem.net.zero_grad(set_to_none=True)
    return meter.peak


_PROBLEMS: dict[str, object] = {}


def _problem(case: str):
    if case not in _PROBLEMS:
        _PROBLEMS[case] = {DIGITS_CASE: DigitsProblem, PS_CASE: PsProblem, OFA_CASE: OfaProblem}[case]()
    return _PROBLEMS[case]


def _expect_all(registry) -> None:
    for case, impls in CASES.items():
        for impl in impls:
            registry.expect(SUITE, case, MODE, impl)
    registry.REGISTRY[SUITE]["meta"]["description"] = (
        f"One training step (forward + backward of every member), {THREADS} threads, rounds of {CYCLES} steps "
        "with different random members (medians per step): tofa_fast = --step fused (Supernet.forward_many), "
        "shared = --step shared (Supernet.backward_many: what members with the same images agree on, once), sequential = "
        "--step sequential, ofa = the ofa package's sandwich step on OFAMobileNetV3(width_mult=1.2), "
        "ofa+accelerate = the same after tofa_fast.accelerate. Run: python -m pytest "
        "bench/test_bench_fused_step.py -p no:cacheprovider"
    )


@pytest.mark.parametrize(
    "case,impl", [(case, impl) for case, impls in CASES.items() for impl in impls], ids=lambda v: v.split(",")[0]
)
def test_fused_step(benchmark, bench_registry, case, impl):
    _expect_all(bench_registry)
    problem = _problem(case)
    if impl == "ofa+accelerate" and problem.accelerated is None:
        pytest.skip("tofa_fast.accelerate is not available")
    bench_registry.measure(
        benchmark,
        problem.runner(impl),
        SUITE,
        case,
        MODE,
        impl,
        time_per_bench=TIME_PER_BENCH,
        min_rounds=MIN_ROUNDS,
        max_rounds=MAX_ROUNDS,
        warmup_rounds=0,
        per_round=len(problem.plans),
        group=case,
    )


@pytest.mark.parametrize("case", list(CASES), ids=lambda v: v.split(",")[0])
def test_peak_activation_memory(bench_registry, case):
    problem = _problem(case)
    peaks = {impl: peak_activation_bytes(problem, impl) for impl in (*MULTI_MEMBER, "sequential")}
    memory = {f"{impl}_MiB": peak / 2**20 for impl, peak in peaks.items()}
    memory.update({f"{impl}/sequential": peaks[impl] / peaks["sequential"] for impl in MULTI_MEMBER})
    bench_registry.REGISTRY[SUITE]["meta"].setdefault("peak_activation_memory", {})[case] = memory


#: rounds of the interleaved A/B below, per case (the ofa_mbv3 step takes seconds)
INTERLEAVED_ROUNDS = {DIGITS_CASE: 16, PS_CASE: 8, OFA_CASE: 5}


@pytest.mark.parametrize("case", list(CASES), ids=lambda v: v.split(",")[0])
def test_shared_vs_sequential_interleaved(bench_registry, case):
    """The shared step's gain is ≈ 10% where members share, less than the drift of this shared
    machine's load between two benchmarks run one after the other. Here the two alternate round by
    round (A B B A ...), and the median of the per-round ratios goes into the results' ``meta``."""
    problem = _problem(case)
    ratios = bench_registry.interleaved_ratios(
        problem.runner("sequential"), problem.runner("shared"), INTERLEAVED_ROUNDS[case]
    )
    results = bench_registry.REGISTRY[SUITE]["meta"].setdefault("interleaved_shared_vs_sequential", {})
    results[case] = bench_registry.note_interleaved(SUITE, ratios, f"{case}: shared {{median:.3f}}× sequential")


@pytest.mark.parametrize("case", list(CASES), ids=lambda v: v.split(",")[0])
def test_tree_fusion_interleaved(bench_registry, case):
    """The shared step with an expansion node and its only (depthwise) child as the fused op
    (``shared_prefix.FUSE_EXPANSION_WITH_DEPTHWISE``) against the two as nodes of their own,
    alternating round by round; the median of the per-round ratios goes into the results' ``meta``."""
    from tofa_fast.nn import shared_prefix

    cycle = _problem(case).runner("shared")

    def switched(value: bool):
        def run():
            previous = shared_prefix.FUSE_EXPANSION_WITH_DEPTHWISE
            shared_prefix.FUSE_EXPANSION_WITH_DEPTHWISE = value
            try:
                cycle()
            finally:
                shared_prefix.FUSE_EXPANSION_WITH_DEPTHWISE = previous

        return run

    ratios = bench_registry.interleaved_ratios(switched(False), switched(True), INTERLEAVED_ROUNDS[case])
    results = bench_registry.REGISTRY[SUITE]["meta"].setdefault("interleaved_tree_fusion", {})
    results[case] = bench_registry.note_interleaved(
        SUITE, ratios, f"{case}: shared step, expansion + its only depthwise child fused {{median:.3f}}× two nodes"
    )


def test_targets(bench_registry):
    """Fails the run when our faster multi-member step (fused or shared, whichever is faster in the
    case) misses a target (needs the full benchmark above)."""
    if not bench_registry.complete(SUITE):
        pytest.skip("the benchmark did not run completely (filtered, or --benchmark-disable)")
    medians = bench_registry.REGISTRY[SUITE]["medians"]
    meta = bench_registry.REGISTRY[SUITE]["meta"]
    best = {}
    for case in CASES:
        times = medians[(case, MODE)]
        impl = min(MULTI_MEMBER, key=times.__getitem__)
        best[case] = impl
        meta.setdefault("vs_sequential", {})[case] = {i: times["sequential"] / times[i] for i in MULTI_MEMBER}
    misses = []

    def ratio(case, baseline):
        times = medians[(case, MODE)]
        return times[baseline] / times[best[case]]

    if ratio(DIGITS_CASE, "sequential") < TARGET_DIGITS:
        misses.append(
            f"digits: {best[DIGITS_CASE]} {ratio(DIGITS_CASE, 'sequential'):.2f}× sequential < {TARGET_DIGITS}×"
        )
    if ratio(OFA_CASE, "sequential") < TARGET_OFA_SEQUENTIAL:
        misses.append(
            f"ofa_mbv3: {best[OFA_CASE]} {ratio(OFA_CASE, 'sequential'):.2f}× sequential < {TARGET_OFA_SEQUENTIAL}×"
        )
    share = 1.0 / ratio(OFA_CASE, "ofa")
    if share > TARGET_OFA_PACKAGE:
        misses.append(f"ofa_mbv3: {best[OFA_CASE]} takes {share:.2f}× the ofa package's step > {TARGET_OFA_PACKAGE}×")
    for case, memory in meta.get("peak_activation_memory", {}).items():
        if memory[f"{best[case]}/sequential"] > TARGET_MEMORY:
            misses.append(
                f"{case}: {best[case]} peak activation memory {memory[f'{best[case]}/sequential']:.2f}× sequential"
                f" > {TARGET_MEMORY}×"
            )
    assert not misses, "; ".join(misses)
