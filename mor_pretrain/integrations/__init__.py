"""Ecosystem integrations, apart from the core: Hugging Face transformers folders (hf.py, with the remote-code
templates hf_configuration.py and hf_modeling.py) and the lm-evaluation-harness adapter (lm_eval.py, with
its console script lm_eval_cli.py).

Each needs an optional extra (`hf`, `lm-eval`); nothing in the core imports this package.
"""
