"""scripts/gpu_check.sh, the one command for a GPU machine, kept from rotting by running its dry mode.

The dry mode runs every stage in a minimal CPU form (no CUDA build, GPU tests and benchmarks skip
themselves, a one-epoch run on a generated ImageFolder, tiny rss latency tables); what only a GPU
can check runs when the script is run on one (issue 11).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
STAGES = [
    "env",
    "build",
    "info",
    "gpu-tests",
    "kernel-bench",
    "kernel-profile",
    "gpu-bench",
    "fused-bench",
    "step-profile",
    "train",
    "profile-b1",
    "validate-b1",
    "profile-b32",
    "validate-b32",
]


def _run(out, **env):
    return subprocess.run(
        ["bash", SCRIPT, "--dry-run", str(out)],
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_dry_run_passes_every_stage_and_writes_the_summary(tmp_path):
    result = _run(tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == STAGES
    assert all(s["status"] in ("passed", "skipped") for s in summary["stages"]), summary["stages"]
    assert summary["machine"]["dry_run"] and summary["machine"]["torch"]
    assert summary["results"]["train_palette"], "the one-epoch run must write its palette"
    for batch in (1, 32):
        report = summary["results"][f"rss_cpu_b{batch}"]
        assert report["samples"] == 4 and -1 <= report["spearman"] <= 1
    markdown = (tmp_path / "summary.md").read_text()
    assert "dry run" in markdown and all(f"| {stage} |" in markdown for stage in STAGES)


def test_a_spent_budget_still_writes_the_summary(tmp_path):
    """Stages that no longer fit are reported, not silently dropped, and the run says it failed."""
    result = _run(tmp_path, TOFA_FAST_GPU_CHECK_BUDGET="1")
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(s["stage"], s["status"]) for s in summary["stages"]] == [(stage, "out of time") for stage in STAGES]
    assert "| train | out of time |" in (tmp_path / "summary.md").read_text()


def test_usage_without_outdir():
    result = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "usage: scripts/gpu_check.sh" in result.stderr
