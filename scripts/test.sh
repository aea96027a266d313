#!/usr/bin/env bash
# The project's test command (README and CI both call this).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
# One worker per core: most tests are single-threaded, and a multi-process test mostly waits on its children.
# Idle workers steal queued tests, so a long test does not hold up the end. Pass -n 0 to run in one process.
python -m pytest -q -n auto --dist worksteal "$@"
