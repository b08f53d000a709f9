"""The estimator's two C++ kernels give the same answers: the AVX2 row program (csrc/estimator/
estimator_avx2.cpp, chosen on CPUs with AVX2) and the portable scalar loop (TOFA_FAST_CPU_ISA=baseline,
run here in a subprocess), against each other bit for bit and against the NumPy reference.

Cases cover every path of the AVX2 kernel: the last rows (read through a padded scratch row), bad rows
in any parallel chunk, values far outside the choice ranges (its checks shift by value + 1), float
tables (sums added in the same order), per-layer expand choices, layers of depth 1, and plans beyond
its limits (more than 8 stages, 31 choices, 8 layers, or codes shorter than 8), which fall back to
the scalar loop.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

import tofa_fast
from tofa_fast.estimator import Estimator, cpp_estimator_available
from tofa_fast.spaces import HeadSpec, SearchSpace, StageSpec, StemSpec

pytestmark = pytest.mark.skipif(not cpp_estimator_available(), reason="C++ extension not built")

TESTS = os.path.dirname(os.path.abspath(__file__))
# Values that probe the kernels' range checks: -1 (inactive), the edges of the 5-bit shift window
# of the AVX2 check (30, 31, 32), and far outside any choice range.
PROBES = (-(2**31), -(2**16), -2, -1, 0, 1, 2, 3, 5, 30, 31, 32, 33, 63, 64, 2**16, 2**31 - 1)


def _stage(widths, depths, kernels=(3,), expands=(2,), stride=1, **kw) -> StageSpec:
    return StageSpec(tuple(widths), tuple(depths), tuple(kernels), tuple(expands), stride, **kw)


def spaces() -> dict[str, SearchSpace]:
    """Presets and small spaces at (and beyond) the AVX2 row program's limits."""
    head = HeadSpec((16, 24), expand=2)
    small = dict(resolutions=(16, 20), stem=StemSpec((8, 16)), head=head)
    out = {name: tofa_fast.spaces.get(name) for name in ("tofa", "ofa_mbv3", "rss", "digits")}
    out["narrowed"] = SearchSpace(  # per-layer expand choices
        name="narrowed",
        stages=(
            _stage((8, 16), (2, 3), (3, 5), (2, 3, 4), 2, layer_expands=((2, 3), (3, 4), (2, 4))),
            _stage((16,), (1,), (3,), (2, 3)),  # depth 1 only: no later layers
        ),
        **small,
    )
    for granularity in ("stage", "layer"):
        out[f"nine_stages_{granularity}"] = SearchSpace(  # one stage more than the AVX2 lanes
            name=f"nine_stages_{granularity}",
            stages=tuple(_stage((8, 16), (1, 2), (3, 5), (2, 3)) for _ in range(9)),
            granularity=granularity,
            **small,
        )
        out[f"deep_{granularity}"] = SearchSpace(  # one layer more than the AVX2 lanes
            name=f"deep_{granularity}",
            stages=(_stage((8,), (2, 9), (3, 5), (2, 3)), _stage((8, 16), (8,), (3,), (2, 3, 4))),
            granularity=granularity,
            **small,
        )
    out["many_resolutions"] = SearchSpace(  # 32 choices: beyond the 5-bit checks
        name="many_resolutions",
        resolutions=tuple(range(16, 48)),
        stem=StemSpec((8,)),
        stages=(_stage((8, 16), (1, 2), (3, 5), (2, 3), 2),),
        head=head,
    )
    out["short_code"] = SearchSpace(  # code_length 7 < 8 lanes
        name="short_code",
        stages=(_stage((8, 16), (1,), (3, 5), (2, 3)),),
        **small,
    )
    return out


def _outcome(score, codes) -> list | str:
    """``score(codes)`` as a list, or the message of the ValueError it raises."""
    try:
        return score(codes).tolist()
    except ValueError as exc:
        return str(exc)


def _corrupted(space: SearchSpace, clean: np.ndarray, rng: np.random.Generator, count: int) -> list[np.ndarray]:
    batches = []
    for _ in range(count):
        codes = clean.copy()
        for _ in range(rng.integers(1, 3)):  # one or two bad entries: the first bad row is reported
            codes[rng.integers(len(codes)), rng.integers(codes.shape[1])] = rng.choice(PROBES)
        batches.append(codes)
    return batches


