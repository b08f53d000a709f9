"""bench/profile_step_cpu.py, the CPU step profiler, still runs against the step and benchmark code it
imports: its quick mode (batch 2, one cycle) through the batch and threads sections, and the
report it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_profile_reports_fixed_cost_and_per_op_times(tmp_path):
    script = os.path.join(ROOT, "bench", "profile_step_cpu.py")
    cmd = [sys.executable, script, "--quick", "--sections", "batch,threads", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "step_profile_cpu.json").read_text())
    batch = report["batch"]
    assert set(batch["ms_per_step"]) == {"1", "2"} and all(t > 0 for t in batch["ms_per_step"].values())
    # two points, one line: the fixed part and the per-image part add up to the larger batch's time
    assert abs(batch["fixed_ms"] + 2 * batch["ms_per_image"] - batch["ms_per_step"]["2"]) < 0.2
    threads = report["threads"]
    assert 0 < threads["glue_ms"]["1"] < threads["total_ms"]["1"]
    # Amdahl's bound from the unprofiled step at 1 and 2 threads: 2·T2 − T1
    t1, t2 = threads["step_ms"]["1"], threads["step_ms"]["2"]
    assert t1 > 0 and t2 > 0 and abs(threads["serial_ms_at_most"] - (2 * t2 - t1)) < 0.2
    assert any(op.startswith("tofa_fast::") for op in threads["top_ops_ms"])  # the step ran our kernels
    assert report["meta"]["threads"] == 2


def test_unknown_section_is_refused():
    script = os.path.join(ROOT, "bench", "profile_step_cpu.py")
    done = subprocess.run([sys.executable, script, "--sections", "batch,nope"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown sections ['nope']" in done.stderr
