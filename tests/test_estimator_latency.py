"""Latency tables: profiled layers are the extracted subnet's layers, tables resume, predictions are
table sums, validation reports its figures, foreign or broken tables are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tofa_fast
from tofa_fast.cli import main
from tofa_fast.estimator import Estimator, arch_layers
from tofa_fast.estimator.latency import LatencyTable
from tofa_fast.estimator.profile import ProfileSettings, build_layer, profile_space, spearman, validate_table
from tofa_fast.spaces import HeadSpec, SearchSpace, StageSpec, StemSpec

# Fast settings: what is tested here is the bookkeeping, not the quality of the timings.
FAST = {"min_time_s": 0.001, "repeats": 2, "calibration": 3, "passes": 2, "cold_bytes": 1}


def tiny_space() -> SearchSpace:
    return SearchSpace(
        name="tiny",
        resolutions=(16, 24),
        stem=StemSpec((8, 16), stride=2),
        stages=(
            StageSpec((8, 16), (1, 2), (3, 5), (2, 3), stride=1, act="relu"),
            StageSpec((16, 24), (1, 2), (3,), (2, 4), stride=2, se=True, act="hswish"),
        ),
        head=HeadSpec((32,), expand=2),
    )


@pytest.fixture(scope="module")
def rss_table(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("latency") / "rss.json")
    settings = ProfileSettings(device=torch.device("cpu"), num_classes=10, threads=1, **FAST)
    table = profile_space(tofa_fast.spaces.get("rss"), path, settings, log=lambda _: None)
    assert table.complete and table.calibrated
    return path


@pytest.mark.parametrize("preset", ["tofa", "ofa_mbv3", "rss", "digits"])
def test_profiled_layers_are_the_extracted_subnets_layers(preset):
    space = tofa_fast.spaces.get(preset)
    net = tofa_fast.Supernet(space, 10)
    for seed in range(3):
        arch = space.sample(seed)
        sub = net.extract(arch)
        extracted = [sub.stem, *sub.blocks, sub.head]
        built = [build_layer(c, space) for c in arch_layers(space, arch, 10)]
        assert [repr(m) for m in built] == [repr(m) for m in extracted]


def test_every_layer_an_arch_uses_is_in_the_table(rss_table):
    table = LatencyTable.load(rss_table)
    space = tofa_fast.spaces.get("rss")
    for seed in range(50):
        for config in arch_layers(space, space.sample(seed), 10):
            assert config.key in table.entries


def test_latency_is_the_corrected_sum_of_layer_latencies(rss_table):
    table = LatencyTable.load(rss_table)
    space = tofa_fast.spaces.get("rss")
    archs = [space.sample(i) for i in range(30)]
    expected = [
        sum(table.scale * table.entries[c.key] + table.layer_overhead_ms for c in arch_layers(space, a, 10))
        + table.offset_ms
        for a in archs
    ]
    for backend in ["python", "cpp"] if tofa_fast.estimator.cpp_estimator_available() else ["python"]:
        est = Estimator(space, 10, latency_table=rss_table, backend=backend)
        np.testing.assert_allclose(est.latency(archs), expected, rtol=1e-12)
        np.testing.assert_allclose(est.latency(space.encode(archs)), expected, rtol=1e-12)
        assert isinstance(est.latency(archs[0]), float)


def test_profiling_resumes_where_it_stopped(tmp_path):
    path = str(tmp_path / "tiny.json")
    space = tiny_space()
    settings = ProfileSettings(device=torch.device("cpu"), num_classes=10, threads=1, time_budget_s=0.2, **FAST)
    partial = profile_space(space, path, settings, log=lambda _: None)
    assert not partial.complete and 0 < sum(partial.counts.values())
    with pytest.raises(ValueError, match="incomplete"):
        Estimator(space, 10, latency_table=path)
    measured = dict(partial.entries)
    settings.time_budget_s = None
    table = profile_space(space, path, settings, log=lambda _: None)
    assert table.complete and table.calibrated
    # Entries of the first run are kept (a second pass may only lower them: min over passes).
    assert all(table.entries[k] <= v for k, v in measured.items())
    # A table measured under other conditions is not silently resumed.
    with pytest.raises(ValueError, match="batch_size"):
        profile_space(space, path, ProfileSettings(device=torch.device("cpu"), num_classes=10, batch_size=2, **FAST))


def test_validation_reports_rank_correlation_and_share_within_10_percent(rss_table):
    report = validate_table(rss_table, samples=6, seed=3, settings=ProfileSettings(device=torch.device("cpu"), **FAST))
    assert report.samples == 6 and len(report.measured_ms) == 6
    assert -1 <= report.spearman <= 1 and 0 <= report.within_10pct <= 1
    assert "Spearman" in report.summary()


def test_cli_profile_and_validate(tmp_path, capsys):
    path = str(tmp_path / "rss.json")
    flags = ["--min-time", "0.001", "--passes", "1", "--calibration", "2", "--threads", "1", "--cold-mib", "0.001"]
    assert main(["profile", "--space", "rss", "--device", "cpu", "-o", path, "--num-classes", "10", *flags]) == 0
    assert "written to" in capsys.readouterr().out
    report = str(tmp_path / "report.json")
    assert main(["profile", "--validate", path, "--samples", "3", "--min-time", "0.001", "-o", report]) == 0
    assert "Spearman" in capsys.readouterr().out
    assert json.load(open(report))["samples"] == 3
    assert main(["profile", "--validate", path, "--device", "cuda"]) == 2
    assert "measured on device 'cpu'" in capsys.readouterr().err


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.random(40), rng.random(40)
    b[:5] = b[5]  # ties
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


# -- refused tables ------------------------------------------------------------------------------


def test_table_of_another_space_is_refused(rss_table):
    with pytest.raises(ValueError, match="measured for space 'rss'"):
        Estimator("ofa_mbv3", 10, latency_table=rss_table)
    # Same name, other choices: the fingerprint tells them apart.
    other = tofa_fast.spaces.get("ofa_mbv3", width_mult=1.0, resolutions=(32, 36))
    with pytest.raises(ValueError, match="fingerprint"):
        Estimator(other, 10, latency_table=rss_table)


def test_table_of_another_device_or_class_count_is_refused(rss_table):
    with pytest.raises(ValueError, match="measured on device 'cpu'"):
        Estimator("rss", 10, latency_table=rss_table, device="cuda")
    with pytest.raises(ValueError, match="num_classes=10"):
        Estimator("rss", 1000, latency_table=rss_table)
    Estimator("rss", 10, latency_table=rss_table, device="cpu")


def test_broken_tables_are_refused(tmp_path, rss_table):
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LatencyTable.load(garbage)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a tofa_fast latency table"):
        LatencyTable.load(other)
    data = json.load(open(rss_table))
    key = next(iter(data["entries"]))
    data["entries"][key] = -1.0
    negative = tmp_path / "negative.json"
    negative.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="invalid latencies"):
        LatencyTable.load(negative)
    with pytest.raises(FileNotFoundError):
        LatencyTable.load(tmp_path / "missing.json")


def test_latency_without_a_table_says_how_to_build_one():
    with pytest.raises(RuntimeError, match="tofa-fast profile --space digits"):
        Estimator("digits", 10).latency(tofa_fast.spaces.get("digits").sample(0))