def kernel_outputs() -> dict:
    """Every case's outcome from the C++ kernel this process runs (picklable)."""
    results: dict = {"isa": torch.ops.tofa_fast._estimator_sum_isa()}
    for name, space in spaces().items():
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        est = Estimator(space, backend="cpp")
        archs = [space.min_arch(), space.max_arch()] + [space.sample(i) for i in range(300)]
        clean = space.encode(archs)
        floats = rng.standard_normal(est.layout.size)
        floats[rng.random(floats.size) < 0.2] = -0.0  # x + -0.0 must stay x, -0.0 included
        float_table = torch.from_numpy(floats)
        results[name] = {
            "flops": est.flops(clean),
            "params": est.params(clean),
            # A float table summed by the kernel directly (latency tables need profiling).
            "floats": torch.ops.tofa_fast.estimator_sum(torch.from_numpy(clean), *est._plan, float_table).numpy(),
            "corrupted": [_outcome(est.flops, codes) for codes in _corrupted(space, clean, rng, 120)],
        }
    return results


def test_avx2_and_baseline_kernels_agree_bit_for_bit(tmp_path):
    here = kernel_outputs()
    path = tmp_path / "baseline.pkl"
    script = (
        f"import pickle, sys; sys.path.insert(0, {TESTS!r}); import test_estimator_kernels as t; "
        f"pickle.dump(t.kernel_outputs(), open({str(path)!r}, 'wb'))"
    )
    env = dict(os.environ, TOFA_FAST_CPU_ISA="baseline")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    baseline = pickle.loads(path.read_bytes())
    assert baseline["isa"] == "baseline"
    if here["isa"] != "AVX2":
        pytest.skip(f"this CPU runs the {here['isa']} kernel only")
    for name in spaces():
        ours, theirs = here[name], baseline[name]
        for key in ("flops", "params"):
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{name} {key}")
        # Bit for bit, signed zeros included.
        assert ours["floats"].tobytes() == theirs["floats"].tobytes(), name
        assert ours["corrupted"] == theirs["corrupted"], name


@pytest.mark.parametrize("name", list(spaces()))
def test_kernel_matches_the_numpy_reference(name):
    space = spaces()[name]
    cpp, python = Estimator(space, backend="cpp"), Estimator(space, backend="python")
    rng = np.random.default_rng(1)
    clean = space.encode([space.sample(i) for i in range(200)])
    np.testing.assert_array_equal(cpp.flops(clean), python.flops(clean))
    np.testing.assert_array_equal(cpp.params(clean), python.params(clean))
    for codes in _corrupted(space, clean, rng, 100):
        assert _outcome(cpp.flops, codes) == _outcome(python.flops, codes)


@pytest.mark.parametrize("preset", ["tofa", "ofa_mbv3"])
def test_bad_rows_anywhere_in_a_large_batch(preset):
    """Several parallel chunks (16k rows each), the padded last rows, the first bad row reported."""
    space = tofa_fast.spaces.get(preset)
    cpp, python = Estimator(space, backend="cpp"), Estimator(space, backend="python")
    codes = cpp.sample(3 * 16384 + 5, seed=3, as_codes=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        np.testing.assert_array_equal(cpp.flops(codes), python.flops(codes))
        for rows in ([len(codes) - 1], [len(codes) - 3, 20000], [40000, 16384], [0, len(codes) - 1]):
            bad = codes.copy()
            for row in rows:
                bad[row, 1] = 99  # stem index
            with pytest.raises(ValueError, match=rf"codes\[{min(rows)}\] stem index 99 is out of range"):
                cpp.flops(bad)
        # Only the very last entry of the buffer is bad (the scratch-row path).
        bad = codes.copy()
        bad[-1, -1] = 2**31 - 1
        assert _outcome(cpp.flops, bad) == _outcome(python.flops, bad)
    finally:
        torch.set_num_threads(previous)


def test_cpu_isa_is_reported():
    isa = torch.ops.tofa_fast._estimator_sum_isa()
    assert isa in ("AVX2", "baseline")
    if os.environ.get("TOFA_FAST_CPU_ISA") == "baseline":
        assert isa == "baseline"
