"""The stack on a CUDA device: bf16 training through the real trainer (nccl, FSDP2, regional compile, fused
AdamW), DCP save and resume, cached generation and the serving engine, and MoR's memory saving.

Each test body takes a device. Its `cuda` variant carries the `gpu` marker (skipped without CUDA, selected
by `bash scripts/test.sh -m gpu`); its `cpu` variant runs the same body in the normal suite (gloo, no
compile) so the code path cannot rot. `scripts/gpu_check.sh` runs the gpu tests and then the benchmarks,
inside one short lease: so the gpu tests launch `train.py` once (a cold compile costs about a minute there),
and what else trains runs in this process, on the inductor cache that launch filled.
"""

from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_model
from test_generate import KINDS, reference_greedy
from test_train import ROOT, write_corpus

from mor_pretrain import bench, gpu_check
from mor_pretrain.config import load_config
from mor_pretrain.generate import SamplingConfig, generate
from mor_pretrain.metrics import peak_flops
from mor_pretrain.optim import build_lr_scheduler, build_optimizer
from mor_pretrain.parallel import build_mesh, dp_coordinates
from mor_pretrain.serving import DepthBatchEngine
from mor_pretrain.trainer import Parallel, build_model, train, train_step

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
# Debug configs: vanilla, MoR expert choice (Nr=3) and MoR token choice (the expert config, re-routed).
CONFIGS = {
    "vanilla": ("debug_vanilla", []),
    "expert": ("debug_mor", []),
    "token": ("debug_mor", ["--model.router=token", "--model.z_loss_coef=1e-5"]),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gpu_data")
    write_corpus(root / "data")
    return root / "data"


GROUP_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def train_args(run_root: Path, corpus: Path, device: str) -> list[str]:
    """A group of one (nccl on cuda, gloo on cpu), FSDP2 over it, bf16; regional compile on cuda (a cold
    compile costs about 25 s on 2 CPU cores, so not on cpu)."""
    return [
        f"--run_root={run_root}",
        f"--data.sources=['{corpus}/train/*.jsonl']",
        f"--data.val_sources=['{corpus}/val/*.jsonl']",
        f"--data.tokenizer={corpus}/tok.model",
        "--data.lanes=4",
        f"--training.device={device}",
        "--training.dtype=bfloat16",
        "--training.seq_len=64",
        "--metrics.log_interval=2",
        f"--parallelism.compile={'true' if device == 'cuda' else 'false'}",
    ]


def launch(run_root: Path, corpus: Path, device: str, config: str, *overrides: str) -> None:
    """`python train.py` as one process, a group of its own (whatever train_here left in the environment)."""
    cmd = [sys.executable, "train.py", "--config", f"train_configs/{config}.toml"]
    cmd += [*train_args(run_root, corpus, device), *overrides]
    env = {k: v for k, v in os.environ.items() if k not in GROUP_ENV} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def train_here(
    monkeypatch: pytest.MonkeyPatch, run_root: Path, corpus: Path, device: str, config: str, *overrides: str
) -> None:
    """What `launch` runs, in this process: no process start, and on cuda no cold compile once a launch
    has filled the inductor cache. A group of one on a free port; environment and signal handlers (the
    trainer's preemption watcher takes SIGTERM) are restored afterwards."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in zip(GROUP_ENV, (0, 1, 0, "127.0.0.1", port), strict=True):
        monkeypatch.setenv(key, str(value))
    cfg = load_config(ROOT / "train_configs" / f"{config}.toml", [*train_args(run_root, corpus, device), *overrides])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        train(cfg)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


STEPS = ["--training.steps=6", "--metrics.log_interval=1"]
# The one launch per device that the training and resume tests share: a checkpoint every 3 steps.
LAUNCH = [*STEPS, "--checkpoint.interval=3"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Callable[[str], Path]:
    """device -> the run folder of `train.py` on debug_mor (expert choice) with LAUNCH, launched once per
    device and module. Tests read it or copy it; none writes into it."""
    runs: dict[str, Path] = {}

    def get(device: str) -> Path:
        if device not in runs:
            root = tmp_path_factory.mktemp(f"launch_{device}")
            launch(root, corpus, device, "debug_mor", *LAUNCH)
            runs[device] = root / "debug_mor"
        return runs[device]

    return get


def scalars(run: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    return {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_training_of_every_debug_config_falls(
    tmp_path: Path, corpus: Path, device: str, launched: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Expert choice: the launch (compiled on cuda). Vanilla and token choice: in this process, eager (their
    cold compiles would cost a lease a minute each; the benchmarks compile vanilla at 360M)."""
    for kind, (config, extra) in CONFIGS.items():
        if kind == "expert":
            run = launched(device)
        else:
            eager = ["--parallelism.compile=false", "--data.num_workers=0"]
            train_here(monkeypatch, tmp_path, corpus, device, config, f"--name={kind}", *STEPS, *eager, *extra)
            run = tmp_path / kind
        tags = scalars(run)
        loss = list(tags["train/loss"].values())
        assert sorted(tags["train/loss"]) == [1, 2, 3, 4, 5, 6]
        assert all(math.isfinite(v) for v in loss), (kind, loss)
        assert loss[-1] < loss[0] - 0.5, (kind, loss)
        if device == "cuda":  # the CUDA memory metrics, and MFU where the device's peak is known
            assert tags["mem/max_allocated_gib"][6] > 0
            if peak_flops(torch.cuda.get_device_name(), 0.0, warn=False):
                assert 0 < tags["perf/mfu"][6] < 1
        else:
            assert tags["mem/max_rss_gib"][6] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_dcp_resume_continues_the_same_losses(
    tmp_path: Path,
    corpus: Path,
    device: str,
    launched: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "debug_mor"
    shutil.copytree(launched(device), run)
    full = scalars(run)["train/loss"]
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    shutil.rmtree(run / "export")
    capfd.readouterr()
    train_here(monkeypatch, tmp_path, corpus, device, "debug_mor", *LAUNCH)  # the same job resumes from step 3
    out = capfd.readouterr().out
    assert "resumed from" in out and "step-00000003" in out
    resumed = scalars(run)["train/loss"]
    # Atomics in CUDA backward kernels (scatter-add, attention) make bf16 runs differ in the last bits.
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=1e-3), (step, full, resumed)
    assert full[6] < full[1] - 0.5  # the losses moved: a resume that restarted would not match them


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["vanilla", "expert", "token"])
def test_cached_generation_and_engine_on_device_equal_cpu_recompute(device: str, kind: str) -> None:
    model = tiny_model(init_std=0.1, **KINDS[kind]).eval()
    if kind == "token":  # break the random router's near-ties between depths (as test_generate does)
        model.stack.depth_bias.copy_(torch.tensor([0.0, 0.01, -0.01]))
    prompts = [[5, 17, 3], [9, 1, 44, 60, 2, 81, 7, 30], [12]]
    ref = [reference_greedy(model, p, 10) for p in prompts]  # fp32 on the CPU, whole sequence each step
    moved = model.to(device)
    out = generate(moved, prompts, SamplingConfig(max_new_tokens=10))
    engine = DepthBatchEngine(moved, slots=2, max_len=32, sampling=SamplingConfig(max_new_tokens=10))
    for p in prompts:
        engine.submit(p)
    served = engine.run()
    for i, (tokens, depths) in enumerate(ref):
        assert (out.tokens[i], out.depths[i]) == (tokens, depths), i
        assert (served.tokens[i], served.depths[i]) == (tokens, depths), i


