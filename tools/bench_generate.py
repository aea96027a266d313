"""Generation throughput of vanilla vs MoR with depth-wise batching (mor_pretrain.bench; `--help` says how).

python tools/bench_generate.py --shape 360m --batch 32 --max-batch [--device cuda --dtype bf16]
python tools/bench_generate.py --shape small --batch 32 --new-tokens 32   # CPU ratio at small scale
"""

from __future__ import annotations

import sys

# The package module imports torch only inside its functions (it holds the parser too): --help stays instant.
from mor_pretrain.bench import generate_main

if __name__ == "__main__":
    sys.exit(generate_main())
