"""Training throughput through the real trainer: vanilla, fixed-depth recursive and MoR expert choice Nr = 2, 3
at the 360M shape, seq 2048, bf16, regional compile, FSDP2 on one device.

    python tools/bench_train.py                 # GPU: 360M runs, prints a markdown table
    python tools/bench_train.py --cpu           # a tiny shape on the CPU (the code path, not a measurement)

Each run is `mor_pretrain.trainer.train(cfg)` in this process on a synthetic corpus (random words, a small
SentencePiece model: speed does not depend on the text), with micro-batch = global batch (no
accumulation). Figures are those of the last log interval (the second half of the steps), after
compilation. Executed FLOPs (flops.executed_flops_per_token: forward + backward, causal attention pairs, LM
head and routers) give the achieved TFLOP/s and MFU. The end-of-run checkpoint and export are skipped (see
`no_final_save`): at 1.7B they would write about 30 GB per run. Nothing here runs the dry-run estimator
(mor_pretrain.estimate): tools/gpu_check.py --predict traces the same runs beforehand, on a CPU machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mor_pretrain.config import JobConfig

# torch and the package are imported where the work starts: `--help` answers at once.

ROOT = Path(__file__).resolve().parents[1]
# (label, config, overrides): the 360M runs of the issue.
RUNS_360M = [
    ("vanilla", "vanilla_360m", []),
    ("recursive Nr=3", "recursive_360m", []),
    ("MoR Nr=2", "mor_360m", ["--model.num_recursions=2"]),
    ("MoR Nr=3", "mor_360m", []),
]
RUNS_1_7B = [
    ("vanilla 1.7B", "vanilla_1.7b", ["--parallelism.activation_checkpoint=full"]),
    ("MoR Nr=3 1.7B", "mor_1.7b", ["--parallelism.activation_checkpoint=full"]),
]
# --cpu: every layout keeps its layer count and sharing; the widths shrink to seconds per run.
TINY = [
    "--model.d_model=64",
    "--model.n_heads=4",
    "--model.n_kv_heads=2",
    "--model.d_ffn=128",
    "--model.vocab_size=512",
    "--model.max_seq_len=64",
]
WORDS = ["the", "a", "king", "walked", "to", "river", "and", "stone", "was", "cold", "in", "light", "of", "day"]


@dataclass
class Setting:
    """How every run of one benchmark invocation is made."""

    device: str  # "cuda" or "cpu"
    seq_len: int
    steps: int
    compile: bool
    workers: int
    extra: list[str]  # overrides applied to every run (e.g. TINY)


def gpu_setting(steps: int = 12) -> Setting:
    return Setting("cuda", 2048, steps, True, 2, [])


def cpu_setting(steps: int = 2) -> Setting:
    return Setting("cpu", 64, steps, False, 0, [*TINY, "--training.dtype=float32"])  # CPU bf16 matmuls are slow


def write_corpus(root: Path, docs: int = 400, seed: int = 0) -> Path:
    """Random-word jsonl train/val splits and a 320-piece BPE model; returns the folder."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 400))) + "." for _ in range(docs)]
    for split, part in (("train", texts[: docs - 20]), ("val", texts[docs - 20 :])):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / split / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts[:100]),
        model_prefix=str(root / "tok"),
        vocab_size=320,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    return root