def peak_step_memory(tmp_path: Path, config: str, *overrides: str) -> tuple[float, bool]:
    """Peak CUDA memory (bytes) of building the model and three bf16 training steps through the trainer's
    own pieces (FSDP2 on a group of one, mixed precision, fused AdamW); and whether AdamW is fused."""
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/pg-{config}", rank=0, world_size=1)
    try:
        cfg = load_config(ROOT / "train_configs" / f"{config}.toml", ["--training.dtype=bfloat16", *overrides])
        device = torch.device("cuda", 0)
        mesh = build_mesh(cfg.parallelism, "cuda")
        par = Parallel(device, mesh, *dp_coordinates(mesh), 1)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = build_model(cfg, mesh, device)
        optimizer = build_optimizer(model, cfg.optimizer)
        scheduler = build_lr_scheduler(optimizer, cfg.optimizer, cfg.training.steps)
        t = cfg.training
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            x = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1), generator=g)
            batch = {"input": x[:, :-1], "labels": x[:, 1:]}
            train_step(model, optimizer, scheduler, [batch], par, cfg)
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated()), bool(optimizer.defaults["fused"])
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_mor_nr2_peak_memory_is_below_vanilla_at_the_same_batch(tmp_path: Path) -> None:
    # Activations dominate at this shape (16 x 1024 tokens, d 256, vocab 512), as they do at 360M.
    shape = ["--model.vocab_size=512", "--model.d_model=256", "--model.max_seq_len=1024", "--training.seq_len=1024"]
    shape += ["--training.micro_batch_size=16", "--training.global_batch_size=16"]
    vanilla, fused = peak_step_memory(tmp_path, "debug_vanilla", *shape)
    mor, _ = peak_step_memory(tmp_path, "debug_mor", "--model.num_recursions=2", *shape)
    assert fused
    assert mor < 0.95 * vanilla, (mor / 2**20, vanilla / 2**20)


