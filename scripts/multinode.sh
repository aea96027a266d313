#!/usr/bin/env bash
# Train on several machines with torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=2 MASTER_ADDR=node0.example NGPU=8 CONFIG=train_configs/mor_1.7b.toml bash scripts/multinode.sh [--k=v ...]
# MASTER_ADDR: a host every node can reach (it hosts the rendezvous); MASTER_PORT (default 29500) must be open.
# The rendezvous numbers the nodes in the order they join (torchrun ignores --node_rank with c10d), so the
# command is the same on every node. RDZV_ID names the job so that nodes of different jobs never join each
# other (default: mor-<CONFIG name>; give each concurrent job its own).
# The data-parallel degree is the total process count unless parallelism.dp_replicate / tp say otherwise;
# for several nodes, HSDP (--parallelism.dp_replicate=NNODES) keeps parameter all-gathers inside a node.
# Signals: SIGTERM or SIGUSR1 sent to torchrun reach every worker on its node; they finish the step, save a
# checkpoint and exit 0, and the same command resumes. TORCH_ELASTIC_SHUTDOWN_TIMEOUT (seconds, default 30;
# read by recent torch, 2.14 included) is how long torchrun waits for that save before it kills the workers.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES (number of machines)}"
: "${MASTER_ADDR:?set MASTER_ADDR (the rendezvous host)}"
CONFIG=${CONFIG:-train_configs/debug_mor.toml}
MASTER_PORT=${MASTER_PORT:-29500}
NGPU=${NGPU:-8}
RDZV_ID=${RDZV_ID:-mor-$(basename "$CONFIG" .toml)}
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Growable segments instead of fixed-size blocks: less of the card lost to fragmentation between the
# sequence lengths of the recursion steps (the dry run's allocator slack assumes it).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --nproc_per_node="$NGPU" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RDZV_ID" \
    --max_restarts="${MAX_RESTARTS:-0}" --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    train.py --config "$CONFIG" "$@"
