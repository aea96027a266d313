#!/usr/bin/env bash
# The whole GPU check in one command, under one wall-clock cap: the gpu-marked tests, then training, profile
# and generation benchmarks (tools/gpu_check.py, each phase in its own process). Writes the report to OUTDIR
# (gpu_check.md, results.json, tests.txt, phases/log.txt, the profile trace) and into its section of
# docs/BENCHMARKS.md, after every phase: whatever ends the run, what was measured is on disk.
#   bash scripts/gpu_check.sh OUTDIR                  # on a GPU machine
#   bash scripts/gpu_check.sh --cpu OUTDIR            # a tiny shape on the CPU: keeps the script working
#   bash scripts/gpu_check.sh [--cpu] [--doc FILE] OUTDIR   # write the section into FILE instead
# A machine without network: run `bash scripts/fetch_wheels.sh` where there is one and bring wheels/ along;
# modules that do not import here are then unpacked from wheels/ into build/gpu-deps (nothing else is
# touched). PYTHON (default python3) picks the interpreter; BUDGET_S (default 480) the seconds for
# everything, of which the tests get at most TESTS_S (default 150); WHEELS and GPU_DEPS move those folders.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-480}
TESTS_S=${TESTS_S:-150}
WHEELS=${WHEELS:-wheels}
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
deps=$(realpath -m "${GPU_DEPS:-build/gpu-deps}")
need="torchdata safetensors tqdm pytest pluggy iniconfig packaging pygments"
"$PYTHON" -c "import sys; sys.exit(sys.version_info >= (3, 11))" && need+=" tomli exceptiongroup"
# Missing is what does not import (an import, not a lookup: a broken install counts as missing too).
read -ra missing < <(PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c "
import importlib, sys
def imports(m):
    try:
        importlib.import_module(m)
        return True
    except ImportError:
        return False
print(' '.join(m for m in sys.argv[1:] if not imports(m)))" $need)
if ((${#missing[@]})); then
    # A wheel is a zip of importable files: unpacking it into a folder on PYTHONPATH installs it without
    # pip, a network or write access to the machine's own site-packages.
    echo "installing ${missing[*]} from $WHEELS/ into $deps"
    "$PYTHON" - "$WHEELS" "$deps" "${missing[@]}" <<'PY'
import glob, sys, zipfile
wheels, deps, names = sys.argv[1], sys.argv[2], sys.argv[3:]
for name in names:
    found = sorted(glob.glob(f"{wheels}/{name}-*.whl"))
    if not found:
        sys.exit(f"{name} is not installed and {wheels}/ has no {name}-*.whl: run scripts/fetch_wheels.sh")
    zipfile.ZipFile(found[-1]).extractall(deps)
PY
fi
export PYTHONPATH="$PWD:$deps${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torchdata.stateful_dataloader, safetensors, pytest" # fail here, not mid-run

if ((${#cpu[@]})); then  # the CPU variants of the GPU tests' bodies (the script's own test excluded)
    tests=(tests/test_gpu.py -m "not gpu" -k "generation")
else
    tests=(tests/test_gpu.py -m gpu)
fi
left=$((BUDGET_S - (SECONDS - start)))
cap=$((TESTS_S < left - 120 ? TESTS_S : left - 120))
set +e
# The tests' cold compiles count against the budget too: they are stopped at their share of it.
OMP_NUM_THREADS=1 timeout --kill-after=10 $((cap > 30 ? cap : 30)) \
    "$PYTHON" -m pytest -q -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$outdir/tests.txt"
tests_rc=${PIPESTATUS[0]}
set -e
if ((tests_rc == 124 || tests_rc == 137)); then
    echo "gpu tests: stopped at their time share ($cap s)" | tee -a "$outdir/tests.txt"
fi

left=$((BUDGET_S - (SECONDS - start) - 10))  # 10 s for the last report write
"$PYTHON" tools/gpu_check.py "$outdir" ${cpu[@]+"${cpu[@]}"} --doc "$doc" --budget-s $((left > 30 ? left : 30)) \
    --command "$command" --tests-log "$outdir/tests.txt" --tests-command "pytest ${tests[*]}"
exit "$tests_rc"
