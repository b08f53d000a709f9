#!/usr/bin/env bash
# The one command to run on a GPU machine (issue 11): it checks and measures everything GPU-only.
#
#   scripts/gpu_check.sh OUTDIR             on the GPU machine (≤ 8 minutes on an H100)
#   scripts/gpu_check.sh --dry-run OUTDIR   CPU only: every stage in a minimal form (CI runs this,
#                                           tests/test_gpu_check_script.py; also TOFA_FAST_GPU_CHECK_DRY_RUN=1)
#   scripts/gpu_check.sh --only build,fused-bench OUTDIR
#                                           a rerun of some stages (the others are reported "not selected");
#                                           gpu-bench runs on a GPU only when named here
#
# Stages, in order, each under `timeout` and none stopping the ones after it:
#   env         GPU, driver, torch / CUDA / triton / nvcc versions       -> env.json
#   build       the extension with the CUDA kernels, all cores           -> build.log
#               (dry: no compile; checks the installed package imports)
#   info        `tofa-fast info`: which backend serves what, and why     -> info.log
#   gpu-tests   `pytest -m gpu tests` (op vs reference fp32/bf16/mixed, NCHW and channels_last,
#               opcheck on cuda, Triton in process, autocast training)   -> gpu-tests.log, gpu-tests.xml
#               (dry: tests/test_elastic_dwconv_cuda.py only)
#               (TOFA_FAST_GPU_CHECK_TESTS: other test paths, e.g. tests/test_elastic_dwconv_cuda.py)
#   kernel-bench bench/test_dwconv_kernels_gpu.py: the compiled CUDA op vs cuDNN, launch for launch
#               (issue 11's kernel targets; outputs checked against float64)
#                                                                        -> kernel-bench.log, dwconv_kernels_gpu.{json,md}
#   kernel-profile bench/profile_dwconv_kernels.py under Nsight Compute (`ncu`, skipped without it):
#               per kernel of the op's forward and backward, duration, occupancy, throughput and what
#               the warps stall on, for k = 7 / 3 MobileNetV3 shapes     -> kernel-profile.log, kernel-profile.txt
#   gpu-bench   bench/test_elastic_dwconv_gpu.py (needs pytest-benchmark; skipped without it)
#                                                                        -> gpu-bench.log, elastic_dwconv_gpu.{json,md}
#   fused-bench bench/test_bench_fused_step_gpu.py: the fused, shared and graphed vs sequential sandwich
#               step, ofa_mbv3 128 px batch 32, bf16 + channels_last and fp32 (issue 13)
#                                                                        -> fused-bench.log, fused_step_gpu.{json,md}
#   step-profile bench/profile_step_gpu.py: wall vs GPU-busy time per step, launches, top ops
#               (dry: --help only; its CPU mode takes minutes)             -> step-profile.log, step_profile_gpu.json
#               (TOFA_FAST_STEP_PROFILE_VARIANTS: some variants, in order, e.g. "sequential,graphed")
#   train       the default run for 3 epochs with the default flags     -> run/, train.log
#               (dry: 1 epoch on a generated 2-class ImageFolder, on the CPU)
#   profile-bB  a latency table of the rss space at batch B = 1, 32      -> rss_<device>_bB.json
#   validate-bB the table against timed random subnets (Spearman, share within ±10%)
#                                                                        -> rss_<device>_bB_validation.json
# and last summary.md / summary.json: the machine, and per stage passed / failed / timed out /
# skipped / out of time, with its time. Exit status 0 when every stage passed or was skipped.
#
# Time: the whole run fits TOFA_FAST_GPU_CHECK_BUDGET seconds (default 470: 8 minutes less a margin).
# Each stage gets its own cap, cut so that the stages after it keep their minimum. Stopped stages get
# SIGINT first: pytest still prints its summary (the benchmark's partial side-by-side table), the
# trainer writes its checkpoint, the profiler saves its partial table.
#
# Python: ${PYTHON:-python3} (on the GPU machine, the image's own torch / triton / nvcc; a .venv is
# neither needed nor used unless PYTHON points at it). The checkout goes on PYTHONPATH, so later stages
# still import tofa_fast (on its pure-PyTorch fallbacks) when the build fails.
set -uo pipefail

