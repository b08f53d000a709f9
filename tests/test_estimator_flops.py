"""Estimator.flops / params are exactly fvcore's count / the parameter count of the extracted subnet.

48 random archs per preset, every resolution of the preset among them (ofa_mbv3 has 25), plus
the smallest and largest arch: with every kernel, expand, depth and width choice of every stage
drawn many times over, more archs repeat layers already counted (the layer-by-layer identity of the
estimator's tables is checked on 500 archs per preset below, without fvcore). fvcore is slow (it
traces the subnet: ~0.05–0.5 s per arch here), so the extractions and counts run in a pool of
worker processes (one per core), each with one
intra-op thread, one cached supernet per preset, parameters that do not require grad, and without
the random initialisation of the fresh layers ``extract`` creates and then overwrites with copied
weights — none of which changes the extracted model or what fvcore counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import random
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch

import tofa_fast
from tofa_fast.estimator import Estimator, arch_layers, cpp_estimator_available

# Classes per preset: ImageNet heads for the ImageNet spaces, small heads for the small ones.
PRESETS = {"digits": 10, "rss": 10, "ofa_mbv3": 1000, "tofa": 1000}
ARCHS_PER_PRESET = 48
BACKENDS = ["python"] + (["cpp"] if cpp_estimator_available() else [])


def covering_archs(space: tofa_fast.spaces.SearchSpace, n: int, seed: int) -> list:
    """``n`` random archs (min and max arch first) that cycle through every resolution of ``space``."""
    rng = random.Random(seed)
    archs = [space.min_arch(), space.max_arch()]
    while len(archs) < n:
        resolution = space.resolutions[len(archs) % len(space.resolutions)]
        archs.append(dataclasses.replace(space.sample(rng), resolution=resolution))
    return archs


def fvcore_flops(model: torch.nn.Module, resolution: int) -> int:
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model.eval(), torch.zeros(1, 3, resolution, resolution))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return int(analysis.total())


@contextlib.contextmanager
def _no_fresh_layer_init():
    """Skip the random init of the new Conv2d/Linear layers ``extract`` builds: it copies every
    weight into them right after, and the init is a third of the extraction time."""
    saved = torch.nn.Conv2d.reset_parameters, torch.nn.Linear.reset_parameters
    torch.nn.Conv2d.reset_parameters = torch.nn.Linear.reset_parameters = lambda self: None
    try:
        yield
    finally:
        torch.nn.Conv2d.reset_parameters, torch.nn.Linear.reset_parameters = saved


_SUPERNETS: dict[tuple[str, int], tofa_fast.Supernet] = {}


def extracted_counts(preset: str, num_classes: int, arch_strings: list[str]) -> list[tuple[int, int]]:
    """(fvcore FLOPs, parameter count) of each extracted subnet (runs in a worker process)."""
    torch.set_num_threads(1)  # batch-1 tracing is overhead-bound; more threads only add contention
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    space = tofa_fast.spaces.get(preset)
    if (preset, num_classes) not in _SUPERNETS:
        _SUPERNETS[(preset, num_classes)] = tofa_fast.Supernet(space, num_classes).requires_grad_(False)
    net = _SUPERNETS[(preset, num_classes)]
    out = []
    for text in arch_strings:
        arch = space.arch_from_string(text)
        with _no_fresh_layer_init():
            sub = net.extract(arch).eval().requires_grad_(False)
        out.append((fvcore_flops(sub, arch.resolution), sum(p.numel() for p in sub.parameters())))
    return out


@pytest.fixture(scope="module")
def workers():
    # spawn, not fork: the parent's OpenMP thread pool does not survive a fork.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1), mp_context=context) as pool:
        yield pool


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(PRESETS))
def test_flops_and_params_equal_fvcore_and_extracted_model(preset, workers):
    space, num_classes = tofa_fast.spaces.get(preset), PRESETS[preset]
    archs = covering_archs(space, ARCHS_PER_PRESET, seed=len(preset))
    assert {a.resolution for a in archs} == set(space.resolutions)
    for i, stage in enumerate(space.stages):  # every choice of every stage is among the counted archs
        drawn = [a.to_dict()["stages"][i] for a in archs]
        assert {d["width"] for d in drawn} == set(stage.widths) and {d["depth"] for d in drawn} == set(stage.depths)
        assert {k for d in drawn for k in d["kernel"]} == set(stage.kernels), (preset, i)
        assert {e for d in drawn for e in d["expand"]} == set(stage.expands), (preset, i)
    estimators = [Estimator(space, num_classes, backend=b) for b in BACKENDS]
    codes = space.encode(archs)

    chunks = [[str(a) for a in archs[i : i + 12]] for i in range(0, len(archs), 12)]
    counts = [
        c
        for part in workers.map(extracted_counts, [preset] * len(chunks), [num_classes] * len(chunks), chunks)
        for c in part
    ]
    expected_flops, expected_params = [c[0] for c in counts], [c[1] for c in counts]
    for est in estimators:
        for batch in (archs, codes):
            np.testing.assert_array_equal(est.flops(batch), expected_flops, err_msg=f"{preset} {est.backend}")
            np.testing.assert_array_equal(est.params(batch), expected_params, err_msg=f"{preset} {est.backend}")


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_table_sum_equals_layer_by_layer_reference(preset, backend):
    space, num_classes = tofa_fast.spaces.get(preset), PRESETS[preset]
    archs = covering_archs(space, 500, seed=1)
    est = Estimator(space, num_classes, backend=backend)
    layers = [arch_layers(space, a, num_classes) for a in archs]
    np.testing.assert_array_equal(est.flops(archs), [sum(c.flops() for c in ls) for ls in layers])
    np.testing.assert_array_equal(est.params(archs), [sum(c.params() for c in ls) for ls in layers])


@pytest.mark.skipif(not cpp_estimator_available(), reason="C++ extension not built")
@pytest.mark.parametrize("preset", list(PRESETS))
def test_cpp_and_python_backends_agree_on_many_archs(preset):
    space = tofa_fast.spaces.get(preset)
    codes = space.encode([space.sample(i) for i in range(2000)])
    cpp, python = Estimator(space, backend="cpp"), Estimator(space, backend="python")
    for name in ("flops", "params"):
        np.testing.assert_array_equal(getattr(cpp, name)(codes), getattr(python, name)(codes))


def test_one_arch_gives_a_number_and_a_batch_gives_an_array():
    space = tofa_fast.spaces.get("digits")
    est = Estimator(space, 10)
    arch = space.sample(3)
    flops = est.flops(arch)
    assert isinstance(flops, int) and flops == est.flops(arch.to_dict())
    batch = est.flops([arch, arch])
    assert batch.dtype == np.int64 and batch.shape == (2,) and (batch == flops).all()
    assert est.flops([]).shape == (0,)
    assert isinstance(est.params(arch), int)


def test_num_classes_changes_only_the_classifier():
    space = tofa_fast.spaces.get("rss")
    arch = space.max_arch()
    f10, f1000 = Estimator(space, 10).flops(arch), Estimator(space, 1000).flops(arch)
    assert f1000 - f10 == 990 * arch.head
    p10, p1000 = Estimator(space, 10).params(arch), Estimator(space, 1000).params(arch)
    assert p1000 - p10 == 990 * (arch.head + 1)
