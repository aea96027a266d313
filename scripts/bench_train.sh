#!/usr/bin/env bash
# Training throughput on one GPU through the trainer: vanilla, recursive Nr=3 and MoR expert choice Nr=2, 3
# at the 360M shape, seq 2048, bf16, regional compile (tools/bench_train.py). Prints a markdown table.
#   bash scripts/bench_train.sh [--steps N] [--batch B] [--json]
#   bash scripts/bench_train.sh --cpu          # a tiny shape on the CPU: the code path only
# scripts/gpu_check.sh runs it with everything else and writes the figures to docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" tools/bench_train.py "$@"