DRY_RUN=${TOFA_FAST_GPU_CHECK_DRY_RUN:-0}
OUTDIR=""
ONLY=""
while [ $# -gt 0 ]; do
    arg=$1
    shift
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        --only)
            ONLY=${1:-}
            shift
            ;;
        -h | --help)
            sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        -*)
            echo "gpu_check.sh: unknown option $arg" >&2
            exit 2
            ;;
        *) OUTDIR=$arg ;;
    esac
done
if [ -z "$OUTDIR" ]; then
    echo "usage: scripts/gpu_check.sh [--dry-run] OUTDIR" >&2
    exit 2
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUTDIR"
OUT=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-python3}
BUDGET=${TOFA_FAST_GPU_CHECK_BUDGET:-470}
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$SECONDS
if [ "$DRY_RUN" = 1 ]; then DEVICE=cpu; else DEVICE=cuda; fi
: >"$OUT/stages.tsv"

# ---- stages ----------------------------------------------------------------------------------
# Each reads LIMIT (its seconds) and writes what it makes under $OUT. Exit status: 0 passed,
# 77 skipped (the reason on the last line of its log), anything else failed.

stage_env() {
    "$PY" - "$OUT/env.json" "$DRY_RUN" <<'EOF'
import json, platform, shutil, subprocess, sys

def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None

info = {"python": platform.python_version(), "executable": sys.executable, "dry_run": sys.argv[2] == "1"}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
except ImportError as exc:
    info["torch"] = f"not importable: {exc}"
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
if shutil.which("nvidia-smi"):
    info["driver"] = run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
nvcc = shutil.which("nvcc")
info["nvcc"] = (run(nvcc, "--version") or "").splitlines()[-1:] if nvcc else None
try:
    from tofa_fast.backends import cpu_model
    info["cpu"] = cpu_model()
except ImportError:
    info["cpu"] = platform.processor()
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
if not info.get("cuda_available") and not info["dry_run"]:
    print("no CUDA device is visible: the GPU stages will fail or skip (use --dry-run on a CPU machine)")
EOF
}

stage_build() {
    if [ "$DRY_RUN" = 1 ]; then
        # No compile in the dry run (minutes on two cores): the package as installed must import.
        "$PY" -c "import tofa_fast, tofa_fast._extension as e; print(tofa_fast.__file__); print('extension:', e.available() or e.LOAD_ERROR)"
        return
    fi
    TOFA_FAST_BUILD_CUDA=1 MAX_JOBS=$(nproc) "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . &&
        "$PY" -c "import sys, tofa_fast._extension as e; print('with CUDA:', e.built_with_cuda()); sys.exit(0 if e.built_with_cuda() else 1)"
}

stage_info() {
    "$PY" -m tofa_fast info
}

stage_gpu_tests() {
    # Dry: one test file (collecting the whole suite takes ~15 s on two cores; the suite runs in CI anyway).
    local tests=tests
    [ "$DRY_RUN" = 1 ] && tests=tests/test_elastic_dwconv_cuda.py
    # shellcheck disable=SC2086
    "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider ${TOFA_FAST_GPU_CHECK_TESTS:-$tests} --junitxml="$OUT/gpu-tests.xml"
    local rc=$?
    # 5: nothing collected (no test marked gpu here).
    if [ $rc = 5 ]; then echo "skipped: no test marked gpu was collected"; return 77; fi
    return $rc
}

