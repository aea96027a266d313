"""The GPU measurements of scripts/gpu_check.sh, each phase in a process of its own, under one time budget.

    python tools/gpu_check.py --predict build/gpu_predictions.json [--cpu]    # beforehand, on a CPU machine
    python tools/gpu_check.py OUTDIR [--cpu] [--predictions FILE] [--doc docs/BENCHMARKS.md] [--budget-s 360]

The phases, most wanted first (the project's targets need the first ones; what the budget cuts is at the
end): peak bf16 matmul TFLOP/s; training at the 360M shape through the trainer (vanilla, MoR expert choice
Nr=3 and 2, recursive Nr=3; mor_pretrain.bench, as tools/bench_train.py); generation through the serving
engine, vanilla and MoR Nr=4 (as tools/bench_generate.py: batch 32, then the largest batch reached within
the phase's time); a torch.profiler summary of one MoR Nr=3 360M step (top kernels, and the time share of
routing, attention, GEMMs, loss, optimizer by kernel name); causal SDPA at the 360M attention shape per
backend, with enable_gqa and with K/V expanded; generation MoR Nr=2 and 3; 1.7B vanilla and MoR with
activation checkpointing at the largest of 16, 8, 4 sequences that fits. Then the targets, each pass, miss
or n/a.

The dry run (mor_pretrain.estimate) never runs on the GPU machine: `--predict FILE` traces every training
run the check measures, on a CPU machine before the lease (about 2 minutes on 2 cores), and writes the
predicted step time (per GPU of estimate.GPUS) and peak memory of each. The check, given that file,
reports measured against predicted, sizes the training phases by the predicted step times and starts the
1.7B runs at the largest batch predicted to fit.

A lease must not be lost to one surprise, so every phase runs in a child process (`python -m
mor_pretrain.gpu_check OUTDIR --phase NAME ...`, a process group of its own) with a time limit: a phase
that raises, crashes the CUDA context or hangs costs only itself (and its children), prints its error in
its one line and the next phase runs. Each phase prints its figures in one line as it ends, so the tail of
the output carries every result. A lent machine hands back at most 8 files with plain names, so OUTDIR
holds four, all rewritten after every phase: results.json (every figure), gpu_check.md (the report, also
put between `<!-- gpu_check:start -->` and `<!-- gpu_check:end -->` of --doc), log.txt (the one-line
results) and extra.tar.gz (each phase's JSON and output, the tests' log, the profile trace). Scratch
(corpus, run folders, what the archive bundles) lives in --work, outside OUTDIR.
--cpu runs every phase at a tiny shape on the CPU: it keeps the script working; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

# Like mor_pretrain.bench, this module imports torch and the rest of the package inside its functions only: its
# parser is the tool's and its phases' (`python -m mor_pretrain.gpu_check`), and `--help` answers at once.
from mor_pretrain import bench

START, END = "<!-- gpu_check:start -->", "<!-- gpu_check:end -->"
GEN_KINDS = ["vanilla", "mor4", "mor2", "mor3"]  # vanilla and MoR-4 first: the target needs both
TRAIN_ORDER = ["vanilla", "MoR Nr=3", "MoR Nr=2", "recursive Nr=3"]  # what the targets need first
# Seconds a phase needs at least (it is skipped with less left) and may take at most (then it is killed and
# the next one runs), on one H100: process start, cold compile and the work. Phases share the inductor
# cache, so vanilla's graphs serve the recursive run and MoR Nr=3's the profile. Training phases add their
# steps at the predicted step time (STEP_GUESS_S without a prediction file): x1.5 to the need, x3 to the cap.
COST_GPU = {
    "matmul": (10, 40),
    "train": (45, 110),
    "generate": (30, 60),
    "profile": (35, 80),
    "attention": (15, 45),
    "train_1.7b": (60, 150),
}
COST_CPU = dict.fromkeys(COST_GPU, (1, 120))
STEP_GUESS_S = {"train": 0.5, "train_1.7b": 3.0}
FIT_SHARE = 0.9  # of the card's memory a 1.7B batch may be predicted to take
ARCHIVE_MAX = 15 * 2**20  # a lent machine hands back files of at most 16 MiB
# Kernel-name classes for the profile, first match wins (lower-cased names; aten op names on the CPU).
# Ambiguous by name: cub sort kernels serve both the routing's index sort and the embedding backward.
CLASSES = [
    (
        "FSDP comms + copies",
        ("nccl", "all_gather", "allgather", "reduce_scatter", "all_reduce", "chunk_cat", "split_with"),
    ),
    ("optimizer", ("adam", "multi_tensor", "foreach", "optimizer")),
    ("loss", ("nll_loss", "log_softmax", "softmax", "cross_entropy", "logsumexp")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "sdp_", "attn")),
    ("embedding", ("embedding",)),
    ("routing", ("topk", "sort", "gather", "scatter", "index", "sigmoid", "radix", "bitonic")),
    ("GEMM", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "matmul", "aten::mm", "aten::addmm", "aten::bmm")),
]


class Budget:
    """Seconds left for the phases."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def settings(cpu: bool) -> tuple[bench.Setting, bench.Setting]:
    """How the 360M and the 1.7B runs are made."""
    if cpu:
        return bench.cpu_setting(), bench.cpu_setting()
    return bench.gpu_setting(), bench.gpu_setting(steps=8)


