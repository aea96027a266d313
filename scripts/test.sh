#!/usr/bin/env bash
# The project's test command (README and CI both call this).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
python -m pytest -q "$@"
