"""The launched entry point: `torchrun train.py` on the debug MoR config trains (its loss falls), writes the
TensorBoard scalars of the metrics contract, the resolved config and a loadable export. A corpus and a small
SentencePiece model are written here, so the test needs no download."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import train_bpe

from mor_pretrain.config import load_config
from mor_pretrain.folders import load_exported

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    *("the", "king", "walked", "to", "the", "river", "and", "the", "stone", "was"),
    *("cold", "in", "the", "morning", "light", "of", "a", "long", "day"),
]


def write_corpus(root: Path) -> Path:
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) + "." for _ in range(300)]
    for split, part in (("train", docs[:260]), ("val", docs[260:])):
        (root / split).mkdir(parents=True)
        (root / split / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    return train_bpe(docs, root / "tok", 320, byte_fallback=True)


def run_train(
    tmp_path: Path, *overrides: str, nproc: int = 2, timeout: int = 300, config: str = "debug_mor"
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["train.py", "--config", f"train_configs/{config}.toml", f"--run_root={tmp_path / 'runs'}", *overrides]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.distributed
@pytest.mark.slow  # two processes, about 30 s on 2 cores
def test_torchrun_debug_config_trains_and_logs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tok = write_corpus(tmp_path / "data")
    proc = run_train(
        tmp_path,
        f"--data.sources=['{tmp_path}/data/train/*.jsonl']",
        f"--data.val_sources=['{tmp_path}/data/val/*.jsonl']",
        f"--data.tokenizer={tok}",
        "--data.lanes=4",
        "--training.steps=30",
        "--training.seq_len=64",
        "--training.val_interval=15",
        "--training.val_batches=2",
        "--metrics.log_interval=5",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # No warning: torchdata's set_vital deprecation, which no user can act on, came once per rank, and a
    # CPU run was told its MFU is not reported.
    assert [line for line in (proc.stdout + proc.stderr).splitlines() if "warning" in line.lower()] == []
    run = tmp_path / "runs" / "debug_mor"
    assert f"tensorboard --logdir {run / 'tb'}" in proc.stdout
    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/lm_loss",
        "train/aux/router_bce",
        "train/grad_norm",
        "train/lr",
        "perf/tokens_per_s",
        "perf/tokens_per_s_per_device",
        "perf/step_time_s",
        "perf/data_time_s",
        "perf/data_share",
        "perf/tflops_per_device",
        "perf/val_time_s",
        "mem/max_rss_gib",
        "mem/max_rss_share",
        "train/lm_loss_max_rank",
        "val/causal_mean_depth",
        "val/causal_depth/3",
        "progress/tokens",
        "progress/flops_paper",
        "progress/flops_executed",
        "val/loss_causal",
        "val/loss_topk",
        "val/ppl_causal",
        "val/ppl_topk",
    ):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert "perf/mfu" not in tags  # CPU has no known peak: no MFU rather than a made-up one
    assert "routing/mean_depth" not in tags  # expert top-k's depths are its capacities, constant
    shares = [ea.Scalars(f"val/causal_depth/{d}")[-1].value for d in range(4)]
    assert sum(shares) == pytest.approx(1.0) and ea.Scalars("val/causal_mean_depth")[-1].value == pytest.approx(
        sum(d * v for d, v in enumerate(shares)), rel=1e-5
    )
    loss = [e.value for e in ea.Scalars("train/loss")]
    assert [e.step for e in ea.Scalars("train/loss")] == [5, 10, 15, 20, 25, 30]
    assert loss[-1] < loss[0] - 1.0, loss
    val = [e.value for e in ea.Scalars("val/loss_causal")]
    assert len(val) == 2 and val[1] < val[0]
    assert [e.step for e in ea.Scalars("val/loss_topk")] == [15, 30]  # on the training step axis
    tokens = [e.value for e in ea.Scalars("progress/tokens")]
    assert tokens[-1] == 30 * 8 * 64  # steps x global batch x seq_len
    per_device = {e.step: e.value for e in ea.Scalars("perf/tokens_per_s_per_device")}
    for e in ea.Scalars("perf/tokens_per_s"):  # the global rate over 2 devices
        assert per_device[e.step] == pytest.approx(e.value / 2, rel=1e-5)
    assert "tok/s/dev " in proc.stdout
    config_text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "[model]" in config_text and "steps = 30" in config_text  # the resolved config, in TensorBoard
    cfg = load_config(run / "config.toml")
    assert cfg.model.vocab_size == 320 and cfg.training.steps == 30  # 320 pieces: already a multiple of 64
    model, meta = load_exported(run / "export")
    assert (meta["tokenizer"], meta["tokenizer_source"]) == ("tokenizer.model", str(tok))  # copied beside the weights
    assert model.args.num_recursions == 3


def test_train_py_rejects_an_unknown_override(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "train_configs/debug_mor.toml", "--training.stepz=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    # the one line names the override that brought the bad key, not the file it was laid over
    assert proc.stderr.startswith("error: override --training.stepz=3: unknown key training.stepz")
    assert proc.stderr.count("\n") == 1


@pytest.mark.distributed
@pytest.mark.slow  # two short torchrun launches and a report: about 40 s on 2 cores
def test_isoflop_report_shows_both_validation_losses_of_real_runs(tmp_path):
    """A 2-rank debug MoR run and a debug vanilla run, then `tools/isoflop.py report` over them: the table
    holds each run's causal and top-k validation loss as read back from its TensorBoard files."""
    from mor_pretrain.isoflop import read_scalars

    tok = write_corpus(tmp_path / "data")
    data = [
        f"--data.sources=['{tmp_path}/data/train/*.jsonl']",
        f"--data.val_sources=['{tmp_path}/data/val/*.jsonl']",
        f"--data.tokenizer={tok}",
        "--data.lanes=4",
        "--training.steps=4",
        "--training.seq_len=32",
        "--training.val_interval=2",
        "--training.val_batches=1",
        "--metrics.log_interval=2",
    ]
    for config, nproc in (("debug_mor", 2), ("debug_vanilla", 1)):
        proc = run_train(tmp_path, *data, nproc=nproc, config=config)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [tmp_path / "runs" / name for name in ("debug_mor", "debug_vanilla")]
    report = subprocess.run(
        [sys.executable, "tools/isoflop.py", "report", *map(str, runs)],
        cwd=ROOT,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    lines = report.stdout.splitlines()
    head = [c.strip() for c in next(line for line in lines if line.startswith("| model |")).strip("|").split("|")]
    for run in runs:
        tb = read_scalars(run / "tb")
        assert sorted(tb["val/loss_causal"]) == [2, 4] and set(tb["val/loss_causal"]) <= set(tb["train/loss"])
        row = next(line for line in lines if line.startswith(f"| {run.name} |"))
        cells = dict(zip(head, (c.strip() for c in row.strip("|").split("|")), strict=True))
        causal, topk = tb["val/loss_causal"][4], tb["val/loss_topk"][4]
        assert cells["val loss (causal)"] == f"{causal:.4f}" and cells["val loss (top-k)"] == f"{topk:.4f}"
        assert (causal != topk) == (run.name == "debug_mor")  # expert choice: top-k sees future tokens
