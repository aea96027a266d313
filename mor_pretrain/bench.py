"""Throughput benchmarks: training through the real trainer (`tools/bench_train.py`, TRAIN_HELP) and generation
through the serving engine (`tools/bench_generate.py`, GENERATE_HELP); mor_pretrain.gpu_check runs both as
phases of its GPU check. Each command line's parser and main are here; the tools only call them.

torch and the rest of the package are imported inside the functions that use them, never at module level
(here and in mor_pretrain.gpu_check). Why there rather than a lazy import in each tool: the parsers belong
with the logic (the check's phases re-run `python -m mor_pretrain.gpu_check`, its generation phases parse
with generate_parser, tests call the mains), so the tools import these modules before parsing, and `--help`
must still answer at once (tests/test_cli_help.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from mor_pretrain.config import JobConfig
    from mor_pretrain.models import MoRModel

TRAIN_HELP = """\
Training throughput through the real trainer: vanilla, fixed-depth recursive and MoR expert choice Nr = 2, 3
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

GENERATE_HELP = """\
Generation throughput of vanilla vs MoR (expert choice, Nr = 2, 3, 4) with depth-wise batching.

python tools/bench_generate.py --shape 360m --batch 32 --max-batch [--device cuda --dtype bf16]
python tools/bench_generate.py --shape small --batch 32 --new-tokens 32   # CPU ratio at small scale

Random weights. Every model is served by the same engine (mor_pretrain.serving.DepthBatchEngine; for
vanilla it is plain continuous batching). 3 x batch requests of --prompt-len random tokens each generate
--new-tokens tokens (no eos) through `batch` slots. Timed: engine iterations while requests are still
queued, i.e. with every slot busy: prompt prefill of admitted requests, every stack pass, KV-cache writes,
routing, last block, head, greedy sampling and host bookkeeping (the final drain is not timed).
tokens/s = tokens generated in that window / its length: wall time on a GPU; on a CPU the process's CPU
time (run with OMP_NUM_THREADS=1), so other jobs on a shared machine do not skew the ratio. Each number
is the best of --repeats runs. --max-batch doubles the batch from --batch until the device runs out of
memory (GPU only; or until --max-batch-limit, or --max-batch-seconds run out) and reports the largest that
fit.
"""


