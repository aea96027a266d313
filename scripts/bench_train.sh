#!/usr/bin/env bash
# Training throughput on one GPU: vanilla, fixed-depth recursive and MoR expert-choice Nr=3 at the 360M shape,
# seq 2048. Writes tokens/s, MFU and peak memory per model to docs/BENCHMARKS.md (OUT overrides the path).
#   bash scripts/bench_train.sh [--section.key=value ...]   (overrides apply to every run)
# Defaults: 30 steps of micro-batch 16 x 2048 (no accumulation), bf16, regional compile; the figures are
# those of the last log interval (steps 21-30), after compilation.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-docs/BENCHMARKS.md}
ROOT=${RUN_ROOT:-runs/bench}
for name in vanilla_360m recursive_360m mor_360m; do
    "$PYTHON" train.py --config "train_configs/$name.toml" --run_root="$ROOT" \
        --training.steps=30 --training.global_batch_size=16 --training.micro_batch_size=16 \
        --training.seq_len=2048 --training.val_interval=0 --metrics.log_interval=10 \
        --parallelism.compile=true "$@"
done
"$PYTHON" - "$ROOT" "$OUT" <<'PY'
import sys
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

root, out = Path(sys.argv[1]), Path(sys.argv[2])
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
rows = ["| model | tokens/s | step time (s) | MFU | peak memory (GiB) |", "|---|---|---|---|---|"]
for name in ("vanilla_360m", "recursive_360m", "mor_360m"):
    ea = EventAccumulator(str(root / name / "tb"))
    ea.Reload()
    last = lambda tag: ea.Scalars(tag)[-1].value if tag in ea.Tags()["scalars"] else float("nan")  # noqa: E731
    mem = last("mem/max_allocated_gib") if torch.cuda.is_available() else last("mem/max_rss_gib")
    rows.append(
        f"| {name} | {last('perf/tokens_per_s'):,.0f} | {last('perf/step_time_s'):.3f} "
        f"| {last('perf/mfu'):.1%} | {mem:.1f} |"
    )
# Replace only this script's section: other sections of the file belong to other benchmarks.
start, end = "<!-- bench_train:start -->", "<!-- bench_train:end -->"
section = (
    f"{start}\n## Training throughput\n\nOne {device}, torch {torch.__version__}, `bash scripts/bench_train.sh`; "
    f"figures of the last log interval (defaults: 30 steps, micro-batch 16 x 2048, bf16, regional compile).\n\n" + "\n".join(rows) + f"\n{end}"
)
old = out.read_text() if out.exists() else "# Benchmarks\n"
if start in old and end in old:
    new = old[: old.index(start)] + section + old[old.index(end) + len(end) :]
else:
    new = old.rstrip("\n") + "\n\n" + section + "\n"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(new)
print(section)
PY
