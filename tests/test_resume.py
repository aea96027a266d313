"""Checkpointing through the launched trainer: bit-exact resume, resharding across layouts, preemption,
non-finite handling, seed checkpoints and refusal of a changed model. Each test launches real runs."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import ROOT, write_corpus
from wandb_records import read_wandb_records

from mor_pretrain.config import load_config
from mor_pretrain.folders import COMPLETE, complete_steps, load_dcp_model, load_exported

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def data_args(tmp_path: Path) -> list[str]:
    if not (tmp_path / "data").exists():
        write_corpus(tmp_path / "data")
    return [
        f"--data.sources=['{tmp_path}/data/train/*.jsonl']",
        f"--data.val_sources=['{tmp_path}/data/val/*.jsonl']",
        f"--data.tokenizer={tmp_path}/data/tok.model",
        "--data.lanes=4",
        "--training.seq_len=64",
        "--metrics.log_interval=1",
        f"--run_root={tmp_path / 'runs'}",
    ]


def launch(tmp_path, *overrides, nproc=2, config="debug_mor", wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    cmd += ["--config", f"train_configs/{config}.toml", *data_args(tmp_path), *overrides]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def scalars(run: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    return {e.step: e.value for e in ea.Scalars(tag)} if tag in ea.Tags()["scalars"] else {}


@pytest.mark.parametrize(
    "config,extra",
    [
        ("debug_vanilla", []),
        ("debug_mor", []),
        # Random routing draws from torch's generator: its state travels in the checkpoint, so resume is exact.
        ("debug_mor", ["--model.expert_rule=random"]),
    ],
    ids=["vanilla", "mor", "mor_random"],
)
def test_resume_is_bit_exact_and_a_changed_model_is_refused(tmp_path, config, extra):
    args = ["--training.steps=6", "--checkpoint.interval=3", "--training.deterministic=true", *extra]
    ok(launch(tmp_path, *args, "--checkpoint.async_save=true", config=config))
    run = tmp_path / "runs" / config
    full = scalars(run, "train/loss")
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    assert complete_steps(run / "checkpoints") == [3, 6]
    assert scalars(run, "checkpoint/stall_s")  # the async save's stall is logged
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    shutil.rmtree(run / "export")
    proc = ok(launch(tmp_path, *args, config=config))  # the same command resumes from step 3
    assert "resumed from" in proc.stdout and "step-00000003" in proc.stdout
    resumed = scalars(run, "train/loss")
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]
    bad = launch(tmp_path, *args, "--model.d_model=64", "--model.n_heads=2", "--model.n_kv_heads=1", config=config)
    assert bad.returncode != 0
    assert "model.d_model: checkpoint has 128, this run has 64" in bad.stdout + bad.stderr


def test_resharding_2_to_fsdp_tp_4_to_1_continues_the_losses(tmp_path):
    common = ["--optimizer.schedule=constant", "--training.micro_batch_size=2", "--checkpoint.interval=2"]
    ok(launch(tmp_path, *common, "--training.steps=6", "--name=reference", nproc=1))
    ref = scalars(tmp_path / "runs" / "reference", "train/loss")
    ok(launch(tmp_path, *common, "--training.steps=2", "--name=moved", nproc=2))
    ok(launch(tmp_path, *common, "--training.steps=4", "--name=moved", "--parallelism.tp=2", nproc=4))
    ok(launch(tmp_path, *common, "--training.steps=6", "--name=moved", nproc=1))
    moved = scalars(tmp_path / "runs" / "moved", "train/loss")
    assert sorted(moved) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert moved[step] == pytest.approx(ref[step], abs=2e-4), (step, moved, ref)


def test_preemption_signal_saves_and_next_launch_resumes(tmp_path):
    proc = launch(tmp_path, "--training.steps=400", "--checkpoint.interval=0", wait=False)
    lines = []
    deadline = time.time() + 300
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 3/"):
            break
        assert time.time() < deadline, "".join(lines)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    subprocess.run(["kill", "-USR1", workers[0]], check=True)  # one rank only: all must agree to stop
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, "".join(lines) + out
    run = tmp_path / "runs" / "debug_mor"
    (stopped,) = complete_steps(run / "checkpoints")
    assert 3 <= stopped < 400 and not (run / "export").exists()
    proc = ok(launch(tmp_path, f"--training.steps={stopped + 2}"))
    assert f"step-{stopped:08d}" in proc.stdout
    assert max(scalars(run, "train/loss")) == stopped + 2 and (run / "export").exists()


def test_nonfinite_stop_saves_nothing_bad_and_skip_counts(tmp_path):
    blowup = ["--optimizer.lr=1e30", "--optimizer.warmup_fraction=0", "--training.steps=6"]
    stop = launch(tmp_path, *blowup, "--checkpoint.interval=1", "--name=stop")
    assert stop.returncode != 0 and "non-finite" in stop.stdout + stop.stderr
    for step in complete_steps(tmp_path / "runs" / "stop" / "checkpoints"):
        _, state, _ = load_dcp_model(tmp_path / "runs" / "stop" / "checkpoints" / f"step-{step:08d}", progress=False)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), step
    skip = launch(tmp_path, *blowup, "--training.nonfinite=skip", "--checkpoint.interval=1", "--name=skip")
    skip_run = tmp_path / "runs" / "skip"
    # Skipped updates cannot undo weights that overflowed to inf: the save refuses them, nothing bad is kept.
    assert skip.returncode == 0 or "NaN or inf" in skip.stdout + skip.stderr
    for step in complete_steps(skip_run / "checkpoints"):
        _, state, _ = load_dcp_model(skip_run / "checkpoints" / f"step-{step:08d}", progress=False)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), step
    if (skip_run / "export").exists():
        exported, _ = load_exported(skip_run / "export")
        assert all(torch.isfinite(v).all() for v in exported.state_dict().values() if v.is_floating_point())
    skipped = scalars(skip_run, "train/skipped_steps")
    nonfinite = sum(1 for v in scalars(skip_run, "train/grad_norm").values() if not math.isfinite(v))
    assert skipped[6] >= 1 and skipped[6] == nonfinite


def test_seed_checkpoint_is_step_zero_and_runs_start_from_it(tmp_path):
    ok(launch(tmp_path, "--checkpoint.create_seed=true", nproc=1))
    seed = tmp_path / "runs" / "debug_mor" / "checkpoints" / "step-00000000"
    assert (seed / COMPLETE).exists()
    proc = ok(launch(tmp_path, "--training.steps=2", nproc=2))
    assert "step-00000000" in proc.stdout
    assert complete_steps(seed.parent) == [0, 2]  # the seed is never pruned


def test_a_throwaway_run_keeps_its_periodic_checkpoints_only(tmp_path):
    """checkpoint.save_final = false (benchmarks): no last-step checkpoint and no export; periodic ones stay."""
    ok(launch(tmp_path, "--training.steps=3", "--checkpoint.interval=2", "--checkpoint.save_final=false", nproc=1))
    run = tmp_path / "runs" / "debug_mor"
    assert complete_steps(run / "checkpoints") == [2]
    assert not (run / "export").exists()
    assert sorted(scalars(run, "train/loss")) == [1, 2, 3]


def test_a_finished_run_relaunched_does_nothing_and_a_changed_config_or_rewind_is_refused(tmp_path):
    common = ["--training.steps=2", "--checkpoint.interval=1"]
    ok(launch(tmp_path, *common, nproc=1))
    run = tmp_path / "runs" / "debug_mor"
    record = (run / "config.toml").read_text()
    again = ok(launch(tmp_path, *common, nproc=1))
    assert "already finished at step 2" in again.stdout and "nothing to do" in again.stdout
    changed = launch(tmp_path, *common, "--optimizer.lr=0.5", nproc=1)
    out = changed.stdout + changed.stderr
    assert changed.returncode != 0 and "optimizer.lr" in out and "nothing to do" in out
    assert (run / "config.toml").read_text() == record and load_config(run / "config.toml").optimizer.lr != 0.5
    marker = (run / "checkpoints" / "step-00000002" / COMPLETE).read_text()
    rewind = launch(tmp_path, "--training.steps=4", "--checkpoint.interval=1", "--checkpoint.load_step=1", nproc=1)
    assert rewind.returncode != 0 and "would rewind" in rewind.stdout + rewind.stderr
    assert (run / "checkpoints" / "step-00000002" / COMPLETE).read_text() == marker and (run / "export").exists()


def test_a_resumed_run_logs_each_step_once_and_a_run_stopped_in_its_last_step_gets_its_export(tmp_path):
    """A crash after step 3 was logged but before it was saved: the relaunch trains step 3 again, and
    TensorBoard shows it once. A run saved at its last step without an export (SIGTERM there): the
    relaunch writes the export and exits 0."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["--training.steps=3", "--checkpoint.interval=2", "--training.val_interval=0"]
    ok(launch(tmp_path, *args, nproc=1))
    run = tmp_path / "runs" / "debug_mor"
    shutil.rmtree(run / "checkpoints" / "step-00000003")
    shutil.rmtree(run / "export")
    assert "step-00000002" in ok(launch(tmp_path, *args, nproc=1)).stdout
    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    for tag in ("train/loss", "train/lr", "progress/tokens"):
        assert [e.step for e in ea.Scalars(tag)] == [1, 2, 3], tag
    shutil.rmtree(run / "export")
    proc = ok(launch(tmp_path, *args, nproc=1))
    assert "nothing to do" in proc.stdout and "wrote the missing export of step 3" in proc.stdout
    assert load_exported(run / "export")[1]


