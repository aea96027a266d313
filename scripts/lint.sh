#!/usr/bin/env bash
# Lint, format check and type check, configured in pyproject.toml. CI runs this before the tests;
# .pre-commit-config.yaml runs the same tools on each commit. Runs every check, fails if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
python -m ruff check . || status=1
python -m ruff format --check . || status=1
python -m mypy || status=1
exit "$status"
