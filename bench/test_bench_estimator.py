"""CPU benchmark of batched FLOPs estimation, one thread: tofa_fast (C++) vs its NumPy reference vs
fvcore vs the `ofa` package.

Cases: the ``tofa`` preset (the 10 M archs/s target) and ``ofa_mbv3`` (where the `ofa` package's own
counters apply). Implementations, each timed on the archs it can take in reasonable time:

* ``tofa_fast`` — ``Estimator.flops`` on an encoded batch of 2²⁰ archs (C++ ``estimator_sum``);
* ``python`` — the same with ``backend="python"`` (NumPy table sums, the reference/fallback), 2¹⁷ archs;
* ``fvcore`` — ``FlopCountAnalysis`` of the extracted subnet (what ``flops`` must equal), a few archs;
* ``ofa_flops_table`` — ``ofa.tutorial.flops_table.FLOPsTable.predict_efficiency``, OFA's Python
  per-block lookup table (its table built at 224 px with OFA's own ``count_net_flops``, as ``thop``,
  which ``FLOPsTable`` would use, is not a dependency), 2 000 archs;
* ``ofa_count_net_flops`` — ``ofa.utils.count_net_flops`` on ``OFAMobileNetV3.get_active_subnet``, a
  few archs.

Times are per arch (the table's "ms" column holds ms per 1 000 archs, i.e. µs per arch); throughputs
in archs/s are in the saved JSON (``meta``). ``test_target`` asserts the C++ estimator scores at
least 10 M ``tofa`` archs/s on one core (median over rounds). ``meta`` also records which C++ kernel
ran (``estimator_kernel``: the AVX2 row kernel, or the portable one with ``TOFA_FAST_CPU_ISA=baseline``
or without AVX2) and the CPU's SIMD flags.

Run: ``python -m pytest bench/test_bench_estimator.py -p no:cacheprovider``
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random

import numpy as np
import pytest
import torch

import tofa_fast
from tofa_fast.estimator import Estimator, cpp_estimator_available

SUITE = "estimator_cpu"
MODE = "flops µs/arch"
TARGET_ARCHS_PER_S = 10e6
PER = 1000  # recorded times are seconds per PER archs, printed as ms: µs per arch
BATCH = {"tofa_fast": 1 << 20, "python": 1 << 17, "fvcore": 4, "ofa_flops_table": 2000, "ofa_count_net_flops": 4}
ROUNDS = {"tofa_fast": 15, "python": 5, "fvcore": 2, "ofa_flops_table": 3, "ofa_count_net_flops": 2}
CASES = {
    "tofa": ("tofa_fast", "python", "fvcore"),
    "ofa_mbv3": ("tofa_fast", "python", "fvcore", "ofa_flops_table", "ofa_count_net_flops"),
}
PARAMS = [(case, impl) for case, impls in CASES.items() for impl in impls]

pytestmark = pytest.mark.skipif(not cpp_estimator_available(), reason="the C++ estimator is not built")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the throughput figure is for one core
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def estimators() -> dict[str, Estimator]:
    return {case: Estimator(case) for case in CASES}


@pytest.fixture(scope="module")
def batches(estimators) -> dict[str, np.ndarray]:
    """2²⁰ archs per case, uniform over all subnets (the estimator's own sampler)."""
    return {case: est.sample(BATCH["tofa_fast"], seed=0, as_codes=True) for case, est in estimators.items()}


def _ofa_mbv3_dicts(space, archs) -> list[dict]:
    """OFA's (ks, e, d, r) description of ofa_mbv3 archs (stages[1:] are OFA's elastic stages)."""
    out = []
    for arch in archs:
        ks, e, d = [], [], []
        for stage in arch.stages[1:]:
            pad = 4 - stage.depth
            ks += list(stage.kernel) + [3] * pad
            e += [int(x) for x in stage.expand] + [3] * pad
            d.append(stage.depth)
        out.append({"ks": ks, "e": e, "d": d, "r": [arch.resolution]})
    return out


def _ofa_flops_table():
    import ofa
    from ofa.utils.pytorch_utils import count_net_flops

    # ofa.tutorial's __init__ pulls in model-zoo downloads (gdown); load only the table module.
    path = os.path.join(os.path.dirname(ofa.__file__), "tutorial", "flops_table.py")
    spec = importlib.util.spec_from_file_location("ofa_flops_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.FLOPsTable.__new__(module.FLOPsTable)  # __init__ would build 5 resolutions and save a file
    table.multiplier, table.pred_type, table.device, table.batch_size = 1.2, "flops", "cpu", 1
    table.measure_single_layer_flops = lambda layer, shape: count_net_flops(layer.eval(), shape) / 1e6
    table.efficiency_dict = {}
    table.build_single_lut(1, 224)  # stores itself in efficiency_dict[224]
    return table


def _runner(case: str, impl: str, estimators, batches):
    """A zero-argument callable scoring BATCH[impl] archs with ``impl``, and a correctness check."""
    est, space = estimators[case], estimators[case].space
    codes = batches[case]
    if impl == "tofa_fast":
        return (lambda: est.flops(codes)), None
    if impl == "python":
        reference = Estimator(space, backend="python")
        part = codes[: BATCH["python"]]
        return (lambda: reference.flops(part)), lambda out: np.testing.assert_array_equal(out, est.flops(part))
    archs = space.decode(codes[: BATCH[impl]])
    if impl == "fvcore":
        from fvcore.nn import FlopCountAnalysis

        logging.getLogger("fvcore").setLevel(logging.ERROR)
        net = tofa_fast.Supernet(space).requires_grad_(False)

        def run():
            counts = []
            for arch in archs:  # extraction is part of it: fvcore needs the model
                r = arch.resolution
                analysis = FlopCountAnalysis(net.extract(arch).eval(), torch.zeros(1, 3, r, r))
                analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
                counts.append(analysis.total())
            return counts

        return run, lambda out: np.testing.assert_array_equal(out, est.flops(archs))
    if impl == "ofa_flops_table":
        table = _ofa_flops_table()
        rng = random.Random(0)
        samples = [
            {"ks": rng.choices([3, 5, 7], k=20), "e": rng.choices([3, 4, 6], k=20), "d": rng.choices([2, 3, 4], k=5)}
            for _ in range(BATCH[impl])
        ]
        for sample in samples:
            sample["r"] = [224]  # the resolution its table was built for
        return (lambda: [table.predict_efficiency(s) for s in samples]), None
    if impl == "ofa_count_net_flops":
        from ofa.imagenet_classification.elastic_nn.networks import OFAMobileNetV3
        from ofa.utils.pytorch_utils import count_net_flops

        ofa_net = OFAMobileNetV3(width_mult=1.2, ks_list=[3, 5, 7], expand_ratio_list=[3, 4, 6], depth_list=[2, 3, 4])
        descriptions = _ofa_mbv3_dicts(space, archs)

        def run():
            counts = []
            for desc in descriptions:
                ofa_net.set_active_subnet(ks=desc["ks"], e=desc["e"], d=desc["d"])
                subnet = ofa_net.get_active_subnet(preserve_weight=False).eval()
                r = desc["r"][0]
                counts.append(count_net_flops(subnet, (1, 3, r, r)))
            return counts

        return run, None
    raise ValueError(impl)


def _estimator_kernel() -> str:
    ops = torch.ops.tofa_fast
    return ops._estimator_sum_isa() if hasattr(ops, "_estimator_sum_isa") else "baseline"


def _simd_flags() -> list[str]:
    """The x86 SIMD flags of this CPU (/proc/cpuinfo), e.g. ["avx", "avx2", "fma", …]; [] elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted({flag for flag in flags if flag.startswith(("avx", "fma", "sse4"))})


@pytest.mark.parametrize(("case", "impl"), PARAMS, ids=[f"{c}-{i}" for c, i in PARAMS])
def test_flops_throughput(benchmark, bench_registry, estimators, batches, case, impl):
    for c, i in PARAMS:
        bench_registry.expect(SUITE, c, MODE, i)
    run, check = _runner(case, impl, estimators, batches)
    out = benchmark.pedantic(run, rounds=ROUNDS[impl], iterations=1, warmup_rounds=1)
    if check is not None:
        check(out)
    per_arch = benchmark.stats.stats.median / BATCH[impl]
    bench_registry.record(SUITE, case, MODE, impl, per_arch * PER)
    meta = bench_registry.REGISTRY[SUITE]["meta"]
    meta["description"] = __doc__.split("\n\n")[0]
    meta.setdefault("archs_per_s_one_thread", {}).setdefault(case, {})[impl] = 1.0 / per_arch
    meta.setdefault("batch", BATCH)
    meta["torch_threads_while_timing"] = torch.get_num_threads()
    meta["estimator_kernel"] = _estimator_kernel()
    meta["cpu_simd_flags"] = _simd_flags()
    benchmark.extra_info["archs_per_s"] = 1.0 / per_arch


def test_target(bench_registry):
    """≥ 10 M tofa archs/s on one core for the C++ estimator (median round of the benchmark above)."""
    medians = bench_registry.REGISTRY[SUITE]["medians"].get(("tofa", MODE), {})
    if "tofa_fast" not in medians:
        pytest.skip("run together with test_flops_throughput[tofa-tofa_fast]")
    archs_per_s = PER / medians["tofa_fast"]
    assert archs_per_s >= TARGET_ARCHS_PER_S, f"{archs_per_s / 1e6:.1f} M archs/s < 10 M archs/s"