def test_a_relaunch_repairs_an_export_a_crash_left_half_written(tmp_path):
    """A kill while config.json was written in place left it truncated, and the relaunch said "nothing to do"
    over an unreadable export. The relaunch checks the export, not only that its files exist, and rewrites it.
    The checkpoint carries the run's tokenizer, so it is read offline without the path its config names."""
    args = ["--training.steps=2", "--checkpoint.interval=0", "--training.val_interval=0"]
    ok(launch(tmp_path, *args, nproc=1))
    run = tmp_path / "runs" / "debug_mor"
    ckpt = run / "checkpoints" / "step-00000002"
    assert (ckpt / "tokenizer.model").read_bytes() == (tmp_path / "data" / "tok.model").read_bytes()
    assert load_dcp_model(ckpt, progress=False)[2]["tokenizer"] == str((ckpt / "tokenizer.model").resolve())
    cfg = run / "export" / "config.json"
    cfg.write_bytes(cfg.read_bytes()[:200])
    proc = ok(launch(tmp_path, *args, nproc=1))
    assert "nothing to do" in proc.stdout and "wrote the missing export of step 2" in proc.stdout
    assert load_exported(run / "export")[1]["training"]["steps"] == 2


def test_workers_save_and_exit_when_their_launcher_is_killed(tmp_path):
    """`kill -9` on torchrun alone: its workers notice the new parent at their next step, save, exit and
    release the run lock; the same command resumes from that checkpoint."""
    import fcntl
    import os
    import signal

    args = ["--training.steps=100000", "--metrics.log_interval=5", "--training.val_interval=0"]
    proc = launch(tmp_path, *args, wait=False)
    run = tmp_path / "runs" / "debug_mor"
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the first log line: the workers are training
            if line.startswith("step "):
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 120
        while not complete_steps(run / "checkpoints") and time.monotonic() < deadline:
            time.sleep(0.5)
        steps = complete_steps(run / "checkpoints")
        assert steps, "no checkpoint after the launcher died"
        with open(run / ".lock", "a") as f:  # the lock is released once the workers have exited
            while time.monotonic() < deadline:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(0.5)
            else:
                pytest.fail("the workers still hold the run lock")
            fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        subprocess.run(["pkill", "-9", "-f", f"--run_root={tmp_path / 'runs'}"], check=False)
    resumed = ok(launch(tmp_path, "--training.steps=" + str(steps[-1] + 1), "--training.val_interval=0"))
    assert f"step-{steps[-1]:08d}" in resumed.stdout


