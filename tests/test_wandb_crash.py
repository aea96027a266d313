"""W&B through a crash of every process: each step once, with TensorBoard's values (offline run files read back)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_resume import data_args, ok
from test_train import ROOT
from wandb_records import history_rows

from mor_pretrain.checkpoint import SaveRecord
from mor_pretrain.config import VAL_LOSS, MetricsConfig, RunFolder
from mor_pretrain.folders import COMPLETE
from mor_pretrain.metrics import SEGMENT_FIRST_STEP, SUPERSEDED, MetricLogger


def wandb_env(tmp_path: Path) -> dict[str, str]:
    # W&B's own settings and cache stay in the test's folder
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HOME": str(tmp_path)}


def test_a_relaunch_supersedes_the_wandb_rows_a_crashed_launch_wrote_past_its_checkpoint(tmp_path, monkeypatch):
    """A launch checkpoints step 2, logs steps 3 and 4 (on disk, as a long run's full blocks are) and dies; the
    relaunch from step 2 logs 3 and 4 again with other values. The run files hold each step once, as the
    relaunch logged it (TensorBoard's rule), and the crashed launch's rows of 3 and 4 lie in superseded/."""
    pytest.importorskip("wandb")
    for key, value in {**wandb_env(tmp_path), "WANDB_CONSOLE": "off"}.items():  # pytest holds the console
        monkeypatch.setenv(key, value)
    folder = RunFolder(tmp_path / "run")
    cfg = MetricsConfig(backends=["wandb"])

    def launch(first_step: int, last_step: int, checkpoint_step: int, offset: float) -> None:
        metrics = MetricLogger(cfg, folder, 4, rank=0, first_step=first_step, wandb_id="abc123")
        for step in range(first_step + 1, last_step + 1):
            metrics.log(step, {"train/loss": offset + step}, step, console=False)
            if step == checkpoint_step:
                metrics.checkpoint(SaveRecord(step, stall_s=0.5))
            metrics.end_step()
        metrics.close()

    launch(0, 4, checkpoint_step=2, offset=0.0)
    launch(2, 4, checkpoint_step=4, offset=10.0)
    wandb_dir = folder.path / "wandb"
    rows = history_rows(sorted(wandb_dir.glob("offline-run-*/run-*.wandb")))
    assert [(r["_step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
    assert rows[1]["checkpoint/stall_s"] == rows[3]["checkpoint/stall_s"] == 0.5
    superseded = sorted((wandb_dir / SUPERSEDED).glob("*/run-*.wandb"))
    assert [(r["_step"], r["train/loss"]) for r in history_rows(superseded)] == [(3, 3.0), (4, 4.0)]


def stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: state, ppid, ..., start time (index 19); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def job_processes(root: int) -> dict[int, str]:
    """`root` and every process descended from it, with their start times: the launcher, its workers (each in
    a session of its own) and what they started, W&B's service included (also in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = stat_fields(int(stat.parent.name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        fields = stat_fields(pid)
        if fields:
            found[pid] = fields[19]
            todo += children.get(pid, [])
    return found


def alive(pid: int, start: str) -> bool:
    """Whether process `pid`, started at `start`, still runs (a zombie or a new process of that id does not)."""
    fields = stat_fields(pid)
    return fields is not None and fields[19] == start and fields[0] != "Z"


def scalars_by_tag(tb: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb))
    ea.Reload()
    return {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}


@pytest.mark.slow
@pytest.mark.distributed
def test_wandb_keeps_each_step_once_when_every_process_of_the_job_is_killed(tmp_path):
    """A lost node: SIGKILL to the launcher, its two workers and W&B's service once the step-2 checkpoint is
    complete and step 3 is logged; the same command resumes from step 2. The offline W&B files then hold each
    step once, with TensorBoard's values: step 2 (with the validation losses) was on disk before its checkpoint
    counted, and step 3 is the relaunch's (the crashed launch's W&B folder of step 3 was moved aside)."""
    pytest.importorskip("wandb")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    cmd += ["--config", "train_configs/debug_mor.toml", *data_args(tmp_path)]
    cmd += ["--training.steps=6", "--training.val_interval=2", "--checkpoint.save_steps=[2]"]
    cmd += ["--metrics.backends=['tensorboard', 'wandb']"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", **wandb_env(tmp_path)}
    run, log = tmp_path / "runs" / "debug_mor", tmp_path / "first_launch.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    pids: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 300
        complete = run / "checkpoints" / "step-00000002" / COMPLETE
        while not (complete.is_file() and "\nstep 3/6 " in log.read_text()):  # step 3 comes after the save
            assert proc.poll() is None, f"the first launch ended early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no step-2 checkpoint and step 3 in 300 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        pids = job_processes(proc.pid)
        assert len(pids) >= 4, pids  # the launcher, two workers, W&B's service
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # gone meanwhile
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(alive(pid, start) for pid, start in pids.items()):
            assert time.monotonic() < deadline, "processes of the first launch survived SIGKILL"
            time.sleep(0.05)
    finally:
        for pid, start in (pids or job_processes(proc.pid)).items():
            if alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (run / "checkpoints" / "step-00000006").exists(), "killed too late: the first launch finished"

    resumed = ok(subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600))
    assert "step-00000002" in resumed.stdout  # resumed from step 2
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len({f.name for f in files}) == 1  # one W&B run, in pieces
    rows = history_rows(files)
    assert sorted(r["_step"] for r in rows) == [1, 2, 3, 4, 5, 6]  # each step once
    wandb_steps = {r["_step"]: r for r in rows}
    tb = scalars_by_tag(run / "tb")
    assert {k for r in rows for k in r if not k.startswith("_")} == set(tb)
    for tag, series in tb.items():  # the same steps and figures in both backends
        assert sorted(s for s, r in wandb_steps.items() if tag in r) == sorted(series), tag
        for step, value in series.items():
            assert wandb_steps[step][tag] == pytest.approx(value, rel=1e-6, abs=1e-12), (tag, step)
    assert VAL_LOSS["causal"] in wandb_steps[2] and "checkpoint/stall_s" in wandb_steps[2]
    moved = [int(m.read_text()) for m in run.glob(f"wandb/{SUPERSEDED}/*/{SEGMENT_FIRST_STEP}")]
    assert moved == [3]  # the crashed launch's folder from step 3 on