def training_runs(cpu: bool) -> list[tuple[str, str, str, list[str], list[int], bench.Setting]]:
    """(phase kind, label, config, overrides, batches it may try, setting) of every training run measured."""
    s, big = settings(cpu)
    table = {label: (config, overrides) for label, config, overrides in bench.RUNS_360M}
    runs = [("train", label, *table[label], [2] if cpu else [16], s) for label in TRAIN_ORDER]
    runs += [("train_1.7b", *run, [2] if cpu else [16, 8, 4], big) for run in bench.RUNS_1_7B]
    return runs


def write_predictions(path: Path, cpu: bool) -> int:
    """Trace every training run of the check at every batch it may try (one rank, as it runs) with the
    dry-run estimator, and write per run the predicted peak of live tensors and, per GPU of
    estimate.GPUS, the step time and (where the estimator gives it) reserved memory. A run whose trace
    fails is left out (and said so); the exit status is then 1."""
    import torch

    from mor_pretrain.estimate import GPUS, estimate, predict

    rows, failed = [], 0
    for _, label, config, overrides, batches, s in training_runs(cpu):
        for batch in batches:
            began = time.perf_counter()
            unread = Path("unread")  # the trace reads no data: the corpus and run folders are never opened
            cfg = bench.job(config, "predict", overrides, batch, s, unread, unread)
            try:
                est = estimate(cfg, 1)
            except Exception as e:  # the other runs' predictions are still worth the lease
                print(f"gpu_check --predict: {label} x {batch}: the trace failed: {type(e).__name__}: {e}", flush=True)
                failed += 1
                continue
            by_gpu: dict[str, dict[str, Any]] = {}
            for key, gpu in GPUS.items():
                p = predict(est, gpu, cfg.training.dtype)
                reserved = getattr(p, "reserved_bytes", None)
                by_gpu[key] = {"step_s": p.step_s, "reserved_gib": None if reserved is None else reserved / 2**30}
            row = {"label": label, "config": config, "overrides": overrides, "batch": batch, "seq_len": s.seq_len}
            row |= {"memory_gib": est.memory.total / 2**30, "by_gpu": by_gpu, "trace_s": time.perf_counter() - began}
            rows.append(row)
            print(
                f"gpu_check --predict: {label} x {batch}: H100 step {by_gpu['H100']['step_s'] * 1e3:.3g} ms, "
                f"{row['memory_gib']:.2f} GiB allocated (traced in {row['trace_s']:.0f} s)",
                flush=True,
            )
    made = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cpu": cpu, "torch": torch.__version__, "date": made, "runs": rows}, indent=1))
    return 1 if failed else 0


def load_predictions(path: Path | None, cpu: bool) -> tuple[list[dict], str]:
    """The rows of a --predict file, and a line on where they come from (why there are none)."""
    if path is None:
        return [], "no prediction file given (tools/gpu_check.py --predict makes one)"
    if not path.is_file():
        return [], f"no prediction file at {path} (tools/gpu_check.py --predict makes one)"
    made = json.loads(path.read_text())
    if made["cpu"] != cpu:
        return [], f"{path} was made for the {'CPU' if made['cpu'] else 'GPU'} mode: not used"
    return made["runs"], f"{path.name} (traced with torch {made['torch']}, {made['date']} UTC)"


def prediction(preds: list[dict], res: dict, label: str, batch: int) -> dict | None:
    """What the dry run predicted for `label` at `batch` on this device (its GPUS entry by name, else H100):
    step_s, memory_gib, reserved_gib; None if the file has no such run (or one made with other settings)."""
    runs = {run[1]: run for run in training_runs(res["cpu"])}
    if label not in runs:
        return None
    _, _, config, overrides, _, s = runs[label]
    key = (label, config, overrides, batch, s.seq_len)
    for p in preds:
        if (p["label"], p["config"], p["overrides"], p["batch"], p["seq_len"]) == key:
            gpu = next((k for k in p["by_gpu"] if k in res["env"]["device"]), "H100")
            return {"gpu": gpu, "memory_gib": p["memory_gib"], **p["by_gpu"][gpu]}
    return None


def matmul_tflops(device: str) -> dict:
    """Peak dense bf16 matmul (the best of a few timed batches of n^3 products), and the device's name and
    memory (asked here: the parent process never touches CUDA)."""
    import torch

    n, iters = (8192, 20) if device == "cuda" else (256, 10)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t0) / iters)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        name, memory = props.name, props.total_memory / 2**30
    else:
        name, memory = "cpu", 0.0
    return {"n": n, "tflops": 2 * n**3 / best / 1e12, "device": name, "memory_gib": memory}


