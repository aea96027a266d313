#!/usr/bin/env bash
# Install the project and its test tools into the active Python environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --upgrade pip -q
python -m pip install -e ".[dev,plot]" -q