run_bench() {
    # $1: the suite's file under bench/, $2: its results' name under bench/results (copied to $OUT).
    if ! "$PY" -c "import pytest_benchmark" 2>/dev/null; then
        echo "skipped: pytest-benchmark is not installed"
        return 77
    fi
    local before
    before=$(date +%s)
    "$PY" -m pytest "bench/$1" -q -rs -p no:cacheprovider
    local rc=$?
    for ext in json md; do
        local file=bench/results/$2.$ext
        if [ -f "$file" ] && [ "$(stat -c %Y "$file")" -ge "$before" ]; then cp "$file" "$OUT/"; fi
    done
    return $rc
}

make_tiny_image_folder() {
    "$PY" - "$1" <<'EOF'
import os, sys
import numpy as np
from PIL import Image

rng = np.random.default_rng(0)
for split, count in (("train", 4), ("test", 2)):
    for label in ("a", "b"):
        folder = os.path.join(sys.argv[1], split, label)
        os.makedirs(folder, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
EOF
}

stage_kernel_profile() {
    if [ "$DRY_RUN" = 1 ]; then
        "$PY" bench/profile_dwconv_kernels.py --help >/dev/null && echo "dry: bench/profile_dwconv_kernels.py imports"
        return
    fi
    local ncu
    ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)
    if [ -z "$ncu" ]; then
        echo "skipped: Nsight Compute (ncu) is not installed"
        return 77
    fi
    # Only the launches between torch.cuda.profiler.start() and stop() (the script's own cases).
    "$ncu" --profile-from-start off --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section SchedulerStats "$PY" bench/profile_dwconv_kernels.py >"$OUT/kernel-profile.txt"
    local rc=$?
    grep -E '^  [a-z_]+.*\(|Duration|Achieved Occupancy|Issue Slots Busy|Stall' "$OUT/kernel-profile.txt" | head -n 60
    return $rc
}

stage_step_profile() {
    if [ "$DRY_RUN" = 1 ]; then
        "$PY" bench/profile_step_gpu.py --help >/dev/null && echo "dry: bench/profile_step_gpu.py imports"
        return
    fi
    # shellcheck disable=SC2086
    "$PY" bench/profile_step_gpu.py --out "$OUT" ${TOFA_FAST_STEP_PROFILE_VARIANTS:+--variants "$TOFA_FAST_STEP_PROFILE_VARIANTS"}
}

stage_train() {
    rm -rf "$OUT/run"
    if [ "$DRY_RUN" = 1 ]; then
        make_tiny_image_folder "$OUT/tiny-data" &&
            "$PY" -m tofa_fast train --data "$OUT/tiny-data" --space digits --epochs 1 --batch-size 8 \
                --device cpu --out "$OUT/run"
        return
    fi
    "$PY" -m tofa_fast train --epochs 3 --out "$OUT/run"
}

profile_args() {
    # Dry: one thread, one weight copy (cold-weight copies cost seconds a layer on a loaded CPU).
    if [ "$DRY_RUN" = 1 ]; then
        echo "--threads 1 --passes 1 --min-time 0.001 --calibration 2 --cold-mib 0.001"
    else
        echo "--passes 1 --min-time 0.02 --calibration 8"
    fi
}

stage_profile() {
    local batch=$1 table="$OUT/rss_${DEVICE}_b$1.json"
    rm -f "$table"
    # Dry: the b32 stage runs its code path at batch 4 (batch 32 on a CPU is seconds a layer).
    if [ "$DRY_RUN" = 1 ] && [ "$batch" -gt 4 ]; then batch=4; fi
    # The profiler stops itself (resumably) at --time-budget, before the stage's timeout would.
    # shellcheck disable=SC2046
    "$PY" -m tofa_fast profile --space rss --device "$DEVICE" --batch-size "$batch" -o "$table" \
        --time-budget $((LIMIT > 20 ? LIMIT - 10 : LIMIT / 2)) $(profile_args)
}

stage_validate() {
    local batch=$1 samples=30 min_time=0.02
    if [ "$DRY_RUN" = 1 ]; then samples=4 min_time=0.001; fi
    "$PY" -m tofa_fast profile --validate "$OUT/rss_${DEVICE}_b$batch.json" --samples $samples \
        --min-time $min_time -o "$OUT/rss_${DEVICE}_b${batch}_validation.json"
}

