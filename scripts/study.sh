#!/usr/bin/env bash
# The CPU isoFLOP study of docs/RESULTS.md, end to end: tokenizer, plan, sweeps, evaluation, report.
#   bash scripts/study.sh [OUT_DIR]        (default OUT_DIR: docs/results; about 2 hours on 2 CPU cores)
# Every stage skips what is done, so calling it again resumes an interrupted study. Runs land in runs/study,
# plans in sweeps/study (expert choice, recursive, vanilla: 3 budgets) and sweeps/study_tc (token choice:
# the largest budget only). EVAL_JOBS evaluations run at once (default 2, one thread each).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/results}
EVAL_JOBS=${EVAL_JOBS:-2}
BUDGETS=(2.4e13 1.2e13 6e12)
source scripts/study_setup.sh
stage "plan"
"$PYTHON" tools/isoflop.py plan --budget "${BUDGETS[@]}" --run-root runs/study --out sweeps/study \
    --configs $S/vanilla.toml $S/recursive_nr2.toml $S/mor_expert_nr2.toml $S/mor_expert_nr3.toml
"$PYTHON" tools/isoflop.py plan --budget "${BUDGETS[0]}" --run-root runs/study --out sweeps/study_tc \
    --configs $S/mor_token_nr3.toml
stage "sweeps"
bash scripts/sweep.sh sweeps/study
bash scripts/sweep.sh sweeps/study_tc

# Few-shot suite on every final model: the six request tasks on their first 100 items, MMLU on the first 2
# of each of its 57 subjects (one --limit would give MMLU 57 x 100 items); the whole val split for the
# largest budget. Each evaluation writes <run>/eval/<part>.json, which the report reads.
stage "evaluation"
evaluate() {  # RUN PART ARGS...: one evaluation, skipped when its result exists
    local run=$1 part=$2
    shift 2
    [[ -f $run/eval/$part.json ]] && return 0
    mkdir -p "$run/eval"
    "$PYTHON" tools/eval.py "$run" --no-progress --out "$run/eval/$part.json" "$@" >"$run/eval/$part.log" 2>&1 ||
        { echo "error: evaluating $run ($part) failed; see $run/eval/$part.log" >&2; return 1; }
}
export -f evaluate
runs=$(ls -d runs/study/study_*)
{
    for run in $runs; do
        echo "$run suite --tasks lambada,hellaswag,piqa,winogrande,arc_easy,arc_challenge --limit 100"
        echo "$run mmlu --tasks mmlu --limit 2"
        if [[ $run == *_${BUDGETS[0]} ]]; then
            echo "$run val --tasks val --val-text data/corpus/val/shard-0000.jsonl --seq-len 256"
        fi
    done
} | xargs -P "$EVAL_JOBS" -L 1 bash -c 'evaluate "$@"' _
stage "report"
# shellcheck disable=SC2086  # the run folders, one word each
"$PYTHON" tools/isoflop.py report $runs --out "$OUT"
stage "done: $OUT/results.md, $OUT/val_loss_vs_flops.png"
