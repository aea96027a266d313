"""How launches fail and how they run beyond one machine: a failing job prints one `error:` line (not one
traceback per rank) and exits non-zero; a corpus with nothing readable says so with the skip counts; two
torchrun agents joined as two nodes train and resume exactly like one node; the SLURM script saves on its
early-warning signal, requeues, and the requeued job resumes (srun and scontrol are stand-in scripts)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import train_bpe
from test_resume import data_args, launch, scalars
from test_train import ROOT

from mor_pretrain.config import ConfigError
from mor_pretrain.data import DataError, build_dataloader
from mor_pretrain.data.sources import check_readable, open_source
from mor_pretrain.folders import complete_steps

ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
# A frame of the trainer's code in a traceback: torchrun's own report of a failed worker has none.
TRAINER_FRAME = re.compile(r'File ".*(train\.py|mor_pretrain/)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0, out[-3000:]
    assert len(errors) == 1, out[-6000:]
    assert not TRAINER_FRAME.search(out), out[-6000:]
    return errors[0]


# --- one clear line per failing job ------------------------------------------------------------------------


def test_config_that_is_a_directory_is_one_error_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    assert one_error_line(proc) == f"error: config file {tmp_path} is a directory; give the path of a TOML file"


@pytest.mark.parametrize(
    ("world", "layout", "bad", "error"),
    [
        (4, ["--parallelism.tp=2"], "--model.n_kv_heads=1", "parallelism.tp=2 must divide model.n_heads"),
        (2, [], "--data.lanes=1", "data.lanes=1 is fewer than data-parallel ranks x workers = 2 x 1"),
    ],
)
def test_the_dry_run_refuses_what_the_launch_refuses(tmp_path, world, layout, bad, error):
    cmd = [sys.executable, "train.py", "--config", "train_configs/debug_mor.toml", "--dry-run", str(world)]
    cmd += [*data_args(tmp_path), "--data.num_workers=0", *layout]
    proc = subprocess.run([*cmd, bad], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert error in one_error_line(proc)
    fine = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert fine.returncode == 0 and f"{world} processes = dp_replicate 1" in fine.stdout, fine.stderr


@pytest.mark.slow  # three single-process launches that fail at setup: about 15 s
def test_a_broken_tokenizer_or_parquet_file_is_one_error_line(tmp_path):
    cmd = [sys.executable, "train.py", "--config", "train_configs/debug_mor.toml", *data_args(tmp_path)]
    for content in (b"", b"\x00garbage" * 40):  # empty, not a model
        tok = tmp_path / "tok_bad.model"
        tok.write_bytes(content)
        proc = subprocess.run([*cmd, f"--data.tokenizer={tok}"], cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert one_error_line(proc).startswith(f"error: {tok} is not a SentencePiece model")
    fake = tmp_path / "shard.parquet"
    fake.write_text("not parquet\n")
    proc = subprocess.run([*cmd, f"--data.sources=['{fake}']"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert one_error_line(proc).startswith(f"error: {fake} is not a readable parquet file")


@pytest.mark.slow  # two single-process launches and a DataLoader worker: about 25 s on a busy 2-core machine
def test_an_error_in_a_dataloader_worker_is_one_line_and_a_bug_keeps_its_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    cmd = [sys.executable, "train.py", "--config", "train_configs/debug_mor.toml", *data_args(tmp_path)]
    proc = subprocess.run(
        [*cmd, f"--data.sources=['{bad}']", "--data.num_workers=1"], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    assert one_error_line(proc).startswith(f"error: data source '{bad}' has no readable document")

    # Anything else is a bug to report: its traceback stays.
    boom = "import sys, train, mor_pretrain.trainer as t; t.train = lambda cfg: 1 / 0; train.main(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", boom, *cmd[2:]], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ZeroDivisionError" in proc.stderr
    assert "error: " not in proc.stderr


@pytest.mark.slow  # three 2-process launches, about 30 s on 2 cores
@pytest.mark.distributed
def test_launched_errors_print_one_line_from_the_failing_rank(tmp_path):
    # Every rank fails the same way after the process group is up: one line, not one per rank.
    line = one_error_line(launch(tmp_path, "--model.vocab_size=64"))  # the test corpus has 320 pieces
    assert "model.vocab_size (64) is smaller than the tokenizer's 320 pieces" in line

    # Nothing readable: said so, with the skip counts, instead of "lower data.lanes".
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9 cr\xe8me"}\n' * 3 + b'{"title": "no text"}\n')
    line = one_error_line(launch(tmp_path, f"--data.sources=['{bad}']"))
    assert f"data source '{bad}' has no readable document" in line
    assert "1 x no string field 'text', 3 x undecodable bytes" in line

    # Only rank 1 fails (its lane of a one-document corpus is empty); rank 0 then fails in a collective
    # with a departed peer, which is a consequence, not news: one line, from rank 1.
    one_doc = tmp_path / "one.jsonl"
    one_doc.write_text(json.dumps({"text": " ".join(["the king walked to the river"] * 40)}) + "\n")
    line = one_error_line(launch(tmp_path, f"--data.sources=['{one_doc}']", "--data.lanes=2"))
    assert "lane 1 of 2 holds no document" in line and "lower data.lanes" in line


# train.py with rank 0 finding a bad config last: the order that used to lose the job's only error line (rank
# 1 exited without a word, torchrun stopped rank 0 before it printed; 8 launches in 30 on a busy machine).
RANK0_LAST = """
import os, sys, time
import mor_pretrain.config as config
import train
real = config.load_config
def load_config(*args, **kwargs):
    if os.environ["RANK"] == "0":
        time.sleep(8)
    return real(*args, **kwargs)
