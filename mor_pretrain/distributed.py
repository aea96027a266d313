"""The run's processes: their groups, the one rule for collectives outside the model, the lock that keeps a
second job out of a run folder and the preemption signal every rank agrees on.

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
import fcntl
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mor_pretrain.config import CheckpointError, ConfigError, RunFolder

logger = logging.getLogger(__name__)
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


class RunLock:
    """An exclusive flock on <run_dir>/.lock, held while a job trains in the folder. The kernel drops it
    when the holder exits in any way (kill -9 included), so a stale lock cannot outlive its process."""

    def __init__(self, run_dir: Path):
        self.path = RunFolder(Path(run_dir)).lock
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise CheckpointError(
                f"run folder {run_dir} is in use by another job ({holder}); stop it or pick another --name"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        os.close(self._fd)


class PreemptionWatcher:
    """Turns SIGTERM/SIGUSR1 into a flag the loop checks after each step; every rank agrees on it.

    Schedulers signal each process, but not necessarily at the same step, so the flag is max-reduced over
    the host (gloo) group: all ranks stop after the same step, save together and exit 0.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.requested = False
        self._group = host_group()
        # Under torchrun the parent is the launcher. Killed alone, it leaves its workers training (and
        # holding the run lock); a worker whose parent changed stops as if signalled.
        self._launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning("received %s: will save and exit after this step", signal.Signals(signum).name)
        self.requested = True

    def should_stop(self) -> bool:
        if self._launcher is not None and not self.requested and os.getppid() != self._launcher:
            logger.warning("the torchrun launcher (pid %d) is gone: will save and exit after this step", self._launcher)
            self.requested = True
        if self._group is None:
            return self.requested
        flag = torch.tensor([int(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())
