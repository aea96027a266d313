"""Collectives on the wrong device, caught on the CPU.

Under nccl the default group serves CUDA tensors only, so a collective that falls back on it with a CPU
tensor kills a GPU run (the first one would have died at its first checkpoint). Here the ranks' default
group is gloo for "cuda" only (conftest.GPU_LIKE_BACKEND): such a collective fails on the CPU too. The
trainer's every path outside the model runs under it: the model's seeded init, training, validation,
metrics, the data loader's positions, preemption checks, checkpoint save, resume and its checks, the
export, and a relaunch of the finished run.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import GPU_LIKE_BACKEND, cpu_mesh, spawn, tiny_model
from test_train import ROOT, write_corpus

from mor_pretrain.checkpoint import all_finite
from mor_pretrain.config import load_config
from mor_pretrain.folders import complete_steps

pytestmark = pytest.mark.distributed


def _join(rank: int, world: int, init: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group(
        GPU_LIKE_BACKEND, init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )


def _all_finite_worker(rank: int, world: int, init: str) -> None:
    from torch.distributed.fsdp import fully_shard

    _join(rank, world, init)
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_reduce(torch.ones((), dtype=torch.int32))  # what all_finite did: the harness catches it
    model = tiny_model(seed=0)
    mesh = cpu_mesh(world)
    fully_shard(model.stack, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all_finite(model)
    if rank == 1:  # one rank's shard goes bad: every rank must see it
        with torch.no_grad():
            next(model.stack.parameters()).to_local().view(-1)[0] = float("nan")
    assert not all_finite(model)
    dist.destroy_process_group()


def test_all_finite_agrees_over_ranks_under_a_cuda_only_default_group(tmp_path: Path) -> None:
    spawn(_all_finite_worker, 2, 2, f"file://{tmp_path}/rendezvous")


def _train_worker(rank: int, world: int, init: str, overrides: list[str]) -> None:
    from mor_pretrain.trainer import train

    _join(rank, world, init)
    train(load_config(ROOT / "train_configs" / "debug_mor.toml", overrides))  # leaves the group at its end


@pytest.mark.slow  # three 2-rank runs: about 40 s on 2 cores
def test_the_trainer_never_falls_back_on_the_default_group(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_corpus(data)
    common = [
        f"--data.sources=['{data}/train/*.jsonl']",
        f"--data.val_sources=['{data}/val/*.jsonl']",
        f"--data.tokenizer={data}/tok.model",
        "--data.lanes=4",
        "--training.seq_len=64",
        "--training.device=cpu",
        "--training.val_interval=2",
        "--training.val_batches=1",
        "--metrics.log_interval=1",
        "--checkpoint.interval=2",
        f"--run_root={tmp_path / 'runs'}",
    ]
    run = tmp_path / "runs" / "debug_mor"
    for i, steps in enumerate((3, 4, 4)):  # train, save, export; resume for a step; nothing to do
        spawn(_train_worker, 2, 2, f"file://{tmp_path}/rendezvous-{i}", [*common, f"--training.steps={steps}"])
        assert complete_steps(run / "checkpoints")[-1] == steps
        assert (run / "export" / "model.safetensors").is_file()
