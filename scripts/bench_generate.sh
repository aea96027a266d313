#!/usr/bin/env bash
# Generation throughput (issue 8): vanilla vs MoR expert choice Nr=2,3,4, random weights, served by the
# continuous depth-wise batching engine. Prints a markdown table for docs/BENCHMARKS.md.
#   scripts/bench_generate.sh          # GPU: 360m shape, bf16, batch 32 and the largest batch that fits
#   scripts/bench_generate.sh --cpu    # no GPU: the CPU ratio at small scale (about 2 minutes on 1 core)
# Further arguments go to tools/bench_generate.py (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if [[ "${1:-}" == "--cpu" ]]; then
    shift
    export OMP_NUM_THREADS=1  # CPU time is the clock on a CPU; one thread keeps it honest
    exec "$PYTHON" tools/bench_generate.py --device cpu --shape small --batch 32 --prompt-len 8 \
        --new-tokens 48 --repeats 1 "$@"
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA device: run '$0 --cpu' for the small-scale CPU ratio" >&2
    exit 2
fi
exec "$PYTHON" tools/bench_generate.py --device cuda --shape 360m --batch 32 --max-batch --prompt-len 64 \
    --new-tokens 256 "$@"