config.load_config = load_config
train.main(sys.argv[1:])
"""


@pytest.mark.slow  # three 2-process launches that fail at setup: about 40 s on a busy 2-core machine
@pytest.mark.distributed
def test_a_bad_override_is_one_error_line_whichever_rank_finds_it_first(tmp_path):
    """Every rank validates the config before the process group exists; the line reaches the user from the
    first rank to find it, even when torchrun stops the others as soon as that one exits."""
    env = {**ENV, "PYTHON": sys.executable, "NGPU": "2"}
    proc = subprocess.run(
        ["bash", "scripts/train.sh", "--model.d_model=-128"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert one_error_line(proc) == "error: override --model.d_model=-128: model.d_model: must be >= 1, got -128"

    script = tmp_path / "rank0_last.py"
    script.write_text(RANK0_LAST)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    cmd += ["--config", "train_configs/debug_mor.toml"]
    for bad, error in (
        ("--optimizer.weight_decay=-0.1", "optimizer.weight_decay must be a finite number >= 0, got -0.1"),
        ("--name=", "name must be a run folder name (no path separators, not empty), got ''"),
    ):
        env = {**ENV, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([*cmd, bad], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert one_error_line(proc) == f"error: override {bad}: {error}"


# --- sources with nothing readable ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return train_bpe([f"some words number {i} here and there" for i in range(200)], root / "tok", 64)


def first_batch(tmp_path, tokenizer, sources, **kw):
    from mor_pretrain.config import DataConfig

    cfg = DataConfig(sources=sources, tokenizer=str(tokenizer), lanes=4, **kw)
    dl = build_dataloader(cfg, split="train", seq_len=8, micro_batch_size=2, dp_rank=0, dp_world=1, seed=0)
    return next(iter(dl))


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused_at_setup(tokenizer):
    from mor_pretrain.config import JobConfig
    from mor_pretrain.trainer import size_vocabulary

    cfg = JobConfig()
    cfg.data.tokenizer, cfg.data.vocab_multiple = str(tokenizer), 48
    size_vocabulary(cfg)
    assert cfg.model.vocab_size == 96  # 64 pieces, padded to a multiple of 48
    cfg.model.vocab_size = 64
    size_vocabulary(cfg)  # exactly the tokenizer's size is enough
    cfg.model.vocab_size = 63
    with pytest.raises(ConfigError, match=r"model.vocab_size \(63\) is smaller than the tokenizer's 64 pieces"):
        size_vocabulary(cfg)


def test_unreadable_jsonl_reports_skips_by_reason(tmp_path, tokenizer):
    records = [b'{"text": "caf\xe9"}'] * 3 + [b'{"title": "x"}'] * 2 + [b"not json", b'{"text": "  "}']
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(records) + b"\n")
    with pytest.raises(DataError) as e:
        first_batch(tmp_path, tokenizer, [str(tmp_path / "a.jsonl")])
    assert str(e.value) == (
        f"data source '{tmp_path / 'a.jsonl'}' has no readable document: its 1 file(s), read as jsonl (data.format) "
        "with data.text_field 'text', gave only skipped records: 1 x empty document, 1 x line is not JSON, "
        "2 x no string field 'text', 3 x undecodable bytes"
    )


def test_binary_text_files_report_undecodable_bytes(tmp_path, tokenizer):
    for i in range(2):
        (tmp_path / f"blob{i}.txt").write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(DataError, match=r"its 2 file\(s\), read as text .* 2 x undecodable bytes$"):
        first_batch(tmp_path, tokenizer, [str(tmp_path)])


def test_blank_jsonl_holds_no_record_and_a_readable_but_small_source_asks_for_fewer_lanes(tmp_path, tokenizer):
    (tmp_path / "blank.jsonl").write_text("\n\n  \n")
    with pytest.raises(DataError, match="read as jsonl .* hold no record$"):
        check_readable(open_source(str(tmp_path / "blank.jsonl")))
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "some words " * 20}) + "\n")
    check_readable(open_source(str(tmp_path / "one.jsonl")))  # readable: no complaint
    with pytest.raises(DataError, match="lane 1 of 4 holds no document.*lower data.lanes"):
        first_batch(tmp_path, tokenizer, [str(tmp_path / "one.jsonl")])


# --- several nodes ------------------------------------------------------------------------------------------


def two_nodes(tmp_path: Path, *overrides: str) -> list[str]:
    """Two torchrun agents on this machine as two nodes of one process each, joined by a c10d rendezvous
    on localhost through scripts/multinode.sh; returns each agent's output."""
    env = {
        **ENV,
        "NNODES": "2",
        "NGPU": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RDZV_ID": f"test-{os.getpid()}-{time.monotonic_ns()}",
        "PYTHON": sys.executable,
    }
    cmd = ["bash", "scripts/multinode.sh", *data_args(tmp_path), *overrides]
    agents = [
        subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outs = [agent.communicate(timeout=600)[0] for agent in agents]
    for agent, out in zip(agents, outs, strict=True):
        assert agent.returncode == 0, out[-3000:]
    return outs


@pytest.mark.slow  # three 2-process launches, about 45 s on 2 cores
@pytest.mark.distributed
def test_two_nodes_train_and_resume_like_one_node(tmp_path):
    args = ["--training.steps=4", "--checkpoint.interval=2", "--training.deterministic=true"]
    ref = launch(tmp_path, *args, "--name=one_node")
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    expected = scalars(tmp_path / "runs" / "one_node", "train/loss")
    assert sorted(expected) == [1, 2, 3, 4]

    outs = two_nodes(tmp_path, *args, "--name=two_nodes")
    assert sum("run folder" in out for out in outs) == 1  # the agents got different ranks: one holds rank 0
    run = tmp_path / "runs" / "two_nodes"
    assert scalars(run, "train/loss") == expected

    shutil.rmtree(run / "checkpoints" / "step-00000004")
    shutil.rmtree(run / "export")
    outs = two_nodes(tmp_path, *args, "--name=two_nodes")
    assert any("resumed from" in out and "step-00000002" in out for out in outs)
    assert scalars(run, "train/loss") == expected and (run / "export").exists()


# --- SLURM ------------------------------------------------------------------------------------------------

SRUN = """#!/usr/bin/env bash
# Stand-in for srun on a one-node allocation: the command becomes the one task. Real srun forwards the
# signals it receives to its tasks; exec makes a signal sent to "srun" reach the task directly.
while [[ $1 == -* ]]; do shift; done
exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
case $1 in
    show) echo 127.0.0.1 ;;
    requeue) echo "requeue $2" >> "$SCONTROL_LOG" ;;
esac
"""


@pytest.mark.slow  # two 2-process launches, about 40 s on 2 cores
@pytest.mark.distributed
def test_slurm_script_saves_on_its_signal_requeues_and_the_requeued_job_resumes(tmp_path):
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    env = {
        **ENV,
        "PATH": f"{shims}:{ENV['PATH']}",
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "node0",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "CONFIG": "train_configs/debug_mor.toml",
        "NGPU": "2",
        "MASTER_PORT": str(free_port()),
        "PYTHON": sys.executable,
        "SHUTDOWN_TIMEOUT": "120",
    }
    # sbatch runs the script from its spool folder; the script moves to SLURM_SUBMIT_DIR itself.
    cmd = ["bash", str(ROOT / "scripts" / "slurm.sbatch"), *data_args(tmp_path), "--training.steps=30"]
    job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert job.stdout is not None
    lines = []
    for line in job.stdout:
        lines.append(line)
        if line.startswith("step 3/"):
            break
    assert lines and lines[-1].startswith("step 3/"), "".join(lines)[-4000:]
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@... does: the batch shell only
    out = "".join(lines) + job.communicate(timeout=300)[0]
    run = tmp_path / "runs" / "debug_mor"
    saved = complete_steps(run / "checkpoints")
    assert len(saved) == 1 and 3 <= saved[0] < 30 and not (run / "export").exists(), out[-4000:]
    saved = saved[0]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"

    requeued = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert requeued.returncode == 0, requeued.stdout[-3000:] + requeued.stderr[-3000:]
    assert "resumed from" in requeued.stdout and f"step-{saved:08d}" in requeued.stdout
    assert max(scalars(run, "train/loss")) == 30 and (run / "export").exists()
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # a finished job is not requeued
