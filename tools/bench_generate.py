"""Generation throughput of vanilla vs MoR (expert choice, Nr = 2, 3, 4) with depth-wise batching.

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

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from mor_pretrain.models import MoRModel

# torch and the package are imported where the work starts: `--help` answers at once.

# (d_model, n_heads, n_kv_heads, d_ffn, vocab): 360m is the paper's (MOR_FACTS s1); small keeps its
# proportions (head_dim 64, d_ffn / d_model, LM head share of the FLOPs) at 2/5 of the width; tiny only
# exercises the code path (scripts/gpu_check.sh --cpu).
SHAPES = {"360m": (960, 15, 5, 2560, 49152), "small": (384, 6, 2, 1024, 16384), "tiny": (64, 4, 2, 128, 512)}
# Applied layers: vanilla 32; MoR middle-cycle 1 + base x Nr + 1 (MOR_FACTS s1).
KINDS = {"vanilla": (1, 32), "mor2": (2, 32), "mor3": (3, 32), "mor4": (4, 34)}


def build(shape: str, kind: str, max_len: int, device: str, dtype: torch.dtype) -> MoRModel:
    import torch

    from mor_pretrain.models import ModelArgs, MoRModel

    d, h, kv, ffn, vocab = SHAPES[shape]
    nr, layers = KINDS[kind]
    sharing, router = ("middle_cycle", "expert") if nr > 1 else ("cycle", "none")
    args = ModelArgs(
        vocab_size=vocab,
        d_model=d,
        n_heads=h,
        n_kv_heads=kv,
        d_ffn=ffn,
        n_layers=layers,
        num_recursions=nr,
        max_seq_len=max_len,
        sharing=sharing,
        router=router,
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
    model = build(args.shape, kind, args.prompt_len + args.new_tokens, args.device, dtype)
    measure(model, min(args.batch, 4), args.prompt_len, 2, args.seed, args.cache_slack)  # warm-up
    runs = [
        measure(model, args.batch, args.prompt_len, args.new_tokens, args.seed, args.cache_slack)
        for _ in range(args.repeats)
    ]
    row = {"kind": kind, "at_batch": max(runs, key=lambda r: r["tokens_per_s"])}
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


def run(args: argparse.Namespace) -> list[dict]:
    """bench_kind for each of --kinds, seeded, in --dtype (default: bf16 on a GPU, fp32 on the CPU)."""
    import torch

    resolve_device(args)
    torch.manual_seed(args.seed)
    return [bench_kind(args, kind, dtype_of(args)) for kind in args.kinds.split(",")]


def dtype_of(args: argparse.Namespace) -> torch.dtype:
    from mor_pretrain.export import DTYPES

    return DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]


def resolve_device(args: argparse.Namespace) -> None:
    """--device defaults to the GPU when there is one (decided here, not in the parser: --help loads no torch)."""
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    # The names of mor_pretrain.export.DTYPES (tests/test_generate_serving.py checks they agree).
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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    resolve_device(args)
    kinds = args.kinds.split(",")
    if unknown := [k for k in kinds if k not in KINDS]:
        print(f"error: unknown kind {unknown[0]!r}; choose from {list(KINDS)}", file=sys.stderr)
        return 2
    if args.max_batch and not args.device.startswith("cuda"):
        print("error: --max-batch needs a GPU (a CPU out-of-memory kills the process)", file=sys.stderr)
        return 2
    dtype = dtype_of(args)
    rows = run(args)
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


if __name__ == "__main__":
    sys.exit(main())
