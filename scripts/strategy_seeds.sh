#!/usr/bin/env bash
# The README's multi-seed strategy comparison on digits (issue 15, item 9): for every seed, the same
# data split (20 labelled images per class, 20 per class held out for validation, the rest unlabelled)
# trained five ways, then compared by population evaluation under both protocols.
#
#   tofa sup+fm+kd, tofa sup, single (the max arch, sup+fm): 25 epochs of the unlabelled pool (800 steps)
#   rss, ps: their papers' settings (strategy defaults: batch 64, an epoch a pass over the 200
#            labelled images = 3 steps); 270 epochs = 810 steps, about the steps tofa takes
#
# Usage: bash scripts/strategy_seeds.sh [OUT_DIR] [SEEDS...]   (default: runs/strategies 0 1 2)
# Two seeds train at once, one thread each; on the 2-core machine the whole script takes about 40 min.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/strategies}
shift || true
if [ $# -gt 0 ]; then seeds=("$@"); else seeds=(0 1 2); fi
mkdir -p "$out"
py=.venv/bin/python
common=(--val-per-class 20)

train_seed() {
    local s=$1 d=$out/s$1
    OMP_NUM_THREADS=1 $py -m tofa_fast train "${common[@]}" --seed "$s" --out "$d/tofa"
    OMP_NUM_THREADS=1 $py -m tofa_fast train "${common[@]}" --seed "$s" --loss sup --out "$d/tofa_sup"
    OMP_NUM_THREADS=1 $py -m tofa_fast train "${common[@]}" --seed "$s" --strategy rss --epochs 270 --out "$d/rss"
    OMP_NUM_THREADS=1 $py -m tofa_fast train "${common[@]}" --seed "$s" --strategy ps --epochs 270 --out "$d/ps"
    OMP_NUM_THREADS=1 $py -m tofa_fast train "${common[@]}" --seed "$s" --strategy single --out "$d/single"
}

running=0
for s in "${seeds[@]}"; do
    train_seed "$s" >"$out.s$s.log" 2>&1 &
    running=$((running + 1))
    if [ "$running" -ge 2 ]; then
        wait -n
        running=$((running - 1))
    fi
done
wait

runs() { for s in "${seeds[@]}"; do echo "$out/s$s/$1"; done; }
# shellcheck disable=SC2046
for protocol in band rss; do
    OMP_NUM_THREADS=2 $py examples/strategy_comparison.py $(runs tofa) $(runs tofa_sup) $(runs rss) $(runs ps) \
        --single $(runs single) --protocol "$protocol" --out "bench/results/strategy_seeds_digits_$protocol"
done
OMP_NUM_THREADS=2 $py examples/selection_near_min.py $(runs tofa) --out bench/results/selection_near_min_digits
