#!/usr/bin/env bash
# Install the project and its test tools into the active Python environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --upgrade pip -q
python -m pip install -e ".[dev,plot]" -q
# Default tokenizer (mistral-common's SentencePiece model; --no-deps: only its data file is needed) and corpus.
python -m pip install --no-deps -q mistral-common==1.13.1
python tools/fetch_data.py
