"""Ecosystem integrations, apart from the core: Hugging Face transformers folders (hf.py, with the remote-code
templates hf_configuration.py and hf_modeling.py) and the lm-evaluation-harness adapter (lm_eval.py, with
its console script lm_eval_cli.py).

Each needs an optional extra (`hf`, `lm-eval`); nothing in the core imports this package.
"""

from pathlib import Path

# Offline lm-eval task configs, included unless given another path. Here, not in lm_eval_cli.py, so the
# adapter reads it without importing its own console script (which imports the adapter).
LOCAL_TASKS = Path(__file__).parent / "lm_eval_tasks"
