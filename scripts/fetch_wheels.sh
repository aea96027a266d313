#!/usr/bin/env bash
# Download the wheels a GPU machine without network needs, into wheels/ (bring that folder along).
#   bash scripts/fetch_wheels.sh            # on any machine with a package index
# The GPU machines have python3 with torch 2.11, numpy, tensorboard, sentencepiece and triton, but not the
# rest of pyproject's dependencies nor the test tools. Pure-Python wheels (any Python 3), plus safetensors'
# abi3 x86_64 Linux wheel (any CPython >= 3.8 there). --no-deps: the list is the whole closure; torch,
# numpy and typing-extensions come from the machine. scripts/gpu_check.sh unpacks those it lacks.
# torchdata 0.11 declares torch>=2, urllib3 and requests; its stateful_dataloader imports neither of the
# latter two, so they are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
dest=wheels
mkdir -p "$dest"
pure=(torchdata==0.11.0 tqdm pytest pluggy iniconfig packaging pygments tomli tomli_w exceptiongroup)
"$PYTHON" -m pip download -q --no-deps --dest "$dest" --only-binary=:all: --platform any --implementation py \
    --python-version 3.10 "${pure[@]}"
"$PYTHON" -m pip download -q --no-deps --dest "$dest" --only-binary=:all: --platform manylinux2014_x86_64 \
    --python-version 3.10 "safetensors>=0.4"
ls -l "$dest"