# name | function + args | cap seconds (GPU) | minimum kept for it | cap in the dry run
# (Dry caps are about 3× what the stages take on an idle 2-core machine: CI machines are often loaded.)
STAGES=(
    "env|stage_env|30|10|60"
    "build|stage_build|240|120|90"
    "info|stage_info|30|10|60"
    "gpu-tests|stage_gpu_tests|150|60|150"
    "kernel-bench|run_bench test_dwconv_kernels_gpu.py dwconv_kernels_gpu|90|30|60"
    "kernel-profile|stage_kernel_profile|90|30|60"
    "gpu-bench|run_bench test_elastic_dwconv_gpu.py elastic_dwconv_gpu|150|30|60"
    "fused-bench|run_bench test_bench_fused_step_gpu.py fused_step_gpu|150|20|60"
    "step-profile|stage_step_profile|60|20|60"
    "train|stage_train|120|45|150"
    "profile-b1|stage_profile 1|45|20|90"
    "validate-b1|stage_validate 1|30|15|60"
    "profile-b32|stage_profile 32|45|20|90"
    "validate-b32|stage_validate 32|30|15|60"
)

# Run on a GPU only when --only names them: gpu-bench times the whole op through autograd on 360
# cases (more than its cap; the kernel-bench stage measures the kernels themselves); kernel-profile
# replays each kernel many times under ncu (about a minute), for a session that works on the kernels.
# The dry run runs every stage.
OPT_IN=",gpu-bench,kernel-profile,"

selected() {
    if [ -n "$ONLY" ]; then [[ ",$ONLY," == *",$1,"* ]]; return; fi
    [ "$DRY_RUN" = 1 ] || [[ "$OPT_IN" != *",$1,"* ]]
}

failed=0
for i in "${!STAGES[@]}"; do
    IFS='|' read -r name command cap minimum dry_cap <<<"${STAGES[$i]}"
    [ "$DRY_RUN" = 1 ] && cap=$dry_cap
    if ! selected "$name"; then
        printf '%s\tnot selected\t-\t0\t0\n' "$name" >>"$OUT/stages.tsv"
        continue
    fi
    reserve=0
    for later in "${STAGES[@]:$((i + 1))}"; do
        IFS='|' read -r later_name _ _ later_min _ <<<"$later"
        selected "$later_name" || continue
        reserve=$((reserve + later_min))
    done
    # env takes seconds and names the machine in the summary: it runs whenever any budget is left.
    [ "$name" = env ] && reserve=0
    left=$((BUDGET - (SECONDS - START) - reserve))
    LIMIT=$((cap < left ? cap : left))
    log="$OUT/$name.log"
    if [ "$LIMIT" -lt 5 ]; then
        echo "not run: out of time (the budget of ${BUDGET} s is spent)" >"$log"
        printf '%s\tout of time\t-\t0\t%s\n' "$name" "$LIMIT" >>"$OUT/stages.tsv"
        failed=1
        continue
    fi
    echo "== $name (up to ${LIMIT} s) =="
    began=$SECONDS
    # A subshell under `timeout`: SIGINT first (tests and benchmarks still print their summaries),
    # SIGKILL 15 s later.
    export LIMIT DRY_RUN DEVICE OUT PY
    timeout -s INT -k 15 "$LIMIT" bash -c "$(declare -f); $command" >"$log" 2>&1
    rc=$?
    took=$((SECONDS - began))
    case $rc in
        0) status=passed ;;
        77) status=skipped ;;
        124 | 130 | 137) status="timed out" failed=1 ;;
        *) status=failed failed=1 ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$took" "$LIMIT" >>"$OUT/stages.tsv"
    echo "   $status in ${took} s (log: $log)"
    tail -n 3 "$log" | sed 's/^/   | /'
done

# ---- summary -----------------------------------------------------------------------------------
"$PY" - "$OUT" "$((SECONDS - START))" "$BUDGET" <<'EOF'
import json, os, sys