def test_wandb_backend_logs_offline_and_a_resumed_run_continues_the_same_run(tmp_path):
    pytest.importorskip("wandb")
    import json as json_module

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    cmd += ["--config", "train_configs/debug_mor.toml", *data_args(tmp_path), "--checkpoint.interval=2"]
    cmd += ["--metrics.backends=['tensorboard', 'wandb']", "--training.val_interval=0"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env["HOME"] = str(tmp_path)  # W&B's own settings and cache stay in the test's folder
    for steps in (2, 4):
        proc = subprocess.run([*cmd, f"--training.steps={steps}"], cwd=ROOT, env=env, capture_output=True, text=True)
        ok(proc)
    run = tmp_path / "runs" / "debug_mor"
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and files[0].name == files[1].name  # two launches, one W&B run id
    steps, config = {}, {}
    for f in files:
        for record in read_wandb_records(f):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json_module.loads(i.value_json) for i in record.history.item}
                steps.setdefault(items["_step"], {}).update(items)
            elif kind == "run":  # the run's config comes with its first record
                config.update({i.key: json_module.loads(i.value_json) for i in record.run.config.update})
    tb = scalars(run, "train/loss")
    assert sorted(s for s in steps if "train/loss" in steps[s]) == [1, 2, 3, 4] == sorted(tb)
    for s, loss in tb.items():  # the same figures in both backends
        assert steps[s]["train/loss"] == pytest.approx(loss, rel=1e-6)
        assert steps[s]["perf/tokens_per_s_per_device"] > 0
    assert config["model"]["num_recursions"] == 3 and config["training"]["steps"] == 4  # the resolved config
