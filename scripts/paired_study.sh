#!/usr/bin/env bash
# The paired-seed gate study of docs/RESULTS.md: does routing, or only MoR's gated update, make MoR beat
# fixed-depth recursion, once the baseline's learning rate and warmup are not what handicaps it?
#   bash scripts/paired_study.sh [OUT_DIR]     (default OUT_DIR: docs/results/paired; about 2 hours on 2 CPU cores)
# Arms (train_configs/study/paired, Nr=2, 6e12 FLOPs, a 20-step warmup for all):
#   main, seeds 0-4: constant-gate recursive, MoR top-k, MoR with random scores;
#   the rest, seeds 0-2: recursive at lr 3e-3 and 1e-3, constant gate at 1e-3, residual scaling eps = 1/Nr,
#   MoR expert-threshold.
# Seed s trains every arm on the same data order (and, where shapes match, the same initial weights). Each
# run is scored on the same 256 windows (64k tokens) spread over the val split, window by window. One run
# (gate, seed 0) is trained a second time in another folder to show that the command reproduces its number.
# Runs go two at a time, one process each. Every stage skips what is done, so calling it again resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/results/paired}
source scripts/study_setup.sh
P=train_configs/study/paired

stage "plan"
"$PYTHON" tools/isoflop.py plan --budget 6e12 --seeds 0 1 2 3 4 --run-root runs/paired --out sweeps/paired_main \
    --configs $P/gate.toml $P/mor_topk.toml $P/mor_random.toml
"$PYTHON" tools/isoflop.py plan --budget 6e12 --seeds 0 1 2 --run-root runs/paired --out sweeps/paired_rest \
    --configs $P/recursive.toml $P/recursive_lr1e-3.toml $P/gate_lr1e-3.toml $P/eps.toml $P/mor_threshold.toml
"$PYTHON" tools/isoflop.py plan --budget 6e12 --seeds 0 --run-root runs/repro --out sweeps/repro --configs $P/gate.toml

# Two one-process shards of a plan side by side (the second lane then runs `then`, if given); the stage fails
# if either lane does.
two_shards() {
    local plan=$1 then=${2:-}
    NGPU=1 bash scripts/sweep.sh "$plan" 0/2 >"$plan/shard0.log" 2>&1 &
    local first=$!
    { NGPU=1 bash scripts/sweep.sh "$plan" 1/2 && { [[ -z $then ]] || NGPU=1 bash scripts/sweep.sh "$then"; }; } \
        >"$plan/shard1.log" 2>&1 || { wait "$first"; return 1; }
    wait "$first"
}
stage "sweep sweeps/paired_main (logs: sweeps/paired_main/shard{0,1}.log)"
two_shards sweeps/paired_main || { tail -n 20 sweeps/paired_main/shard*.log >&2; exit 1; }
stage "sweep sweeps/paired_rest, then the repeat of paired_gate_s0 (logs: sweeps/paired_rest/shard{0,1}.log)"
two_shards sweeps/paired_rest sweeps/repro || { tail -n 20 sweeps/paired_rest/shard*.log >&2; exit 1; }
grep -h "finished in" sweeps/paired_*/shard*.log || true

stage "score every run on 256 windows of the val split (two at a time)"
score() {
    local windows=$1/eval/val_windows.jsonl
    [[ -f $windows ]] && return 0
    "$PYTHON" tools/eval.py "$1" --tasks val --val-text data/corpus/val/*.jsonl --limit 256 --no-progress \
        --out "$1/eval/val64k.json" --log-samples "$windows.part" >/dev/null
    mv "$windows.part" "$windows"
}
export -f score
ls -d runs/paired/*/ runs/repro/*/ | xargs -P 2 -I{} bash -c 'score "${1%/}"' _ {}

stage "compare"
"$PYTHON" tools/isoflop.py compare runs/paired/* --margin 0.05 --out "$OUT" \
    --pair paired_mor_topk:paired_gate --pair paired_mor_random:paired_gate \
    --pair paired_mor_topk:paired_mor_random --pair paired_gate:paired_recursive \
    --pair paired_gate_lr1e3:paired_recursive_lr1e3 --pair paired_recursive_lr1e3:paired_recursive \
    --pair paired_gate_lr1e3:paired_gate --pair paired_eps:paired_recursive --pair paired_eps:paired_gate \
    --pair paired_mor_threshold:paired_mor_topk --pair paired_mor_topk:paired_recursive
"$PYTHON" - <<'EOF'
from mor_pretrain.isoflop import read_arm_run

first, again = (read_arm_run(f"{root}/paired_gate_s0_6e12") for root in ("runs/paired", "runs/repro"))
same = first.windows == again.windows and first.trainer_val == again.trainer_val
print(f"repeat of paired_gate_s0: 64k val {first.loss:.6f} then {again.loss:.6f}, trainer's set "
      f"{first.trainer_val:.6f} then {again.trainer_val:.6f}: {'identical' if same else 'DIFFERENT'}")
EOF
stage "done: $OUT/paired.md"