def attention(device: str) -> dict:
    """Causal SDPA forward + backward at the 360M attention shape (batch 16, seq 2048, 15 query / 5 KV heads,
    head_dim 64, bf16) under each backend, with enable_gqa=True and with K/V expanded by repeat_interleave
    (the expansion and its backward timed too: a model that expands pays them). TFLOP/s count causal FLOPs
    as FlashAttention's benchmarks do: forward 4 B H T^2 hd / 2 (half the score matrix), backward 2.5 x the
    forward, so forward + backward 3.5 x. A backend whose first timed call takes over `slow_s` (math, at
    this shape) is not timed again. CPU: a tiny shape, fp32 (the figures mean nothing)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = device == "cuda"
    b, t, hq, hkv, hd = (16, 2048, 15, 5, 64) if cuda else (2, 64, 4, 2, 16)
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    slow_s, iters = 0.25, 10
    g = torch.Generator(device).manual_seed(0)
    q = torch.randn(b, hq, t, hd, device=device, dtype=dtype, generator=g, requires_grad=True)
    k = torch.randn(b, hkv, t, hd, device=device, dtype=dtype, generator=g, requires_grad=True)
    v = torch.randn(b, hkv, t, hd, device=device, dtype=dtype, generator=g, requires_grad=True)
    grad = torch.randn(b, hq, t, hd, device=device, dtype=dtype, generator=g)
    flops = 3.5 * 4 * b * hq * t * t / 2 * hd

    def step(gqa: bool) -> None:
        if gqa:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            rep = hq // hkv
            out = F.scaled_dot_product_attention(
                q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True
            )
        torch.autograd.grad(out, (q, k, v), grad)  # no .grad accumulation in the timing

    def timed(gqa: bool, n: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            step(gqa)
        sync()
        return (time.perf_counter() - t0) / n

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    backends |= {"cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    rows = []
    for name, backend in backends.items():
        for gqa in (True, False):
            row: dict = {"backend": name, "kv": "enable_gqa" if gqa else "expanded"}
            # A backend that refuses a call says why in warnings; the error itself only says "no kernel".
            with warnings.catch_warnings(record=True) as refusals:
                warnings.simplefilter("always")
                try:
                    with sdpa_kernel(backend):
                        step(gqa)  # warm-up (and the check that the backend takes this call)
                        s = timed(gqa, 1)
                        n = 1 if s > slow_s else iters
                        s = s if n == 1 else timed(gqa, n)
                    row |= {"ms": s * 1e3, "tflops": flops / s / 1e12, "calls": n}
                except RuntimeError as e:  # no kernel for this call (an out-of-memory error included)
                    why = list(dict.fromkeys(str(w.message).strip() for w in refusals)) or [str(e).strip()]
                    row["error"] = " ".join("; ".join(why).split())[:300] or type(e).__name__
                    if cuda:
                        torch.cuda.empty_cache()
            rows.append(row)
    timed_rows = [r for r in rows if "ms" in r]
    best = min(timed_rows, key=lambda r: r["ms"]) if timed_rows else None
    shape = {"batch": b, "seq": t, "q_heads": hq, "kv_heads": hkv, "head_dim": hd, "dtype": str(dtype)}
    return {"shape": shape, "flops": flops, "rows": rows, "best": best}


def classify(name: str) -> str:
    low = name.lower()
    for cls, keys in CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def profile_step(s: bench.Setting, batch: int, corpus: Path, runs: Path, out: Path) -> dict:
    """One MoR Nr=3 360M training step (after warm-up steps that compile) under torch.profiler, through
    the trainer's own pieces; random token batches (the data loader is not what is profiled). The trace
    goes to `out` gzipped."""
    import torch
    import torch.distributed as dist

    from mor_pretrain import trainer
    from mor_pretrain.distributed import barrier, init_distributed
    from mor_pretrain.optim import build_lr_scheduler, build_optimizer
    from mor_pretrain.parallel import build_mesh, dp_coordinates

    cfg = bench.job("mor_360m", "profile", [], batch, s, corpus, runs)
    bench.reset_device(s.device)
    device = init_distributed(cfg.training.device)
    try:
        mesh = build_mesh(cfg.parallelism, device.type)
        par = trainer.Parallel(device, mesh, *dp_coordinates(mesh), 1)
        model = trainer.build_model(cfg, mesh, device)
        optimizer = build_optimizer(model, cfg.optimizer)
        scheduler = build_lr_scheduler(optimizer, cfg.optimizer, 100)
        g = torch.Generator().manual_seed(0)

        def step() -> None:
            x = torch.randint(0, cfg.model.vocab_size, (batch, s.seq_len + 1), generator=g)
            trainer.train_step(model, optimizer, scheduler, [{"input": x[:, :-1], "labels": x[:, 1:]}], par, cfg)
            if device.type == "cuda":
                torch.cuda.synchronize()

        for _ in range(3 if s.compile else 1):
            step()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            step()
    finally:
        barrier()
        dist.destroy_process_group()
    trace = out / "profile_mor360m_trace.json"
    prof.export_chrome_trace(str(trace))
    times: dict[str, float] = {}
    if device.type == "cuda":  # device kernels, from the trace (stable across torch versions)
        for e in json.loads(trace.read_text())["traceEvents"]:
            if e.get("cat") == "kernel":
                times[e["name"]] = times.get(e["name"], 0.0) + float(e.get("dur", 0))
    else:  # the CPU's own work: self time of each op
        for e in prof.key_averages():
            if e.key.startswith("aten::"):
                times[e.key] = times.get(e.key, 0.0) + e.self_cpu_time_total
    with open(trace, "rb") as f, gzip.open(f"{trace}.gz", "wb") as z:
        shutil.copyfileobj(f, z)
    trace.unlink()
    total = sum(times.values()) or 1.0
    shares: dict[str, float] = {}
    for name, t in times.items():
        shares[classify(name)] = shares.get(classify(name), 0.0) + t / total
    top = sorted(times.items(), key=lambda kv: -kv[1])[:15]
    return {
        "total_ms": total / 1e3,
        "top": [{"name": n, "ms": t / 1e3, "share": t / total, "class": classify(n)} for n, t in top],
        "shares": dict(sorted(shares.items(), key=lambda kv: -kv[1])),
        "what": "CUDA kernels" if device.type == "cuda" else "CPU aten ops (self time)",
    }


def generate(kind: str, cpu: bool, max_batch: int, seconds: float) -> dict[str, dict]:
    """The generation benchmark (tools/bench_generate.py) for one kind, in this (the phase's) process: batch
    32, then (GPU) doubled up to `max_batch` while the next batch ends within `seconds`."""
    argv = ["--kinds", kind, "--repeats", "1"]
    if cpu:
        argv += ["--device", "cpu", "--shape", "tiny", "--batch", "4", "--prompt-len", "4", "--new-tokens", "8"]
    else:
        argv += ["--device", "cuda", "--shape", "360m", "--batch", "32", "--prompt-len", "64", "--new-tokens", "128"]
        argv += ["--max-batch", "--max-batch-limit", str(max_batch), "--max-batch-seconds", f"{seconds:.0f}"]
    return {r["kind"]: r for r in bench.run_generation(bench.generate_parser().parse_args(argv))}


def target_rows(train: dict[str, dict], gen: dict[str, dict], measured: float | None, cpu: bool) -> list[dict]:
    """The project's speed targets: value, goal, pass/miss (n/a when a figure is missing)."""

    def fig(label: str) -> dict | None:
        r = train.get(label)
        return None if r is None or r["oom"] else r

    van, mor2, mor3 = fig("vanilla"), fig("MoR Nr=2"), fig("MoR Nr=3")
    rows = []

    def add(name: str, value: float | None, goal: float, fmt: str, higher: bool) -> None:
        ok = None if value is None else (value >= goal if higher else value <= goal)
        status = "n/a" if ok is None else ("pass" if ok else "miss")
        shown = "-" if value is None else fmt.format(value)
        rows.append(
            {"target": name, "value": shown, "goal": ("≥ " if higher else "≤ ") + fmt.format(goal), "status": status}
        )

    van_mfu = van["achieved_tflops"] / measured if van and measured else None
    mor3_mfu = mor3["achieved_tflops"] / measured if mor3 and measured else None
    add("vanilla 360M MFU (measured peak)", van_mfu, 0.55, "{:.1%}", True)
    add("MoR Nr=3 360M MFU (measured peak)", mor3_mfu, 0.50, "{:.1%}", True)
    ratio = None
    if van and mor3:
        allowed = 1.05 * mor3["flops_per_token"] / van["flops_per_token"] * van["step_time_s"]
        ratio = mor3["step_time_s"] / allowed
    add("MoR Nr=3 step time / (1.05 x FLOP ratio x vanilla's)", ratio, 1.0, "{:.2f}", False)
    mem = mor2["peak_mem_gib"] / van["peak_mem_gib"] if van and mor2 else None
    add("MoR Nr=2 peak memory / vanilla's (same batch)", mem, 0.75, "{:.2f}", False)
    fitted = [r for r in train.values() if not r["oom"] and r.get("predicted")]
    off = max((abs(r["predicted"]["memory_gib"] / r["peak_mem_gib"] - 1) for r in fitted), default=None)
    add("dry-run memory estimate vs max_memory_allocated (worst run)", off, 0.10, "{:.1%}", False)
    key = "at_batch" if cpu else "at_max_batch"
    speed = None
    v, m = gen.get("vanilla", {}).get(key), gen.get("mor4", {}).get(key)
    if v and m:
        speed = m["tokens_per_s"] / v["tokens_per_s"]
    add(f"MoR-4 generation tokens/s / vanilla's ({'batch' if cpu else 'largest batch'})", speed, 2.0, "{:.2f}x", True)
    return rows


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def off_by(predicted: float | None, measured: float | None) -> str:
    """The dry run's error against the measurement, in %."""
    return f"{predicted / measured - 1:+.0%}" if predicted and measured else "-"


def dry_run_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        p = r.get("predicted")
        if r["oom"] or not p:
            continue
        mem, res = r["peak_mem_gib"], r.get("reserved_mem_gib")
        out.append(
            [
                r["label"],
                str(r["batch"]),
                f"{r['step_time_s'] * 1e3:.3g} / {p['step_s'] * 1e3:.3g} / {off_by(p['step_s'], r['step_time_s'])}",
                f"{mem:.2f} / {p['memory_gib']:.2f} / {off_by(p['memory_gib'], mem)}",
                f"{res:.2f} / {p['reserved_gib']:.2f} / {off_by(p['reserved_gib'], res)}"
                if res is not None and p.get("reserved_gib") is not None
                else "-",
            ]
        )
    return out


def report(res: dict) -> str:
    env = res["env"]
    lines = [
        START,
        "## GPU check",
        "",
        f"Generated by `{env['command']}` on {env['device']}, torch {env['torch']} (CUDA {env['cuda']}), "
        f"{env['date']} UTC, {env['seconds']:.0f} s. Re-run the command to refresh this section; do not edit it.",
    ]
    if res["cpu"]:
        lines += ["", "**CPU mode: a tiny shape that exercises the script. These figures mean nothing.**"]
    lines += ["", "### Tests", "", f"`{res['tests']['command']}`: {res['tests']['summary']}"]
    mm = res.get("matmul")
    lines += ["", "### Peak matmul", ""]
    peaks: dict[str, float] = {}
    if mm:
        lines += [
            f"bf16 {mm['n']}^3: **{mm['tflops']:.3g} TFLOP/s** measured; datasheet dense bf16: {res['datasheet']}."
        ]
        peaks["measured"] = mm["tflops"]
    else:
        lines += [f"not measured; datasheet dense bf16: {res['datasheet']}."]
    if isinstance(res["datasheet"], float):
        peaks["datasheet"] = res["datasheet"]
    lines += ["", "### Training", ""]
    st = res["setting"]
    lines += [
        f"Through the trainer (FSDP2 on one device, bf16 on GPU, regional compile: {st['compile']}, fused AdamW "
        f"on GPU), synthetic corpus, {st['steps']} steps (1.7B: {st['steps_1.7b']}); figures of the second half "
        "of the steps. TFLOP/s counts executed FLOPs (forward + backward, causal attention halved, LM head, "
        "routers). 1.7B with full activation checkpointing (recompute not counted as useful)."
    ]
    trained = res["train"] + res["train_1.7b"]
    lines += [""] + bench.train_table(trained, peaks)
    lines += ["", "### Dry run vs measured", "", f"Predictions: {res['predictions']}."]
    if dry := dry_run_rows(trained):
        lines += [
            "Each cell: measured / dry run (`mor_pretrain.estimate`, traced on a CPU machine before the lease) / "
            "error (dry run / measured - 1). Memory: `max_memory_allocated` against the traced peak of live "
            "tensors, `max_memory_reserved` against the predicted reserved memory where the estimator gives one"
            + (" (CPU mode: the process's peak RSS, not comparable)." if res["cpu"] else "."),
            "",
        ]
        lines += md_table(["run", "batch", "step ms", "allocated GiB", "reserved GiB"], dry)
    lines += ["", "### Profile", ""]
    prof = res.get("profile")
    if prof:
        lines += [f"One MoR Nr=3 360M step, {prof['what']}, {prof['total_ms']:.1f} ms in all. Time share by class:"]
        lines += [""] + md_table(["class", "share"], [[k, f"{v:.1%}"] for k, v in prof["shares"].items()])
        lines += ["", "Top 15:", ""]
        top = [[f"`{t['name'][:90]}`", t["class"], f"{t['ms']:.2f}", f"{t['share']:.1%}"] for t in prof["top"]]
        lines += md_table(["kernel", "class", "ms", "share"], top)
        lines += [
            "",
            "Classes come from kernel names (`mor_pretrain/gpu_check.py` CLASSES): a routing scatter fused "
            "into a neighbouring Triton kernel counts where its name puts it.",
        ]
    else:
        lines += ["not measured"]
    lines += ["", "### Attention (SDPA)", ""]
    att = res.get("attention")
    if att:
        sh = att["shape"]
        lines += [
            f"Causal `scaled_dot_product_attention`, forward + backward, batch {sh['batch']}, seq {sh['seq']}, "
            f"{sh['q_heads']} query / {sh['kv_heads']} KV heads, head_dim {sh['head_dim']}, {sh['dtype']}; K/V "
            "by `enable_gqa=True` or expanded with `repeat_interleave` (its cost included). TFLOP/s: "
            f"{att['flops'] / 1e9:.3g} GFLOP per call (forward 4 B H T^2 hd / 2, backward 2.5 x forward).",
            "",
        ]
        rows = [
            [r["backend"], r["kv"], f"{r['ms']:.2f}", f"{r['tflops']:.0f}", str(r["calls"])]
            if "ms" in r
            else [r["backend"], r["kv"], "-", f"`{r['error'][:200]}`", "-"]
            for r in att["rows"]
        ]
        lines += md_table(["backend", "K/V", "ms", "TFLOP/s", "calls timed"], rows)
        if att["best"]:
            lines += ["", f"Fastest: {att['best']['backend']} with K/V {att['best']['kv']}."]
    else:
        lines += ["not measured"]
    lines += ["", "### Generation", ""]
    lines += [
        "Serving engine (continuous depth-wise batching), random weights, bf16 on GPU, full-length step "
        "caches; KV-cache writes and prefill of admitted requests included (tools/bench_generate.py)."
        + (
            ""
            if res["cpu"]
            else " The largest batch is the largest power of two from 32 up to "
            f"{res['gen_max_batch']} that fits and whose run ends within the phase's time (the engine "
            "prefills one request at a time, so larger batches cost minutes)."
        )
    ]
    rows = []
    base = res["generate"].get("vanilla", {})
    for kind, g in res["generate"].items():
        for key in ("at_batch", "at_max_batch"):
            r, b = g.get(key), base.get(key)
            if r:
                ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b else "-"
                rows.append(
                    [
                        kind,
                        str(r["batch"]),
                        f"{r['tokens_per_s']:,.0f}",
                        ratio,
                        f"{r['mean_depth']:.2f}",
                        f"{r['kv_mib']:,.0f}",
                    ]
                )
    lines += [""] + md_table(["model", "batch", "tokens/s", "vs vanilla", "mean depth", "KV MiB"], rows)
    lines += ["", "### Targets", ""]
    lines += md_table(["target", "value", "goal", "status"], [list(t.values()) for t in res["targets"]])
    if prof and any(t["status"] == "miss" for t in res["targets"]):
        where = ", ".join(f"{k} {v:.0%}" for k, v in prof["shares"].items())
        lines += ["", f"Where one MoR Nr=3 360M step spends its time (profile above): {where}."]
    lines += ["", "Seconds per phase: " + ", ".join(f"{k} {v:.0f}" for k, v in res["seconds"].items()) + "."]
    if res["skipped"]:
        lines += ["", "Skipped for time: " + "; ".join(res["skipped"]) + "."]
    if res["errors"]:
        lines += ["", "Phases that failed (each in its own process; the others ran on):", ""]
        lines += [f"- {name}: `{error}`" for name, error in res["errors"].items()]
    return "\n".join(lines + [END]) + "\n"


def replace_section(doc: Path, section: str) -> None:
    """Put `section` (markers included) in place of the old one, or append it."""
    old = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if START in old and END in old:
        new = old[: old.index(START)] + section.rstrip("\n") + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip("\n") + "\n\n" + section
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(new)


def tests_summary(path: Path | None) -> str:
    if path is None or not path.is_file():
        return "not run"
    lines = [ln for ln in path.read_text().splitlines() if re.search(r"\b(passed|failed|error|skipped)\b", ln)]
    return lines[-1].strip(" =") if lines else "no summary line (tests.txt in extra.tar.gz)"


def phase_plan(cpu: bool) -> list[tuple[str, str, str]]:
    """(name, kind, what) of every phase, most wanted first: the targets need the 360M runs and vanilla /
    MoR-4 generation, so what the budget cuts is at the end."""
    train = [(f"{kind}:{label}", kind, f"training {label}") for kind, label, *_ in training_runs(cpu)]
    gen = [(f"generate:{k}", "generate", f"generation {k}") for k in GEN_KINDS]
    return [
        ("matmul", "matmul", "peak matmul"),
        *train[:4],
        *gen[:2],
        ("profile", "profile", "the profile"),
        ("attention", "attention", "attention backends"),
        *gen[2:],
        *train[4:],
    ]


def run_phase(name: str, args: argparse.Namespace) -> dict:
    """Inside the child process: measure one phase and return its figures (JSON-able)."""
    device = "cpu" if args.cpu else "cuda"
    s, big = settings(args.cpu)
    corpus, runs = args.work / "corpus", args.work / "runs"
    kind, _, arg = name.partition(":")
    if kind == "matmul":
        return matmul_tflops(device)
    if kind == "attention":
        return attention(device)
    if kind == "profile":
        return profile_step(s, 2 if args.cpu else 16, corpus, runs, args.work / "extra")
    if kind == "generate":
        return generate(arg, args.cpu, args.gen_max_batch, args.phase_seconds - 10)  # 10 s: start-up and exit
    table = {label: (config, overrides) for label, config, overrides in bench.RUNS_360M + bench.RUNS_1_7B}
    config, overrides = table[arg]
    batches = [int(b) for b in args.batches.split(",")]
    if kind == "train":
        return bench.run_one(arg, config, overrides, batches[0], s, corpus, runs)
    return bench.run_fitting(arg, config, overrides, batches, big, corpus, runs)


def safe_name(name: str) -> str:
    """A file name of letters, digits, '.', '_' and '-' (what a lent machine hands back)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def spawn_phase(
    name: str, args: argparse.Namespace, limit: float, batches: list[int]
) -> tuple[dict | None, str | None]:
    """Run one phase in a child process group killed at `limit` seconds: (figures, None) or (None, error)."""
    phases = args.work / "extra" / "phases"
    out, log, err = (phases / f"{safe_name(name)}{ext}" for ext in (".json", ".log", ".err"))
    out.unlink(missing_ok=True)
    # This module's own command line: the child finds the package as this process did (installed, or on
    # PYTHONPATH as scripts/gpu_check.sh puts it).
    cmd = [sys.executable, "-m", "mor_pretrain.gpu_check", str(args.outdir), "--phase", name, "--phase-out", str(out)]
    cmd += ["--work", str(args.work), "--phase-seconds", f"{limit:.0f}", "--batches", ",".join(map(str, batches))]
    cmd += ["--gen-max-batch", str(args.gen_max_batch)] + (["--cpu"] if args.cpu else [])
    # Files, not pipes: a grandchild (a loader worker, a compile worker) cannot hold the reader up.
    with open(log, "w") as f, open(err, "w") as e:
        proc = subprocess.Popen(cmd, stdout=f, stderr=e, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            code = None
        finally:  # also when this process is stopped: the phase's session outlives it otherwise
            # The whole group, the phase's own children too (loader and compile workers): none may hold
            # the GPU into the next phase.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = err.read_text()
    with open(log, "a") as f:
        f.write(stderr)
    err.unlink()
    if code is None:
        return None, f"timed out after {limit:.0f} s"
    if code != 0 or not out.is_file():
        lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        return None, (lines[-1] if lines else f"exit status {code}")[:300]
    return json.loads(out.read_text()), None


def phase_line(kind: str, fig: dict, res: dict) -> str:
    """A finished phase's figures, in one line: the output's tail carries them even if files are lost."""
    if kind == "matmul":
        return f"{fig['device']}, {fig['memory_gib']:.0f} GiB | bf16 {fig['n']}^3: {fig['tflops']:.0f} TFLOP/s"
    if kind == "profile":
        shares = ", ".join(f"{k} {v:.0%}" for k, v in fig["shares"].items())
        return f"{fig['total_ms']:.1f} ms of {fig['what']} | {shares}"
    if kind == "attention":
        cells = [
            f"{r['backend']}/{r['kv']} {r['ms']:.2f} ms {r['tflops']:.0f} TF"
            if "ms" in r
            else f"{r['backend']}/{r['kv']} n/a"
            for r in fig["rows"]
        ]
        best = fig["best"]
        head = f"best {best['backend']}/{best['kv']} {best['ms']:.2f} ms" if best else "no backend ran"
        return f"{head} | " + ", ".join(cells)
    if kind == "generate":
        ((kind_name, g),) = fig.items()
        base = res["generate"].get("vanilla", {})
        cells = []
        for key in ("at_batch", "at_max_batch"):
            if r := g.get(key):
                b = base.get(key) if kind_name != "vanilla" else None
                ratio = f" ({r['tokens_per_s'] / b['tokens_per_s']:.2f}x vanilla)" if b else ""
                cells.append(f"batch {r['batch']}: {r['tokens_per_s']:,.0f} tok/s{ratio}, depth {r['mean_depth']:.2f}")
        return " | ".join(cells)
    if fig["oom"]:
        return f"batch {fig['batch']}: out of memory"
    p = fig.get("predicted") or {}
    peak = res["matmul"]["tflops"] if res.get("matmul") else None
    mfu = f", MFU {fig['achieved_tflops'] / peak:.1%}" if peak else ""
    step = f"step {fig['step_time_s'] * 1e3:.3g} ms"
    mem = f"peak {fig['peak_mem_gib']:.2f} GiB"
    if p:
        step += f" (dry run {p['step_s'] * 1e3:.3g}, {off_by(p['step_s'], fig['step_time_s'])})"
        mem += f" (dry run {p['memory_gib']:.2f}, {off_by(p['memory_gib'], fig['peak_mem_gib'])})"
    if fig.get("reserved_mem_gib") is not None:
        mem += f", reserved {fig['reserved_mem_gib']:.2f}"
        if p.get("reserved_gib") is not None:
            mem += f" (dry run {p['reserved_gib']:.2f}, {off_by(p['reserved_gib'], fig['reserved_mem_gib'])})"
    return (
        f"{fig['batch']} x {fig['seq_len']} | {fig['tokens_per_s']:,.0f} tok/s | {step} | "
        f"{fig['achieved_tflops']:.0f} TFLOP/s{mfu} | {mem} | loss {fig['loss']:.2f}"
    )


def say(line: str, outdir: Path) -> None:
    """One line of results: to stdout and to OUTDIR/log.txt."""
    print(line, flush=True)
    with open(outdir / "log.txt", "a") as f:
        f.write(line + "\n")


def bundle(extra: Path, outdir: Path) -> None:
    """OUTDIR/extra.tar.gz from the files under `extra`, written aside and renamed (a run cut short keeps
    the last whole one); without the *.gz members (the profile trace) when it would be over ARCHIVE_MAX."""
    part = outdir / "extra.tar.gz.part"
    for with_gz in (True, False):
        with tarfile.open(part, "w:gz", compresslevel=6) as tar:
            for f in sorted(p for p in extra.rglob("*") if p.is_file()):
                if with_gz or f.suffix != ".gz":
                    tar.add(f, arcname=str(f.relative_to(extra)))
        if part.stat().st_size <= ARCHIVE_MAX:
            break
    os.replace(part, outdir / "extra.tar.gz")


def write_results(res: dict, args: argparse.Namespace, began: float) -> str:
    """results.json, gpu_check.md, extra.tar.gz and the --doc section, from what is measured so far."""
    train = {r["label"]: r for r in res["train"]}
    measured = res["matmul"]["tflops"] if res.get("matmul") else None
    res["targets"] = target_rows(train, res["generate"], measured, args.cpu)
    res["env"]["seconds"] = time.perf_counter() - began
    (args.outdir / "results.json").write_text(json.dumps(res, indent=1))
    section = report(res)
    (args.outdir / "gpu_check.md").write_text(section)
    replace_section(args.doc, section)
    bundle(args.work / "extra", args.outdir)
    return section


def phase_cost(
    kind: str, label: str, res: dict, preds: list[dict], batches: list[int], cpu: bool
) -> tuple[float, float]:
    """(need, cap) of a phase: COST's, plus a training run's steps at the predicted (or guessed) step time."""
    need: float
    cap: float
    need, cap = (COST_CPU if cpu else COST_GPU)[kind]
    if kind.startswith("train") and not cpu:
        s, big = settings(cpu)
        steps = big.steps if kind == "train_1.7b" else s.steps
        p = prediction(preds, res, label, batches[0])
        step_s = p["step_s"] if p else STEP_GUESS_S[kind]
        need, cap = need + 1.5 * steps * step_s, cap + 3 * steps * step_s
    return need, cap


def batches_to_try(kind: str, label: str, res: dict, preds: list[dict]) -> list[int]:
    """The batches a training phase tries, largest first: for 1.7B, from the largest the dry run predicts to
    fit in FIT_SHARE of the card (all of them without a prediction or a known card size)."""
    runs = {run[1]: run for run in training_runs(res["cpu"])}
    if label not in runs:
        return [0]
    tried = runs[label][4]
    memory = res["matmul"]["memory_gib"] if res.get("matmul") else 0.0
    if kind != "train_1.7b" or not memory:
        return tried
    for i, batch in enumerate(tried):
        p = prediction(preds, res, label, batch)
        if p is None or p["memory_gib"] <= FIT_SHARE * memory:
            return tried[i:]
    return tried[-1:]


def parser() -> argparse.ArgumentParser:
    """The arguments of `tools/gpu_check.py`, and (hidden) those of a phase's child process."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", type=Path, nargs="?", help="where the results go (not with --predict)")
    p.add_argument("--cpu", action="store_true", help="every phase at a tiny shape on the CPU")
    p.add_argument(
        "--predict",
        type=Path,
        metavar="FILE",
        help="measure nothing: trace every training run of the check with the dry-run estimator and write "
        "its predictions to FILE (on a CPU machine, before the lease)",
    )
    p.add_argument("--predictions", type=Path, metavar="FILE", help="a --predict file to compare and size with")
    p.add_argument("--work", type=Path, help="scratch folder outside OUTDIR (default: a temporary one)")
    p.add_argument("--doc", type=Path, help="the file the report's section goes in (default: docs/BENCHMARKS.md)")
    p.add_argument("--budget-s", type=float, default=360.0, help="seconds for all phases together")
    p.add_argument("--gen-max-batch", type=int, default=512, help="largest generation batch tried (GPU)")
    p.add_argument("--command", default="python tools/gpu_check.py", help="the command recorded in the report")
    p.add_argument("--tests-log", type=Path, help="the pytest output of the gpu tests")
    p.add_argument("--tests-command", default="", help="the pytest command recorded in the report")
    p.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this (child) process
    p.add_argument("--phase-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--phase-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--batches", default="", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """`tools/gpu_check.py`: --predict, the whole check, or (--phase) one phase of it."""
    p = parser()
    args = p.parse_args(argv)
    if args.predict:
        return write_predictions(args.predict, args.cpu)
    if args.outdir is None:
        p.error("OUTDIR is required (or --predict FILE)")
    args.doc = args.doc or bench.checkout() / "docs" / "BENCHMARKS.md"
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device visible; --cpu runs the tiny CPU mode", file=sys.stderr)
        return 2
    if args.phase:
        args.phase_out.write_text(json.dumps(run_phase(args.phase, args)))
        return 0
    args.outdir.mkdir(parents=True, exist_ok=True)
    scratch = None if args.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    args.work = args.work or scratch

    def stop(signum: int, frame: object) -> None:
        """`timeout` stops this process with SIGTERM: exit through spawn_phase's cleanup of the phase."""
        say(f"gpu_check: stopped by signal {signum}", args.outdir)
        sys.exit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        check(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


def check(args: argparse.Namespace) -> None:
    """Every phase that fits the budget, the results written after each."""
    import torch

    from mor_pretrain.metrics import peak_flops

    began = time.perf_counter()
    budget = Budget(args.budget_s)
    (args.work / "extra" / "phases").mkdir(parents=True, exist_ok=True)
    bench.write_corpus(args.work / "corpus")
    preds, source = load_predictions(args.predictions, args.cpu)
    if preds:
        shutil.copy(args.predictions, args.work / "extra" / "predictions.json")
    s, big = settings(args.cpu)
    res: dict = {
        "cpu": args.cpu,
        "env": {
            "device": "the CPU" if args.cpu else "an unknown device (the matmul phase names it)",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "command": args.command,
        },
        "tests": {"command": args.tests_command, "summary": tests_summary(args.tests_log)},
        "datasheet": "unknown for this device",
        "predictions": source,
        "gen_max_batch": args.gen_max_batch,
        "setting": {"steps": s.steps, "steps_1.7b": big.steps, "seq_len": s.seq_len, "compile": s.compile},
        "train": [],
        "train_1.7b": [],
        "generate": {},
        "seconds": {},
        "skipped": [],
        "errors": {},
    }
    say(f"gpu_check: predictions | {source}", args.outdir)
    write_results(res, args, began)
    for phase, kind, what in phase_plan(args.cpu):
        label = phase.partition(":")[2]
        batches = batches_to_try(kind, label, res, preds) if kind.startswith("train") else [0]
        need, cap = phase_cost(kind, label, res, preds, batches, args.cpu)
        if budget.left() < need:
            res["skipped"].append(f"{what} (needs {need:.0f} s, {budget.left():.0f} s left)")
            say(f"gpu_check: {phase} | skipped (budget): needs {need:.0f} s, {budget.left():.0f} s left", args.outdir)
            continue
        t0 = time.perf_counter()
        figures, error = spawn_phase(phase, args, min(cap, budget.left()), batches)
        res["seconds"][phase] = seconds = time.perf_counter() - t0
        if figures is None:
            res["errors"][what] = error
            say(f"gpu_check: {phase} | failed: {error} | {seconds:.0f} s", args.outdir)
            write_results(res, args, began)
            continue
        if kind == "matmul":
            name = figures["device"]
            res["env"]["device"] = "the CPU" if args.cpu else f"one {name}"
            datasheet = None if args.cpu else peak_flops(name, 0.0, warn=False)
            res["datasheet"] = datasheet / 1e12 if datasheet else "unknown for this device"
        if kind in ("matmul", "profile", "attention"):
            res[kind] = figures
        elif kind == "generate":
            res["generate"].update(figures)
            res["generate"] = {k: res["generate"][k] for k in GEN_KINDS if k in res["generate"]}
        else:
            figures["predicted"] = prediction(preds, res, label, figures["batch"])
            res[kind].append(figures)
        say(f"gpu_check: {phase} | {phase_line(kind, figures, res)} | {seconds:.0f} s", args.outdir)
        write_results(res, args, began)
    shutil.rmtree(args.work / "corpus", ignore_errors=True)
    shutil.rmtree(args.work / "runs", ignore_errors=True)
    write_results(res, args, began)
    for t in res["targets"]:
        say(f"gpu_check: target | {t['target']} | {t['value']} (goal {t['goal']}) | {t['status']}", args.outdir)
    say(f"gpu_check: done in {time.perf_counter() - began:.0f} s | {args.outdir}", args.outdir)


if __name__ == "__main__":
    sys.exit(main())