def job(config: str, name: str, overrides: list[str], batch: int, s: Setting, corpus: Path, runs: Path) -> JobConfig:
    from mor_pretrain.config import load_config

    log = max(1, s.steps // 2)
    return load_config(
        ROOT / "train_configs" / f"{config}.toml",
        [
            f"--name={name}",
            f"--run_root={runs}",
            f"--data.sources=['{corpus}/train/*.jsonl']",
            f"--data.val_sources=['{corpus}/val/*.jsonl']",
            f"--data.tokenizer={corpus}/tok.model",
            "--data.lanes=4",
            "--data.shuffle_buffer=4",
            f"--data.num_workers={s.workers}",
            "--checkpoint.save_final=false",  # only the step times matter
            f"--training.device={s.device}",
            f"--training.steps={s.steps}",
            f"--training.global_batch_size={batch}",
            f"--training.micro_batch_size={batch}",
            f"--training.seq_len={s.seq_len}",
            "--training.val_interval=0",
            f"--metrics.log_interval={log}",
            f"--parallelism.compile={str(s.compile).lower()}",
            "--checkpoint.interval=0",
            "--checkpoint.async_save=false",
            *s.extra,
            *overrides,
        ],
    )


def reset_device(device: str) -> None:
    """Between runs in one process: drop compiled graphs (dynamo's per-function cache is bounded) and
    freed memory, and restart the peak-memory counter the trainer reports."""
    import torch

    gc.collect()
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def last_scalars(run: Path) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mor_pretrain.config import RunFolder

    ea = EventAccumulator(str(RunFolder(run).tb))
    ea.Reload()
    return {tag: ea.Scalars(tag)[-1].value for tag in ea.Tags()["scalars"]}


def run_one(label: str, config: str, overrides: list[str], batch: int, s: Setting, corpus: Path, runs: Path) -> dict:
    """Train `config` for s.steps steps; the row of figures, or {"oom": True} if the batch does not fit."""
    import torch
    import torch.distributed as dist

    from mor_pretrain import trainer
    from mor_pretrain.config import MFU, STEP_TIME, TOKENS_PER_S, TRAIN_LOSS
    from mor_pretrain.flops import executed_flops_per_token

    name = label.replace(" ", "_").replace("=", "")
    cfg = job(config, name, overrides, batch, s, corpus, runs)
    reset_device(s.device)
    oom = False
    try:
        trainer.train(cfg)
    except torch.OutOfMemoryError:
        oom = True  # clean up below: inside `except` the traceback still holds the model and optimizer
    if oom:
        if dist.is_initialized():  # the trainer's own exit (barrier + destroy) did not run
            dist.destroy_process_group()
        reset_device(s.device)
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        return {"label": label, "batch": batch, "oom": True}
    tags = last_scalars(cfg.run_dir)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    flops = executed_flops_per_token(cfg.model, s.seq_len)
    step_time = tags[STEP_TIME]
    mem = tags.get("mem/max_allocated_gib", tags.get("mem/max_rss_gib", float("nan")))
    return {
        "label": label,
        "config": config,
        "overrides": overrides,
        "batch": batch,
        "seq_len": s.seq_len,
        "params": _meta_params(cfg),
        "tokens_per_s": tags[TOKENS_PER_S],
        "step_time_s": step_time,
        "flops_per_token": flops,
        "achieved_tflops": flops * batch * s.seq_len / step_time / 1e12,
        "trainer_mfu": tags.get(MFU),
        "peak_mem_gib": mem,
        "reserved_mem_gib": tags.get("mem/max_reserved_gib"),
        "loss": tags[TRAIN_LOSS],
        "oom": False,
    }


def _meta_params(cfg: JobConfig) -> int:
    import torch

    from mor_pretrain.models import MoRModel

    with torch.device("meta"):
        return MoRModel(cfg.model).num_params()


def run_fitting(label: str, config: str, overrides: list[str], batches: list[int], s: Setting, corpus, runs) -> dict:
    """The first of `batches` (largest first) that fits; the last out-of-memory row if none does."""
    row: dict = {}
    for batch in batches:
        row = run_one(label, config, overrides, batch, s, corpus, runs)
        if not row["oom"]:
            return row
    return row


def table(rows: list[dict], peaks: dict[str, float]) -> list[str]:
    """Markdown rows; `peaks` maps a peak's name to TFLOP/s (MFU is reported against each)."""
    head = "| model | batch x seq | params | tokens/s | step time (s) | TFLOP/s | " + " | ".join(
        f"MFU vs {k}" for k in peaks
    )
    out = [head + " | peak memory (GiB) |", "|" + "---|" * (7 + len(peaks))]
    for r in rows:
        if r["oom"]:
            out.append(f"| {r['label']} | {r['batch']} x ... | out of memory |" + " |" * (4 + len(peaks)))
            continue
        mfu = " | ".join(f"{r['achieved_tflops'] / p:.1%}" for p in peaks.values())
        out.append(
            f"| {r['label']} | {r['batch']} x {r['seq_len']} | {r['params'] / 1e6:.0f}M | {r['tokens_per_s']:,.0f} "
            f"| {r['step_time_s']:.3f} | {r['achieved_tflops']:.1f} | {mfu} | {r['peak_mem_gib']:.2f} |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny shape on the CPU: exercises the code path")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 12 on GPU, 2 on CPU)")
    p.add_argument("--batch", type=int, default=16, help="micro-batch = global batch of the 360M runs")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_train", help="corpus and run folders")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device; use --cpu for the tiny CPU run", file=sys.stderr)
        return 2
    s = cpu_setting(args.steps or 2) if args.cpu else gpu_setting(args.steps or 12)
    corpus = write_corpus(args.work / "corpus")
    batch = 2 if args.cpu else args.batch
    rows = [run_one(label, c, o, batch, s, corpus, args.work / "runs") for label, c, o in RUNS_360M]
    if args.json:
        print(json.dumps(rows))
        return 0
    peak = rows[0]["achieved_tflops"] / rows[0]["trainer_mfu"] if rows[0].get("trainer_mfu") else None
    print("\n".join(table(rows, {"datasheet": peak} if peak else {})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
