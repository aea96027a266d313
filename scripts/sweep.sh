#!/usr/bin/env bash
# Run a planned isoFLOP sweep one run after another, in plan order:
#   python tools/isoflop.py plan --budget ... --configs ... --out PLAN_DIR
#   [NGPU=8] [PYTHON=python] scripts/sweep.sh PLAN_DIR [K/N]
# Each run goes through scripts/train.sh (torchrun; NGPU as there: the GPU count, or 2 CPU processes).
# K/N runs only shard K of N (the runs at plan positions K, K+N, ...), so N sweeps of one plan can run side by
# side: on 2 CPU cores, two one-process shards (NGPU=1) train 13% more tokens per second than one sweep of
# two-process runs. A cooldown's shard must find the checkpoint it branches from already saved.
# A run that ends well (its export written) gets a DONE file in its run folder; finished runs (DONE, or a
# complete export/) are skipped, so calling this again resumes an interrupted sweep. An unfinished run is
# simply started again: train.py resumes it from its own latest checkpoint. A cooldown needs the checkpoint
# it branches from.
set -euo pipefail
if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 PLAN_DIR [K/N]" >&2
    exit 2
fi
shard=${2:-0/1}
if [[ ! $shard =~ ^([0-9]+)/([1-9][0-9]*)$ ]] || ((BASH_REMATCH[1] >= BASH_REMATCH[2])); then
    echo "error: shard must be K/N with 0 <= K < N, got $shard" >&2
    exit 2
fi
k=${BASH_REMATCH[1]} n=${BASH_REMATCH[2]}
plan_dir=$(cd "$1" && pwd)
export PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.."  # configs name data and run folders relative to the repository root

# One tab-separated line per run: name, config, run folder, its checkpoint and export folders (the run folder
# layout: mor_pretrain.config.RunFolder), the checkpoint it starts from (or "-").
runs=$("$PYTHON" - "$plan_dir" <<'EOF'
import sys
from pathlib import Path

from mor_pretrain.config import ConfigError, load_config
from mor_pretrain.isoflop import load_plan

plan_dir = Path(sys.argv[1])
try:
    for run in load_plan(plan_dir):
        cfg = load_config(plan_dir / run.config)
        f = cfg.folder
        print(run.name, plan_dir / run.config, f.path, f.checkpoints, f.export, cfg.checkpoint.init_from or "-", sep="\t")
except (FileNotFoundError, ConfigError) as e:
    sys.exit(f"error: {e}")
EOF
)

total=$(printf '%s\n' "$runs" | wc -l)
i=0
while IFS=$'\t' read -r name config run_dir ckpts export init_from; do
    i=$((i + 1))
    if (((i - 1) % n != k)); then
        continue
    fi
    if [[ -f "$run_dir/DONE" || -f "$export/config.json" ]]; then
        echo "== [$i/$total] $name: finished, skipped"
        continue
    fi
    own=$(find "$ckpts" -maxdepth 2 -name COMPLETE 2>/dev/null | head -n 1 || true)
    if [[ "$init_from" != "-" && -z "$own" && ! -f "$init_from/COMPLETE" ]]; then
        echo "error: $name branches from $init_from, which is not a complete checkpoint;" \
            "the run it branches from must save it (checkpoint.save_steps)" >&2
        exit 1
    fi
    echo "== [$i/$total] $name: training ($config)"
    start=$SECONDS
    CONFIG="$config" bash scripts/train.sh </dev/null
    # A preempted trainer (SIGTERM, SIGUSR1) saves and exits 0 without an export: not finished.
    if [[ ! -f "$export/config.json" ]]; then
        echo "error: $name stopped before its last step (preempted?) and wrote no export;" \
            "run the sweep again to resume it from its checkpoint" >&2
        exit 1
    fi
    touch "$run_dir/DONE"
    echo "== [$i/$total] $name: finished in $((SECONDS - start)) s"
done <<<"$runs"
echo "sweep finished; report: python tools/isoflop.py report $(printf '%s\n' "$runs" | cut -f3 | tr '\n' ' ')--out DIR"