def test_bench_train_steps_down_to_a_batch_that_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in dict(RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():
        monkeypatch.setenv(key, str(value))  # the trainer's group of one, undone after the test
    from mor_pretrain import trainer

    real, tried = trainer.train, []

    def train(cfg):
        tried.append(cfg.training.micro_batch_size)
        if cfg.training.micro_batch_size > 1:  # a run that dies mid-way, its process group still up
            trainer.init_distributed("cpu")
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(cfg)

    monkeypatch.setattr(trainer, "train", train)
    corpus = bench.write_corpus(tmp_path / "corpus", docs=60)
    s = bench.cpu_setting()
    row = bench.run_fitting("vanilla", "vanilla_360m", [], [4, 2, 1], s, corpus, tmp_path / "runs")
    assert tried == [4, 2, 1] and row["batch"] == 1 and not row["oom"]
    assert row["tokens_per_s"] > 0 and math.isfinite(row["loss"]) and not dist.is_initialized()
    assert list((tmp_path / "runs").iterdir()) == []  # no run folder is left behind


@pytest.mark.parametrize(
    ("kernel", "cls"),
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "GEMM"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "GEMM"),
        ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention"),  # cutlass, yet attention
        ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>", "attention"),
        ("void at::native::sbtopk::gatherTopK<c10::BFloat16, unsigned int, 2, false>", "routing"),
        ("triton_poi_fused_index_put_scatter_add_0", "routing"),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
        ("void at::native::(anonymous namespace)::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>", "loss"),
        ("void at::native::embedding_backward_feature_kernel<c10::BFloat16, float, long>", "embedding"),
        ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "FSDP comms + copies"),
        ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_1", "other"),
    ],
)
def test_profile_kernel_classes(kernel: str, cls: str) -> None:
    assert gpu_check.classify(kernel) == cls


def test_generation_max_batch_stops_where_the_next_batch_would_end_past_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check's generation phases double the batch only while the next one fits their time."""
    from types import SimpleNamespace

    now = [0.0]

    def measure(model, batch, *rest):  # a batch of b takes b / 32 s
        now[0] += batch / 32
        return {"batch": batch, "wall_s": batch / 32}

    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    first = {"batch": 32, "wall_s": 1.0}
    # Ends at 2 s (batch 64), 6 s (128); 256 would end near 6 + 2.5 x 4 = 16 > 10.
    assert bench.max_batch(None, first, 4, 8, 0, 0.0, 0, deadline=10.0)["batch"] == 128
    now[0] = 0.0
    assert bench.max_batch(None, first, 4, 8, 0, 0.0, 64, deadline=100.0)["batch"] == 64


# Imported first by every Python process of the check (through PYTHONPATH): torchdata imports only from
# the folder the script unpacks wheels into, as on the GPU machine, which has none of its own; and with
# NO_ESTIMATOR set, importing the dry-run estimator fails (nothing on the GPU machine may run it).
STAND_IN = """
import importlib.machinery, os, sys

class AsOnTheGpuMachine:
    def find_spec(self, name, path=None, target=None):
        if name == "mor_pretrain.estimate" and os.environ.get("NO_ESTIMATOR"):
            raise ImportError("the GPU machine must not import mor_pretrain.estimate", name=name)
        if name != "torchdata":
            return None
        deps = os.environ["GPU_DEPS"]
        spec = importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if p.startswith(deps)])
        if spec is None:
            raise ModuleNotFoundError("No module named 'torchdata'", name=name)
        return spec

sys.meta_path.insert(0, AsOnTheGpuMachine())
"""


def wheel_of_installed(package: str, dest: Path) -> Path:
    """A wheel (a zip of importable files) of an installed pure-Python package, as fetch_wheels.sh brings."""
    import zipfile

    root = Path(importlib.import_module(package).__file__).parent
    wheel = dest / f"{package}-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for f in root.rglob("*.py"):
            z.write(f, f.relative_to(root.parent))
    return wheel


