#!/usr/bin/env bash
# Run a planned isoFLOP sweep one run after another, in plan order:
#   python tools/isoflop.py plan --budget ... --configs ... --out PLAN_DIR
#   [NGPU=8] [PYTHON=python] scripts/sweep.sh PLAN_DIR
# Each run goes through scripts/train.sh (torchrun; NGPU as there: the GPU count, or 2 CPU processes).
# A run that ends well (its export written) gets a DONE file in its run folder; finished runs (DONE, or a
# complete export/) are skipped, so calling this again resumes an interrupted sweep. An unfinished run is
# simply started again: train.py resumes it from its own latest checkpoint. A cooldown needs the checkpoint
# it branches from.
set -euo pipefail
if [[ $# -ne 1 ]]; then
    echo "usage: $0 PLAN_DIR" >&2
    exit 2
fi
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
