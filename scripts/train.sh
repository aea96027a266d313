#!/usr/bin/env bash
# Train on one machine: one process per GPU, or NGPU CPU processes (gloo) when there is no GPU.
#   CONFIG=train_configs/mor_360m.toml NGPU=8 bash scripts/train.sh [--section.key=value ...]
# Defaults: CONFIG=train_configs/debug_mor.toml; NGPU = the GPU count, or 2 without a GPU.
# DRY=1 checks the config and traces one step at NGPU ranks without devices or data: memory, collectives,
# predicted step time (tools/estimate.py does the same).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-train_configs/debug_mor.toml}
PYTHON=${PYTHON:-python}
if [[ -z "${NGPU:-}" ]]; then
    NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
if [[ "${DRY:-0}" == 1 ]]; then
    exec "$PYTHON" train.py --config "$CONFIG" --dry-run "$NGPU" "$@"
fi
# One intra-op thread per process, unless the caller chose otherwise (CPU ranks share the cores).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Growable segments instead of fixed-size blocks: less of the card lost to fragmentation between the
# sequence lengths of the recursion steps (the dry run's allocator slack assumes it).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" train.py --config "$CONFIG" "$@"