def handed_back(out: Path) -> dict[str, Path]:
    """What a lent machine hands back of `out`, by the tool's rules: at most 8 plain files, at most 2 folders
    down, every folder and file named in letters, digits, '.', '_' and '-'. The check must lose nothing to
    them, so anything the rules would drop fails here."""
    found = sorted(p for p in out.rglob("*") if not p.is_dir() or p.is_symlink())
    kept = {}
    for p in found:
        rel = p.relative_to(out)
        ok = p.is_file() and not p.is_symlink() and len(rel.parts) <= 3
        ok = ok and all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts)
        assert ok, f"{rel} would not come back"
        kept[str(rel)] = p
    assert len(kept) <= 8, sorted(kept)
    return kept


@pytest.mark.slow  # the whole check on a tiny CPU shape, predictions first: about 2 minutes on 2 cores
def test_gpu_check_script_runs_end_to_end_in_cpu_mode(tmp_path: Path) -> None:
    """The one-call check as on the GPU machine: the dry run's predictions made beforehand and brought as a
    file, torchdata only from the brought wheels, no estimator, a report after every phase, one line per
    phase in the output, nothing in OUTDIR that a lent machine would not hand back, the BENCHMARKS section
    replaced in place."""
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nkept\n\n<!-- gpu_check:start -->\nstale\n<!-- gpu_check:end -->\n\ntail\n")
    out, site, wheels, deps = (tmp_path / d for d in ("out", "site", "wheels", "deps"))
    predictions = tmp_path / "predictions.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # `tools/gpu_check.py --predict FILE --cpu` traces all six runs (about 80 s here): the first one will do.
    first_only = "import sys; from mor_pretrain import gpu_check as g; runs = g.training_runs; "
    first_only += "g.training_runs = lambda cpu: runs(cpu)[:1]; sys.exit(g.main(sys.argv[1:]))"
    made = subprocess.run(
        [sys.executable, "-c", first_only, "--predict", str(predictions), "--cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert made.returncode == 0, made.stdout[-4000:] + made.stderr[-4000:]
    site.mkdir()
    wheels.mkdir()
    (site / "sitecustomize.py").write_text(STAND_IN)
    wheel_of_installed("torchdata", wheels)
    env |= {"PYTHONPATH": str(site), "WHEELS": str(wheels), "GPU_DEPS": str(deps), "NO_ESTIMATOR": "1"}
    env["PREDICTIONS"] = str(predictions)
    hidden = subprocess.run([sys.executable, "-c", "import torchdata"], env=env, capture_output=True, text=True)
    assert "No module named 'torchdata'" in hidden.stderr  # the stand-in machine has no torchdata
    banned = subprocess.run(
        [sys.executable, "-c", "import mor_pretrain.estimate"], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert "must not import mor_pretrain.estimate" in banned.stderr
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--cpu", "--doc", str(doc), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "installing torchdata from" in proc.stdout and (deps / "torchdata").is_dir()
    back = handed_back(out)
    assert sorted(back) == ["extra.tar.gz", "gpu_check.md", "log.txt", "results.json"]
    res = json.loads(back["results.json"].read_text())
    section = back["gpu_check.md"].read_text()
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n\n<!-- gpu_check:start -->") and text.endswith("end -->\n\ntail\n")
    assert "stale" not in text and text.count("<!-- gpu_check:start -->") == 1 and section in text
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    assert f"torch {torch.__version__}" in section and today in section and "gpu_check.sh --cpu" in section
    for heading in ("Peak matmul", "Training", "Dry run vs measured", "Profile", "Attention", "Generation", "Targets"):
        assert f"### {heading}" in section, heading
    assert section.count("| pass |") + section.count("| miss |") == 6 and "Phases that failed" not in section
    assert len(res["train"]) == 4 and len(res["train_1.7b"]) == 2 and not res["errors"] and not res["skipped"]
    vanilla, *others = res["train"] + res["train_1.7b"]
    assert vanilla["predicted"]["memory_gib"] > 0 and vanilla["predicted"]["step_s"] > 0
    assert vanilla["label"] == "vanilla" and not any(r["predicted"] for r in others)
    assert section.count("| vanilla | 2 | ") == 1  # its row of the dry-run table
    assert set(res["generate"]) == {"vanilla", "mor4", "mor2", "mor3"}
    math_rows = [r for r in res["attention"]["rows"] if r["backend"] == "math"]
    assert len(math_rows) == 2 and all(r["ms"] > 0 and r["tflops"] > 0 for r in math_rows)
    # The output's tail alone carries every result: one line per phase, as it ended, and the same in log.txt.
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("gpu_check: ")]
    names = ["tests", "predictions"] + [name for name, _, _ in gpu_check.phase_plan(True)]
    for name in names:
        assert sum(ln.startswith(f"gpu_check: {name} | ") for ln in lines) == 1, name
    assert "gpu_check: train:vanilla | 2 x 64 | " in proc.stdout and "dry run" in proc.stdout
    assert re.match(r"gpu_check: tests \| \d+ passed, \d+ deselected", lines[0])
    assert back["log.txt"].read_text().splitlines() == lines
    assert sum(map(len, lines)) < 12_000
    with tarfile.open(back["extra.tar.gz"]) as tar:
        members = set(tar.getnames())
    assert {"tests.txt", "predictions.json", "profile_mor360m_trace.json.gz", "phases/train_vanilla.json"} <= members
    assert "phases/generate_mor4.log" in members


def test_gpu_check_phase_failure_costs_only_that_phase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A phase that fails logs one line and the next phase runs; the results are on disk after each."""
    written = []
    real_write = gpu_check.write_results

    def write(res, args, began):
        written.append(json.loads(json.dumps({"matmul": res.get("matmul"), "errors": dict(res["errors"])})))
        return real_write(res, args, began)

    plan = [("train:no such run", "train", "training no such run"), ("matmul", "matmul", "peak matmul")]
    monkeypatch.setattr(gpu_check, "phase_plan", lambda cpu: plan)
    monkeypatch.setattr(gpu_check, "write_results", write)
    doc = tmp_path / "BENCHMARKS.md"
    assert gpu_check.main([str(tmp_path / "out"), "--cpu", "--doc", str(doc), "--budget-s", "120"]) == 0
    assert written[1]["errors"] == {"training no such run": "KeyError: 'no such run'"} and written[1]["matmul"] is None
    assert written[-1]["matmul"]["tflops"] > 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["errors"] == written[1]["errors"] and res["matmul"]["n"] == 256
    assert "training no such run: `KeyError: 'no such run'`" in doc.read_text()


def test_gpu_check_skips_what_does_not_fit_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(gpu_check, "phase_plan", lambda cpu: [("matmul", "matmul", "peak matmul")])
    doc = tmp_path / "BENCHMARKS.md"
    assert gpu_check.main([str(tmp_path / "out"), "--cpu", "--doc", str(doc), "--budget-s", "0"]) == 0
    assert "gpu_check: matmul | skipped (budget): needs 1 s, " in capsys.readouterr().out
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["skipped"][0].startswith("peak matmul (needs 1 s") and "matmul" not in res["seconds"]


def test_gpu_check_sizes_training_by_the_dry_run() -> None:
    """Training phases need COST's seconds plus their steps at the predicted step time (a guess without a
    prediction); 1.7B starts at the largest batch predicted to fit the card."""
    res = {"cpu": False, "env": {"device": "one NVIDIA H200"}, "matmul": {"memory_gib": 100.0}}
    runs = {run[1]: run for run in gpu_check.training_runs(False)}

    def row(label: str, batch: int, step_s: float, memory_gib: float) -> dict:
        _, _, config, overrides, _, s = runs[label]
        by_gpu = {"H100": {"step_s": 9.0, "reserved_gib": None}, "H200": {"step_s": step_s, "reserved_gib": None}}
        run = {"label": label, "config": config, "overrides": overrides, "batch": batch, "seq_len": s.seq_len}
        return run | {"memory_gib": memory_gib, "by_gpu": by_gpu}

    preds = [row("vanilla", 16, 0.2, 50.0)] + [row("vanilla 1.7B", b, 1.0, 12.0 * b) for b in (16, 8, 4)]
    need, cap = gpu_check.COST_GPU["train"]
    assert gpu_check.phase_cost("train", "vanilla", res, preds, [16], False) == (
        need + 1.5 * 12 * 0.2,
        cap + 3 * 12 * 0.2,
    )
    guess = gpu_check.STEP_GUESS_S["train"]
    assert gpu_check.phase_cost("train", "MoR Nr=3", res, preds, [16], False)[0] == need + 1.5 * 12 * guess
    assert gpu_check.batches_to_try("train_1.7b", "vanilla 1.7B", res, preds) == [4]  # 16 x 12 > 0.9 x 100
    assert gpu_check.batches_to_try("train_1.7b", "MoR Nr=3 1.7B", res, preds) == [16, 8, 4]  # no prediction
    assert gpu_check.prediction(preds, res, "vanilla", 16) == {
        "gpu": "H200",
        "memory_gib": 50.0,
        "step_s": 0.2,
        "reserved_gib": None,
    }
    assert gpu_check.prediction(preds, res, "vanilla", 8) is None