out, total, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def last_line(name, marker):
    try:
        with open(os.path.join(out, name), errors="replace") as f:
            lines = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if marker in line]
        return lines[-1] if lines else None
    except OSError:
        return None

env = load("env.json") or {}
stages = []
for row in open(os.path.join(out, "stages.tsv")):
    name, status, rc, took, limit = row.rstrip("\n").split("\t")
    stages.append({"stage": name, "status": status, "exit": rc, "seconds": int(took), "limit_s": int(limit)})
results = {
    "gpu_tests": last_line("gpu-tests.log", " in "),
    "kernel_bench": last_line("kernel-bench.log", " in "),
    "gpu_bench": last_line("gpu-bench.log", " in "),
    "fused_bench": last_line("fused-bench.log", " in "),
    "train_palette": load("run/palette.json"),
    "step_profile": load("step_profile_gpu.json"),
}
for name in sorted(os.listdir(out)):
    if name.endswith("_validation.json") and (report := load(name)):
        keys = ("samples", "spearman", "within_10pct", "median_relative_error")
        results[name.removesuffix("_validation.json")] = {k: report.get(k) for k in keys}
summary = {"machine": env, "seconds": total, "budget_s": budget, "stages": stages, "results": results}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)

title = "tofa_fast GPU check" + (" (dry run: CPU only, minimal stages)" if env.get("dry_run") else "")
lines = [
    f"# {title}",
    "",
    f"* GPU: {env.get('gpu', 'none visible')} (driver {env.get('driver') or '–'}, "
    f"{env.get('multiprocessors', '–')} SMs, compute capability {env.get('capability', '–')})",
    f"* torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}, "
    f"nvcc {' '.join(env.get('nvcc') or []) or '–'}, Python {env.get('python')}",
    f"* CPU: {env.get('cpu')}",
    f"* wall clock: {total} s of a {budget} s budget",
    "",
    "| stage | status | seconds | limit s |",
    "|---|---|---:|---:|",
]
lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['limit_s']} |" for s in stages]
lines.append("")
if results["gpu_tests"]:
    lines.append(f"GPU tests: `{results['gpu_tests']}` (gpu-tests.log, gpu-tests.xml)")
if results["kernel_bench"]:
    lines.append(f"Kernel benchmark: `{results['kernel_bench']}` (kernel-bench.log; dwconv_kernels_gpu.md when complete)")
if results["gpu_bench"]:
    lines.append(f"GPU benchmarks: `{results['gpu_bench']}` (gpu-bench.log; elastic_dwconv_gpu.md when complete)")
if results["fused_bench"]:
    lines.append(f"Fused step benchmark: `{results['fused_bench']}` (fused-bench.log; fused_step_gpu.md when complete)")
if results["train_palette"]:
    lines += ["", "Palette of the training run (run/palette.json):", "", "| MFLOPs | params | accuracy |", "|---:|---:|---:|"]
    lines += [f"| {p['flops'] / 1e6:.2f} | {p['params']:,} | {p['accuracy']:.1%} |" for p in results["train_palette"]]
if results["step_profile"]:
    lines += ["", "Where a step's time goes (step_profile_gpu.json):", "", "| variant | wall ms/step | GPU busy ms/step | launches/step |", "|---|---:|---:|---:|"]
    lines += [f"| {v['variant']} | {v['wall_ms_per_step']} | {v['gpu_busy_ms_per_step']} | {v['kernel_launches_per_step']} |" for v in results["step_profile"]["variants"]]
tables = [k for k in results if k.startswith("rss_")]
if tables:
    lines += ["", "Latency tables (rss), validated on random subnets:", "", "| table | subnets | Spearman | within ±10% | median error |", "|---|---:|---:|---:|---:|"]
    for k in tables:
        r = results[k]
        lines.append(f"| {k} | {r['samples']} | {r['spearman']:.3f} | {r['within_10pct']:.0%} | {r['median_relative_error']:.1%} |")
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

exit $failed
