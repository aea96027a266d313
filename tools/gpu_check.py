"""The GPU measurements of scripts/gpu_check.sh, each phase in a process of its own, under one time budget.

    python tools/gpu_check.py OUTDIR [--cpu] [--doc docs/BENCHMARKS.md] [--budget-s 360]

It measures: peak bf16 matmul TFLOP/s; training at the 360M shape through the trainer (vanilla, recursive
Nr=3, MoR expert choice Nr=2 and 3; tools/bench_train.py); generation through the serving engine (vanilla
vs MoR Nr=2, 3, 4 at batch 32 and the largest batch reached; tools/bench_generate.py); a torch.profiler
summary of one MoR 360M step (top kernels, and the time share of routing, attention, GEMMs, loss,
optimizer by kernel name); 1.7B vanilla and MoR with activation checkpointing at the largest of 16, 8, 4
sequences that fits. Then the targets of the project, each marked pass, miss or n/a.

A lease must not be lost to one surprise, so every phase runs in a child process (`--phase NAME`) with a
time limit: a phase that raises, crashes the CUDA context or hangs costs only itself, logs its error in
one line and the next phase runs. After each phase OUTDIR/results.json (every figure), OUTDIR/gpu_check.md
(the report) and the section between `<!-- gpu_check:start -->` and `<!-- gpu_check:end -->` of --doc are
rewritten, so whatever ends the run, the figures measured so far are on disk. Phases run in the order that
puts what the targets need first; one that would not fit in what is left of --budget-s is skipped and
says so. --cpu runs every phase at a tiny shape on the CPU: it keeps the script working; its figures mean
nothing.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train

from mor_pretrain import trainer
from mor_pretrain.distributed import barrier, init_distributed
from mor_pretrain.metrics import peak_flops
from mor_pretrain.optim import build_lr_scheduler, build_optimizer
from mor_pretrain.parallel import build_mesh, dp_coordinates

ROOT = bench_train.ROOT
START, END = "<!-- gpu_check:start -->", "<!-- gpu_check:end -->"
GEN_KINDS = ["vanilla", "mor4", "mor2", "mor3"]  # vanilla and MoR-4 first: the target needs both
# Per kind of phase on one H100/H200 (compile included, and the dry run's trace of the step, about 10 s):
# the seconds it needs at least (it is skipped with less left) and the most it may take (then it is killed
# and the next phase runs).
COST_GPU = {"matmul": (10, 40), "train": (55, 100), "profile": (40, 75), "generate": (30, 70), "train_1.7b": (70, 130)}
COST_CPU = {"matmul": (1, 60), "train": (1, 120), "profile": (1, 120), "generate": (1, 120), "train_1.7b": (1, 120)}
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
    """Seconds left for the phases; each phase is logged with its duration."""

    def __init__(self, seconds: float, costs: dict[str, tuple[float, float]]):
        self.end = time.perf_counter() + seconds
        self.costs = costs
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.end - time.perf_counter()

    def limit(self, kind: str, what: str) -> float | None:
        """The seconds `what` may take, or None (logged as skipped) if fewer than it needs are left."""
        need, cap = self.costs[kind]
        if self.left() >= need:
            print(f"gpu_check: {what} ({self.left():.0f} s left)", flush=True)
            return min(cap, self.left())
        self.skipped.append(f"{what} (time budget: {self.left():.0f} s left)")
        print(f"gpu_check: skipped {what}: {self.left():.0f} s left", flush=True)
        return None


def matmul_tflops(device: str) -> dict:
    """Peak dense bf16 matmul: the best of a few timed batches of n^3 products."""
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
    return {"n": n, "tflops": 2 * n**3 / best / 1e12}


def classify(name: str) -> str:
    low = name.lower()
    for cls, keys in CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def profile_step(s: bench_train.Setting, batch: int, corpus: Path, runs: Path, out: Path) -> dict:
    """One MoR Nr=3 360M training step (after warm-up steps that compile) under torch.profiler, through
    the trainer's own pieces; random token batches (the data loader is not what is profiled)."""
    cfg = bench_train.job("mor_360m", "profile", [], batch, s, corpus, runs)
    bench_train.reset_device(s.device)
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


