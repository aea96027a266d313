#!/usr/bin/env bash
# The gate ablation of docs/RESULTS.md: does MoR's gated update, rather than its routing, explain its win over
# the fixed-depth recursive baseline? Six Nr=2 variants at one FLOP budget, two training seeds each:
#   bash scripts/gate_study.sh [OUT_DIR]     (default OUT_DIR: docs/results/gate; about 70 minutes on 2 CPU cores)
# recursive as in the study; recursive with a constant gate (h + 0.05 f(h)); recursive with MoR's router gate
# at every step (no routing); MoR expert choice top-k; the same with router_alpha = 1; MoR expert-threshold
# (causal in training too). Every stage skips what is done, so calling it again resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/results/gate}
source scripts/study_setup.sh
stage "plan"
"$PYTHON" tools/isoflop.py plan --budget 6e12 --seeds 0 1 --run-root runs/gate --out sweeps/gate \
    --configs $S/recursive_nr2.toml $S/recursive_nr2_gate.toml $S/recursive_nr2_router_gate.toml \
    $S/mor_expert_nr2.toml $S/mor_expert_nr2_alpha1.toml $S/mor_threshold_nr2.toml
stage "sweep"
bash scripts/sweep.sh sweeps/gate
stage "report"
"$PYTHON" tools/isoflop.py report runs/gate/* --out "$OUT"
stage "done: $OUT/results.md"
