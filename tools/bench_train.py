"""Training throughput through the real trainer at the 360M shape (mor_pretrain.bench; `--help` says how).

python tools/bench_train.py                 # GPU: 360M runs, prints a markdown table
python tools/bench_train.py --cpu           # a tiny shape on the CPU (the code path, not a measurement)
"""

from __future__ import annotations

import sys

# The package module imports torch only inside its functions (it holds the parser too): --help stays instant.
from mor_pretrain.bench import train_main

if __name__ == "__main__":
    sys.exit(train_main())