def generate(kinds: list[str], cpu: bool, max_batch: int) -> dict[str, dict]:
    """tools/bench_generate.py for `kinds` (one process of its own: a model's CUDA state dies with it)."""
    cmd = [sys.executable, str(ROOT / "tools" / "bench_generate.py"), "--json", "--kinds", ",".join(kinds)]
    cmd += ["--repeats", "1"]
    if cpu:
        cmd += ["--device", "cpu", "--shape", "tiny", "--batch", "4", "--prompt-len", "4", "--new-tokens", "8"]
    else:
        cmd += ["--device", "cuda", "--shape", "360m", "--batch", "32", "--prompt-len", "64", "--new-tokens", "128"]
        cmd += ["--max-batch", "--max-batch-limit", str(max_batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise RuntimeError(f"bench_generate.py: {lines[-1] if lines else f'exit status {proc.returncode}'}")
    return {r["kind"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])["rows"]}


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
    fitted = [r for r in train.values() if not r["oom"] and r.get("estimated_mem_gib")]
    off = max((abs(r["estimated_mem_gib"] / r["peak_mem_gib"] - 1) for r in fitted), default=None)
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
    lines += [""] + bench_train.table(res["train"] + res["train_1.7b"], peaks)
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
            "Classes come from kernel names (`tools/gpu_check.py` CLASSES): a routing scatter fused "
            "into a neighbouring Triton kernel counts where its name puts it.",
        ]
    else:
        lines += ["not measured"]
    lines += ["", "### Generation", ""]
    lines += [
        "Serving engine (continuous depth-wise batching), random weights, bf16 on GPU, full-length step "
        "caches; KV-cache writes and prefill of admitted requests included (tools/bench_generate.py)."
        + (
            ""
            if res["cpu"]
            else " The largest batch is the largest power of two from 32 up to 512 that fits "
            "(the engine prefills one request at a time, so larger batches cost minutes)."
        )
    ]
    rows = []
    base = res["generate"].get("vanilla", {})
    for kind, g in res["generate"].items():
        if "error" in g:
            rows.append([kind, "-", g["error"], "-", "-", "-"])
            continue
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
    return lines[-1].strip(" =") if lines else "no summary line (see tests.txt)"


def phase_plan(cpu: bool) -> list[tuple[str, str, str]]:
    """(name, kind, what) of every phase, most wanted first: the targets need the 360M runs and vanilla /
    MoR-4 generation, so what the budget cuts is at the end."""
    gen = [(f"generate:{','.join(GEN_KINDS)}", "generate", "generation")] if cpu else []
    gen += [] if cpu else [(f"generate:{k}", "generate", f"generation {k}") for k in GEN_KINDS]
    return [
        ("matmul", "matmul", "peak matmul"),
        *[(f"train:{label}", "train", f"training {label}") for label, _, _ in bench_train.RUNS_360M],
        *gen[:2],
        ("profile", "profile", "the profile"),
        *[(f"train_1.7b:{label}", "train_1.7b", f"training {label}") for label, _, _ in bench_train.RUNS_1_7B],
        *gen[2:],
    ]


def run_phase(name: str, outdir: Path, cpu: bool, gen_max_batch: int) -> dict:
    """Inside the child process: measure one phase and return its figures (JSON-able)."""
    device = "cpu" if cpu else "cuda"
    s = bench_train.cpu_setting() if cpu else bench_train.gpu_setting()
    big = bench_train.cpu_setting() if cpu else bench_train.gpu_setting(steps=8)
    batch, big_batches = (2, [2]) if cpu else (16, [16, 8, 4])
    corpus, runs = outdir / "work" / "corpus", outdir / "work" / "runs"
    kind, _, arg = name.partition(":")
    if kind == "matmul":
        return matmul_tflops(device)
    if kind == "profile":
        return profile_step(s, batch, corpus, runs, outdir)
    if kind == "generate":
        return generate(arg.split(","), cpu, gen_max_batch)
    table = {label: (config, overrides) for label, config, overrides in bench_train.RUNS_360M + bench_train.RUNS_1_7B}
    config, overrides = table[arg]
    if kind == "train":
        return bench_train.run_one(arg, config, overrides, batch, s, corpus, runs)
    return bench_train.run_fitting(arg, config, overrides, big_batches, big, corpus, runs)