def checkout() -> Path:
    """The source checkout the package runs from (the folder holding `mor_pretrain/`): its train_configs/ are
    what the benchmarks train, its runs/ and docs/ their default outputs. The job TOMLs are not package
    data, so the project runs from a checkout (installed editable, or on PYTHONPATH as scripts/gpu_check.sh
    puts it); an error says so otherwise."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "train_configs").is_dir():
        raise FileNotFoundError(f"no train_configs/ next to the package in {root}: run from a source checkout")
    return root


# ---- training ----

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
    """The job of train_configs/`config`.toml (of the checkout) as the benchmark runs it."""
    from mor_pretrain.config import load_config

    log = max(1, s.steps // 2)
    return load_config(
        checkout() / "train_configs" / f"{config}.toml",
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


def run_fitting(
    label: str, config: str, overrides: list[str], batches: list[int], s: Setting, corpus: Path, runs: Path
) -> dict:
    """The first of `batches` (largest first) that fits; the last out-of-memory row if none does."""
    row: dict = {}
    for batch in batches:
        row = run_one(label, config, overrides, batch, s, corpus, runs)
        if not row["oom"]:
            return row
    return row


def train_table(rows: list[dict], peaks: dict[str, float]) -> list[str]:
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


def train_main(argv: list[str] | None = None) -> int:
    """`tools/bench_train.py`: the 360M runs, a markdown table (or --json rows)."""
    p = argparse.ArgumentParser(description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny shape on the CPU: exercises the code path")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 12 on GPU, 2 on CPU)")
    p.add_argument("--batch", type=int, default=16, help="micro-batch = global batch of the 360M runs")
    p.add_argument("--work", type=Path, help="corpus and run folders (default: runs/bench_train of the checkout)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device; use --cpu for the tiny CPU run", file=sys.stderr)
        return 2
    work = args.work or checkout() / "runs" / "bench_train"
    s = cpu_setting(args.steps or 2) if args.cpu else gpu_setting(args.steps or 12)
    corpus = write_corpus(work / "corpus")
    batch = 2 if args.cpu else args.batch
    rows = [run_one(label, c, o, batch, s, corpus, work / "runs") for label, c, o in RUNS_360M]
    if args.json:
        print(json.dumps(rows))
        return 0
    peak = rows[0]["achieved_tflops"] / rows[0]["trainer_mfu"] if rows[0].get("trainer_mfu") else None
    print("\n".join(train_table(rows, {"datasheet": peak} if peak else {})))
    return 0


# ---- generation ----

# (d_model, n_heads, n_kv_heads, d_ffn, vocab): 360m is the paper's (MOR_FACTS s1); small keeps its
# proportions (head_dim 64, d_ffn / d_model, LM head share of the FLOPs) at 2/5 of the width; tiny only
# exercises the code path (scripts/gpu_check.sh --cpu).
SHAPES = {"360m": (960, 15, 5, 2560, 49152), "small": (384, 6, 2, 1024, 16384), "tiny": (64, 4, 2, 128, 512)}
# Generation kinds -> (Nr, applied layers): vanilla 32; MoR middle-cycle 1 + base x Nr + 1 (MOR_FACTS s1).
KINDS = {"vanilla": (1, 32), "mor2": (2, 32), "mor3": (3, 32), "mor4": (4, 34)}


def build_model(shape: str, kind: str, max_len: int, device: str, dtype: torch.dtype) -> MoRModel:
    """A randomly initialised model of SHAPES[shape] and KINDS[kind], in eval mode."""
    import torch

    from mor_pretrain.models import ModelArgs, MoRModel

    d, h, kv, ffn, vocab = SHAPES[shape]
    nr, layers = KINDS[kind]
    args = ModelArgs(
        vocab_size=vocab,
        d_model=d,
        n_heads=h,
        n_kv_heads=kv,
        d_ffn=ffn,
        n_layers=layers,
        num_recursions=nr,
        max_seq_len=max_len,
        sharing="middle_cycle" if nr > 1 else "cycle",
        router="expert" if nr > 1 else "none",
    )
    with torch.device(device):
        model = MoRModel(args)
        model.init_weights()
    return model.to(dtype).eval()


def cache_fractions(model: MoRModel, slack: float) -> list[float] | None:
    """Step cache lengths at `slack` x the trained capacities (Nr - r) / Nr; None (full) when slack is 0."""
    nr = model.args.num_recursions
    return [min(1.0, slack * (nr - r) / nr) for r in range(nr)] if slack else None


def measure(model: MoRModel, batch: int, prompt_len: int, new_tokens: int, seed: int, slack: float) -> dict:
    """Steady-state serving: 3 x batch requests through `batch` slots, timed while the queue still holds
    requests (every slot busy; admissions and their prefill included, the final drain not)."""
    import torch

    from mor_pretrain.generate import SamplingConfig
    from mor_pretrain.serving import DepthBatchEngine

    a = model.args
    sampling = SamplingConfig(max_new_tokens=new_tokens)
    fractions = cache_fractions(model, slack)
    engine = DepthBatchEngine(model, batch, prompt_len + new_tokens, sampling, step_cache_fractions=fractions)
    g = torch.Generator().manual_seed(seed)
    for _ in range(3 * batch):
        engine.submit(torch.randint(0, a.vocab_size, (prompt_len,), generator=g).tolist())
    sync = torch.cuda.synchronize if model.rope.is_cuda else (lambda: None)
    clock = time.perf_counter if model.rope.is_cuda else time.process_time  # CPU: immune to other load
    sync()
    start, wall_start = clock(), time.perf_counter()
    while engine.queue:
        engine.iterate()
    sync()
    seconds = clock() - start
    wall = time.perf_counter() - wall_start
    n = engine.stats["tokens"]
    depth = sum(d for r in engine.done for d in r.depths) / max(1, sum(len(r.depths) for r in engine.done))
    return {
        "batch": batch,
        "tokens": n,
        "seconds": seconds,
        "wall_s": wall,
        "tokens_per_s": n / seconds,
        "mean_depth": depth,
        "stack_occupancy": engine.stats["stack_rows"] / max(1, engine.stats["stack_passes"] * batch),
        "kv_mib": sum(kv.nbytes() for kv in (engine.stack_kv, engine.first_kv, engine.last_kv) if kv) / 2**20,
        "cache_full_exits": engine.stats["cache_full_exits"] / max(1, n),
    }


def max_batch(
    model: MoRModel,
    first: dict,
    prompt_len: int,
    new_tokens: int,
    seed: int,
    slack: float,
    limit: int,
    deadline: float | None = None,
) -> dict:
    """Double the batch from `first` (measure's result) until out of memory, past `limit` (0 = none) or
    until the next batch would end after `deadline` (a time.perf_counter() value); the last result that fit."""
    import torch

    best = first
    while not limit or 2 * best["batch"] <= limit:
        # Twice the batch: twice the prefills and tokens, at most about twice the time (2.5: a margin).
        if deadline is not None and time.perf_counter() + 2.5 * best["wall_s"] > deadline:
            return best
        try:
            best = measure(model, 2 * best["batch"], prompt_len, new_tokens, seed, slack)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return best
    return best


def bench_kind(args: argparse.Namespace, kind: str, dtype: torch.dtype) -> dict:
    """The best of --repeats runs at --batch, and the max-batch result when asked (with --max-batch-seconds:
    within that many seconds of this call's start)."""
    deadline = time.perf_counter() + args.max_batch_seconds if args.max_batch_seconds else None
    model = build_model(args.shape, kind, args.prompt_len + args.new_tokens, args.device, dtype)
    measure(model, min(args.batch, 4), args.prompt_len, 2, args.seed, args.cache_slack)  # warm-up
    runs = [
        measure(model, args.batch, args.prompt_len, args.new_tokens, args.seed, args.cache_slack)
        for _ in range(args.repeats)
    ]
    row: dict[str, Any] = {"kind": kind, "at_batch": max(runs, key=lambda r: r["tokens_per_s"])}
    if args.max_batch:
        row["at_max_batch"] = max_batch(
            model,
            row["at_batch"],
            args.prompt_len,
            args.new_tokens,
            args.seed,
            args.cache_slack,
            args.max_batch_limit,
            deadline,
        )
    return row


def run_generation(args: argparse.Namespace) -> list[dict]:
    """bench_kind for each of --kinds (generate_parser's arguments), seeded, in --dtype (default: bf16 on a
    GPU, fp32 on the CPU)."""
    import torch

    resolve_device(args)
    torch.manual_seed(args.seed)
    return [bench_kind(args, kind, dtype_of(args)) for kind in args.kinds.split(",")]


def dtype_of(args: argparse.Namespace) -> torch.dtype:
    from mor_pretrain.folders import DTYPES

    return DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]


def resolve_device(args: argparse.Namespace) -> None:
    """--device defaults to the GPU when there is one (decided here, not in the parser: --help loads no torch)."""
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"


def generate_parser() -> argparse.ArgumentParser:
    """The arguments of `tools/bench_generate.py` (mor_pretrain.gpu_check's generation phases parse theirs
    with it too)."""
    p = argparse.ArgumentParser(description=GENERATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="360m", help="paper model size")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from {list(KINDS)}")
    p.add_argument("--batch", type=int, default=32, help="prompts served at once")
    p.add_argument("--max-batch", action="store_true", help="also find the largest batch that fits (GPU)")
    p.add_argument(
        "--max-batch-limit",
        type=int,
        default=0,
        help="stop doubling past this batch (0 = until out of memory): admissions prefill one request at a "
        "time, so a measurement at batch B costs about 3 B prefills",
    )
    p.add_argument(
        "--max-batch-seconds",
        type=float,
        default=0.0,
        help="with --max-batch: stop doubling where the next batch would end past this many seconds from the "
        "start of the kind's bench (0 = no limit)",
    )
    p.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per prompt")
    p.add_argument("--device", default=None, help="torch device (default: cuda if there is one, else cpu)")
    # The names of mor_pretrain.folders.DTYPES (tests/test_generate_serving.py checks they agree).
    p.add_argument(
        "--dtype", choices=("fp32", "bf16"), default=None, help="weights and compute dtype; default: bf16 on GPU"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of weights and prompts")
    p.add_argument(
        "--cache-slack",
        type=float,
        default=0.0,
        help="size MoR step caches at this x the capacities (Nr-r)/Nr, e.g. 1.2; 0 = full length (exact)",
    )
    p.add_argument("--repeats", type=int, default=2, help="report the best of this many runs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def generate_main(argv: list[str] | None = None) -> int:
    """`tools/bench_generate.py`: every kind asked, a markdown table (or one --json object)."""
    args = generate_parser().parse_args(argv)
    resolve_device(args)
    kinds = args.kinds.split(",")
    if unknown := [k for k in kinds if k not in KINDS]:
        print(f"error: unknown kind {unknown[0]!r}; choose from {list(KINDS)}", file=sys.stderr)
        return 2
    if args.max_batch and not args.device.startswith("cuda"):
        print("error: --max-batch needs a GPU (a CPU out-of-memory kills the process)", file=sys.stderr)
        return 2
    dtype = dtype_of(args)
    rows = run_generation(args)
    base = {key: rows[0].get(key) for key in ("at_batch", "at_max_batch")} if kinds[0] == "vanilla" else {}
    if args.json:
        print(json.dumps({"shape": args.shape, "device": args.device, "dtype": str(dtype), "rows": rows}))
        return 0
    print(f"shape {args.shape}, {args.device}, {dtype}, prompt {args.prompt_len}, new {args.new_tokens} tokens")
    print("| model | batch | tokens/s | vs vanilla | mean depth | stack occupancy | KV cache MiB | cache-full exits |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        for key in ("at_batch", "at_max_batch"):
            r = row.get(key)
            if r is None:
                continue
            ref = base.get(key)
            ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
            print(
                f"| {row['kind']} | {r['batch']} | {r['tokens_per_s']:.1f} | {ratio} | {r['mean_depth']:.2f} "
                f"| {r['stack_occupancy']:.2f} | {r['kv_mib']:.1f} | {r['cache_full_exits']:.3f} |"
            )
    return 0
