#!/usr/bin/env bash
# The whole GPU check in one command: the gpu-marked tests, then training, profile and generation benchmarks
# (tools/gpu_check.py). Writes the report to OUTDIR (gpu_check.md, results.json, tests.txt, the profile
# trace) and into its section of docs/BENCHMARKS.md. About 8 minutes on one H100/H200.
#   bash scripts/gpu_check.sh OUTDIR                  # on a GPU machine
#   bash scripts/gpu_check.sh --cpu OUTDIR            # a tiny shape on the CPU: keeps the script working
#   bash scripts/gpu_check.sh [--cpu] [--doc FILE] OUTDIR   # write the section into FILE instead
# A machine without network: run `bash scripts/fetch_wheels.sh` where there is one and bring wheels/ along;
# modules missing here are then unpacked from wheels/ into build/gpu-deps (nothing else is touched).
# PYTHON (default python3) picks the interpreter; BUDGET_S (default 480) the seconds for everything.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-480}
command="bash scripts/gpu_check.sh $*"
cpu=()
doc=docs/BENCHMARKS.md
outdir=
while (($#)); do
    case "$1" in
        --cpu) cpu=(--cpu) ;;
        --doc) doc=$2; shift ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) outdir=$1 ;;
    esac
    shift
done
[[ -n "$outdir" ]] || { echo "usage: $0 [--cpu] [--doc FILE] OUTDIR" >&2; exit 2; }
mkdir -p "$outdir"
start=$SECONDS

# Modules the project and its tests import -> the wheel providing each (see scripts/fetch_wheels.sh).
deps=build/gpu-deps
need="torchdata safetensors tqdm pytest pluggy iniconfig packaging pygments"
"$PYTHON" -c "import sys; sys.exit(sys.version_info >= (3, 11))" && need+=" tomli exceptiongroup"
read -ra missing < <(PYTHONPATH="$deps" "$PYTHON" -c "
import importlib.util, sys
print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))" $need)
if ((${#missing[@]})); then
    # A wheel is a zip of importable files: unpacking it into a folder on PYTHONPATH installs it without
    # pip, a network or write access to the machine's own site-packages.
    echo "installing ${missing[*]} from wheels/ into $deps"
    "$PYTHON" - "$deps" "${missing[@]}" <<'PY'
import glob, sys, zipfile
deps, names = sys.argv[1], sys.argv[2:]
for name in names:
    found = sorted(glob.glob(f"wheels/{name}-*.whl"))
    if not found:
        sys.exit(f"{name} is not installed and wheels/ has no {name}-*.whl: run scripts/fetch_wheels.sh")
    zipfile.ZipFile(found[-1]).extractall(deps)
PY
fi
export PYTHONPATH="$PWD:$PWD/$deps${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torchdata.stateful_dataloader, safetensors, pytest" # fail here, not mid-run

if ((${#cpu[@]})); then  # the CPU variants of the GPU tests' bodies (the script's own test excluded)
    tests=(tests/test_gpu.py -m "not gpu" -k "generation")
else
    tests=(tests/test_gpu.py -m gpu)
fi
set +e
OMP_NUM_THREADS=1 "$PYTHON" -m pytest -q -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$outdir/tests.txt"
tests_rc=${PIPESTATUS[0]}
set -e

left=$((BUDGET_S - (SECONDS - start)))
"$PYTHON" tools/gpu_check.py "$outdir" ${cpu[@]+"${cpu[@]}"} --doc "$doc" --budget-s $((left > 60 ? left : 60)) \
    --command "$command" --tests-log "$outdir/tests.txt" --tests-command "pytest ${tests[*]}"
exit "$tests_rc"
