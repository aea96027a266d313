"""The process groups of a job, and the one rule for collectives outside the model.

Under nccl the default group serves CUDA tensors only: a collective on a CPU tensor there raises "No
backend type associated with device type cpu", and object collectives and barriers depend on the current
device. So no code of this package uses the default group implicitly. Every collective names its group:
- `host_group()`: gloo over every rank, for host-side values (flags, JSON-able objects, barriers, DCP's
  planning, the data loader's positions). Its tensors live on the CPU.
- `device_group(device)`: every rank, for values that live on the run's device (losses, metrics).
- the device mesh's groups, for the model's parameters (FSDP, TP, the gradient norm).
The tests run the trainer under a default group whose backend map has no CPU entry (gloo for "cuda" only,
as nccl's), so a collective that falls back on the default group fails on CPU as it would on a GPU.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from mor_pretrain.config import ConfigError

_HOST: dict[dist.ProcessGroup, dist.ProcessGroup] = {}


def init_distributed(device_kind: str) -> torch.device:
    """Join (or, without torchrun, create) the process group; gloo on CPU, nccl on GPU."""
    if "RANK" not in os.environ:  # plain `python train.py`: a group of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device is 'cuda' but no CUDA device is visible")
    use_cuda = device_kind == "cuda" or (device_kind == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10), device_id=device if use_cuda else None)
    return device


def host_group() -> dist.ProcessGroup | None:
    """A gloo group over every rank for host-side collectives; None without a process group.

    Created on first use, which is a collective call on every rank like any use of it. A new default group
    (after destroy_process_group) gets a new one."""
    if not dist.is_initialized():
        return None
    world = dist.group.WORLD
    assert world is not None
    if dist.get_backend() == "fake":  # the dry run's traced step: no peers, the default group serves all
        return world
    if world not in _HOST:
        _HOST.clear()
        group = dist.new_group(backend="gloo")
        assert isinstance(group, dist.ProcessGroup)  # every rank is a member
        _HOST[world] = group
    return _HOST[world]


def device_group(device: torch.device) -> dist.ProcessGroup | None:
    """Every rank, for collectives on tensors on `device`: the default group on CUDA (nccl), the host group
    on the CPU (so a CPU run never depends on the default group's backend serving CPU tensors)."""
    return dist.group.WORLD if device.type == "cuda" else host_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier(group=host_group())
