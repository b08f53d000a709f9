"""Estimator.flops / params are exactly fvcore's count / the parameter count of the extracted subnet.

≥ 200 random archs per preset, every resolution of the preset among them (ofa_mbv3 has 25), plus
the smallest and largest arch. fvcore is slow (it traces the subnet), so the comparison runs with
one intra-op thread and parameters that do not require grad: neither changes what fvcore counts.
"""

from __future__ import annotations

import dataclasses
import logging
import random

import numpy as np
import pytest
import torch

import tofa_fast
from tofa_fast.estimator import Estimator, arch_layers, cpp_estimator_available

# Classes per preset: ImageNet heads for the ImageNet spaces, small heads for the small ones.
PRESETS = {"digits": 10, "rss": 10, "ofa_mbv3": 1000, "tofa": 1000}
ARCHS_PER_PRESET = 200
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


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-1 tracing is overhead-bound; a second thread only adds contention
    yield
    torch.set_num_threads(previous)


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(PRESETS))
def test_flops_and_params_equal_fvcore_and_extracted_model(preset, one_thread):
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    space, num_classes = tofa_fast.spaces.get(preset), PRESETS[preset]
    archs = covering_archs(space, ARCHS_PER_PRESET, seed=len(preset))
    assert {a.resolution for a in archs} == set(space.resolutions)
    estimators = [Estimator(space, num_classes, backend=b) for b in BACKENDS]
    codes = space.encode(archs)
    net = tofa_fast.Supernet(space, num_classes).requires_grad_(False)

    expected_flops, expected_params = [], []
    for arch in archs:
        sub = net.extract(arch).eval().requires_grad_(False)
        expected_flops.append(fvcore_flops(sub, arch.resolution))
        expected_params.append(sum(p.numel() for p in sub.parameters()))
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
