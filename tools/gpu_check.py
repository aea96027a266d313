"""The GPU measurements of scripts/gpu_check.sh (mor_pretrain.gpu_check; `--help` describes the phases).

python tools/gpu_check.py --predict build/gpu_predictions.json [--cpu]    # beforehand, on a CPU machine
python tools/gpu_check.py OUTDIR [--cpu] [--predictions FILE] [--doc docs/BENCHMARKS.md] [--budget-s 360]
"""

from __future__ import annotations

import sys

# The package module imports torch only inside its functions (it holds the parser too): --help stays instant.
from mor_pretrain.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
