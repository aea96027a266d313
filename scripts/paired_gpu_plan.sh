#!/usr/bin/env bash
# The GPU experiment that would decide the paired-seed gate study (docs/RESULTS.md): the paper's 135M shape at
# 2e18 FLOPs (paper convention), four arms (train_configs/study/paired_135m: recursive, constant-gate
# recursive, MoR top-k, MoR with random scores), three seeds each at lr 3e-3, and seed 0 again at 1e-3 and
# 1e-2, so each arm has a three-point learning-rate sweep. Writes both plans, prints the seed runs' predicted
# H100-hours (the dry run traces one step of each arm on 8 GPUs; a learning-rate run costs what its arm's
# seed run costs, the rate changes no step) and the one command each node runs:
#   bash scripts/paired_gpu_plan.sh [NODES]     (default 4 nodes of 8 GPUs)
# The arms train on the configs' data.sources (the default corpus); point them at a real pretraining set
# (--data.sources=... on both plan commands) before spending GPU-hours.
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=${1:-4}
PYTHON=${PYTHON:-python}
A=train_configs/study/paired_135m
ARMS=("$A/recursive.toml" "$A/gate.toml" "$A/mor_topk.toml" "$A/mor_random.toml")
common=(--budget 2e18 --configs "${ARMS[@]}" --run-root runs/paired_135m)
echo "== seeds 0, 1, 2 at lr 3e-3"
"$PYTHON" tools/isoflop.py plan "${common[@]}" --seeds 0 1 2 --gpu H100 --gpus 8 --out sweeps/paired_135m
echo
echo "== the learning-rate sweep: seed 0 at 1e-3 and 1e-2 (3e-3 is seed 0 above); each run's GPU-hours are its arm's above"
"$PYTHON" tools/isoflop.py plan "${common[@]}" --seeds 0 --lr 1e-3 1e-2 --out sweeps/paired_135m_lr
echo
echo "== on node k of $NODES (k = 0 .. $((NODES - 1))), one command:"
echo "NGPU=8 bash scripts/sweep.sh sweeps/paired_135m k/$NODES && NGPU=8 bash scripts/sweep.sh sweeps/paired_135m_lr k/$NODES"