def spawn_phase(name: str, args: argparse.Namespace, limit: float) -> tuple[dict | None, str | None]:
    """Run one phase in a child process killed at `limit` seconds: (figures, None) or (None, error line)."""
    out = args.outdir / "phases" / f"{name.replace(':', '_').replace(' ', '_').replace('=', '')}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, str(args.outdir), "--phase", name, "--phase-out", str(out)]
    cmd += ["--gen-max-batch", str(args.gen_max_batch)] + (["--cpu"] if args.cpu else [])
    log = args.outdir / "phases" / "log.txt"
    with open(log, "a") as f:
        f.write(f"\n===== {name}\n")
        f.flush()
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, text=True, timeout=limit)
        except subprocess.TimeoutExpired as e:
            f.write(str(e.stderr or ""))
            return None, f"timed out after {limit:.0f} s"
        f.write(proc.stderr)
    if proc.returncode != 0 or not out.is_file():
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        return None, (lines[-1] if lines else f"exit status {proc.returncode}")[:300]
    return json.loads(out.read_text()), None


def write_results(res: dict, args: argparse.Namespace, began: float) -> str:
    """results.json, gpu_check.md and the --doc section, from what is measured so far."""
    train = {r["label"]: r for r in res["train"]}
    measured = res["matmul"]["tflops"] if res.get("matmul") else None
    res["targets"] = target_rows(train, res["generate"], measured, args.cpu)
    res["env"]["seconds"] = time.perf_counter() - began
    (args.outdir / "results.json").write_text(json.dumps(res, indent=1))
    section = report(res)
    (args.outdir / "gpu_check.md").write_text(section)
    replace_section(args.doc, section)
    return section


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", type=Path)
    p.add_argument("--cpu", action="store_true", help="every phase at a tiny shape on the CPU")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    p.add_argument("--budget-s", type=float, default=360.0, help="seconds for all phases together")
    p.add_argument("--gen-max-batch", type=int, default=512, help="largest generation batch tried (GPU)")
    p.add_argument("--command", default="python tools/gpu_check.py", help="the command recorded in the report")
    p.add_argument("--tests-log", type=Path, help="the pytest output of the gpu tests")
    p.add_argument("--tests-command", default="", help="the pytest command recorded in the report")
    p.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this (child) process
    p.add_argument("--phase-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device visible; --cpu runs the tiny CPU mode", file=sys.stderr)
        return 2
    if args.phase:
        args.phase_out.write_text(json.dumps(run_phase(args.phase, args.outdir, args.cpu, args.gen_max_batch)))
        return 0
    began = time.perf_counter()
    budget = Budget(args.budget_s, COST_CPU if args.cpu else COST_GPU)
    (args.outdir / "phases").mkdir(parents=True, exist_ok=True)
    work = args.outdir / "work"
    bench_train.write_corpus(work / "corpus")
    name = torch.cuda.get_device_name() if not args.cpu else "cpu"
    datasheet = peak_flops(name, 0.0, warn=False)
    s = bench_train.cpu_setting() if args.cpu else bench_train.gpu_setting()
    big = bench_train.cpu_setting() if args.cpu else bench_train.gpu_setting(steps=8)
    res: dict = {
        "cpu": args.cpu,
        "env": {
            "device": "the CPU" if args.cpu else f"one {name}",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "command": args.command,
        },
        "tests": {"command": args.tests_command, "summary": tests_summary(args.tests_log)},
        "datasheet": datasheet / 1e12 if datasheet else "unknown for this device",
        "gen_max_batch": args.gen_max_batch,
        "setting": {"steps": s.steps, "steps_1.7b": big.steps, "seq_len": s.seq_len, "compile": s.compile},
        "train": [],
        "train_1.7b": [],
        "generate": {},
        "skipped": budget.skipped,
        "errors": {},
    }
    write_results(res, args, began)
    for phase, kind, what in phase_plan(args.cpu):
        limit = budget.limit(kind, what)
        if limit is None:
            continue
        figures, error = spawn_phase(phase, args, limit)
        if error is not None:
            print(f"gpu_check: {what} failed: {error}", flush=True)
            res["errors"][what] = error
        elif kind == "matmul" or kind == "profile":
            res[kind] = figures
        elif kind == "generate":
            res["generate"].update(figures)
            res["generate"] = {k: res["generate"][k] for k in GEN_KINDS if k in res["generate"]}
        else:
            res[kind].append(figures)
        write_results(res, args, began)
    shutil.rmtree(work, ignore_errors=True)
    print(write_results(res, args, began))
    return 0


if __name__ == "__main__":
    sys.exit(main())
