#!/usr/bin/env bash
# The whole GPU check in one command, under one wall-clock cap (default 450 s, inside one 8-minute slot of a
# lent machine): the gpu-marked tests (one trainer launch), then the benchmarks of tools/gpu_check.py, each
# phase in its own process, most wanted first. Every phase prints its figures in one line as it ends. OUTDIR
# gets four files, rewritten after every phase (a lent machine hands back at most 8, with plain names):
# results.json, gpu_check.md (also written into its section of docs/BENCHMARKS.md), log.txt (the one-line
# results) and extra.tar.gz (the tests' log, each phase's JSON and output, the profile trace).
#   bash scripts/gpu_check.sh OUTDIR                  # on a GPU machine
#   bash scripts/gpu_check.sh --cpu OUTDIR            # a tiny shape on the CPU: keeps the script working
#   bash scripts/gpu_check.sh [--cpu] [--doc FILE] OUTDIR   # write the section into FILE instead
# Beforehand, on a CPU machine: `python tools/gpu_check.py --predict build/gpu_predictions.json` (the dry
# run's predictions, compared with the measurements; nothing on the GPU machine runs the estimator) and,
# for a machine without network, `bash scripts/fetch_wheels.sh`: modules that do not import there are
# unpacked from wheels/ into build/gpu-deps (nothing else is touched). PYTHON (default python3) picks the
# interpreter; BUDGET_S (default 450) the seconds for everything, of which the tests get at most TESTS_S
# (default 120); PREDICTIONS (default build/gpu_predictions.json), WHEELS and GPU_DEPS move those files.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-450}
TESTS_S=${TESTS_S:-120}
WHEELS=${WHEELS:-wheels}
PREDICTIONS=${PREDICTIONS:-build/gpu_predictions.json}
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
rm -f "$outdir/log.txt" "$outdir/extra.tar.gz.part"
start=$SECONDS
# Scratch (corpus, run folders, what extra.tar.gz bundles) outside OUTDIR: only the four files come back.
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/extra"

# Modules the project and its tests import -> the wheel providing each (see scripts/fetch_wheels.sh).
deps=$(realpath -m "${GPU_DEPS:-build/gpu-deps}")
need="torchdata safetensors tomli_w tqdm pytest pluggy iniconfig packaging pygments"
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

if ((${#cpu[@]})); then  # the CPU variants of the GPU tests' bodies that launch nothing
    tests=(tests/test_gpu.py -m "not gpu" -k "generation")
else  # one trainer launch, shared by the training and resume tests
    tests=(tests/test_gpu.py -m gpu)
fi
left=$((BUDGET_S - (SECONDS - start)))
cap=$((TESTS_S < left - 200 ? TESTS_S : left - 200))
cap=$((cap > 30 ? cap : 30))
tests_start=$SECONDS
set +e
# Stopped at their share of the budget; `timeout` signals pytest's whole process group (the launch too).
OMP_NUM_THREADS=1 timeout --kill-after=10 "$cap" \
    "$PYTHON" -m pytest -q -rfE -p no:cacheprovider "${tests[@]}" >"$work/extra/tests.txt" 2>&1
tests_rc=$?
set -e
summary=$(grep -E '\b(passed|failed|errors?|skipped|deselected)\b' "$work/extra/tests.txt" | tail -n 1 |
    sed -E 's/^[= ]+|[= ]+$//g' || true)
if ((tests_rc == 124 || tests_rc == 137)); then
    summary="stopped at their cap ($cap s)${summary:+; last: $summary}"
    echo "gpu tests: stopped at their cap ($cap s)" >>"$work/extra/tests.txt"
fi
# The failures' one-line reasons (pytest -rfE), then the phase's line.
grep -E '^(FAILED|ERROR) ' "$work/extra/tests.txt" | head -n 10 | cut -c 1-300 || true
echo "gpu_check: tests | ${summary:-no summary line} | $((SECONDS - tests_start)) s" | tee -a "$outdir/log.txt"

left=$((BUDGET_S - (SECONDS - start) - 10))  # 10 s for the last report write
"$PYTHON" tools/gpu_check.py "$outdir" ${cpu[@]+"${cpu[@]}"} --doc "$doc" --budget-s $((left > 30 ? left : 30)) \
    --work "$work" --predictions "$PREDICTIONS" --command "$command" --tests-log "$work/extra/tests.txt" \
    --tests-command "pytest ${tests[*]}"
exit "$tests_rc"
