"""Distributed checkpoints with torch.distributed.checkpoint (DCP): atomic, pruned, async, reshardable.

Layout: <run_dir>/<checkpoint.folder>/step-<8 digits>/ holds the DCP files, `config.toml` (the resolved job
config) and, once every rank has finished writing, `COMPLETE`. Only complete checkpoints are loaded or counted
when pruning, so a crash mid-save leaves the previous checkpoint usable.

Top-level keys: "model" and "optimizer" (sharded DTensors via torch.distributed.checkpoint.state_dict, so a
checkpoint saved on one mesh loads on another), "lr_scheduler" and "train_state" (identical on every rank),
and, beside the DCP files, one `rank<r>.pt` per rank with its data-loader position and RNG states, which
differ between ranks. Each rank writes its file before joining the DCP save, and rank 0's save returns only
after every rank's DCP writes, so `COMPLETE` implies every file is there.
"""

from __future__ import annotations

import logging
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mor_pretrain.config import CheckpointConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

logger = logging.getLogger(__name__)
COMPLETE = "COMPLETE"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def complete_steps(root: Path) -> list[int]:
    """Steps of the complete checkpoints under root, ascending."""
    if not root.is_dir():
        return []
    steps = []
    for d in root.glob("step-*"):
        if (d / COMPLETE).is_file() and d.name[5:].isdigit():
            steps.append(int(d.name[5:]))
    return sorted(steps)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class ModelState:
    """DCP Stateful view of a (possibly FSDP/TP-sharded) model; names as in MoRModel.state_dict()."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_model_state_dict(self.model, sd, options=StateDictOptions(strict=True))


class OptimizerState:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, sd)


class SchedulerState:
    """A LambdaLR's position only. The schedule itself comes from the current config, so a resumed run may
    change lr or the schedule (an isoFLOP cooldown does). DCP loads the optimizer (whose param groups carry
    the saved lr) after this, so call `apply()` once everything is loaded."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LambdaLR):
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.scheduler.last_epoch}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.scheduler.last_epoch = int(sd["last_epoch"])

    def apply(self) -> None:
        """Set every param group's lr from this run's schedule at the loaded position."""
        s = self.scheduler
        groups = s.optimizer.param_groups
        for group, base, fn in zip(groups, s.base_lrs, s.lr_lambdas, strict=True):
            group["initial_lr"] = base
            group["lr"] = base * fn(s.last_epoch)
        s._last_lr = [g["lr"] for g in groups]


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class SaveRecord:
    step: int
    stall_s: float  # how long training was blocked by this save
    total_s: float | None = None  # wall time until the checkpoint was complete


@dataclass
class Checkpointer:
    """Saves and restores a training job. `states` maps top-level keys to objects with
    state_dict()/load_state_dict(); `per_rank` keys ("dataloader") are stored once per rank."""

    cfg: CheckpointConfig
    root: Path
    config_toml: str = ""
    async_group: Any = None
    records: list[SaveRecord] = field(default_factory=list)
    _pending: tuple[Any, int, float] | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.cfg.async_save and dist.is_initialized() and self.async_group is None:
            # Background writes run their own collectives: a separate gloo group keeps them off the
            # training group's stream and ordering.
            self.async_group = dist.new_group(backend="gloo")

    # ----- saving -------------------------------------------------------------------------------
    def should_save(self, step: int, last: bool) -> bool:
        if last:
            return True
        if step in self.cfg.save_steps:
            return True
        return self.cfg.interval > 0 and step % self.cfg.interval == 0

    def save(self, step: int, states: dict[str, Any], per_rank: dict[str, Any], wait: bool = False) -> SaveRecord:
        """Write a checkpoint for `step`. Async saves return once the state is staged in host memory."""
        self.finish_pending()
        path = step_dir(self.root, step)
        if _rank() == 0:
            if path.exists():  # a leftover of a crashed save at this step
                shutil.rmtree(path)
            path.mkdir(parents=True)
            (path / "config.toml").write_text(self.config_toml)
        _barrier()
        start = time.perf_counter()
        extra = {key: obj.state_dict() for key, obj in per_rank.items()} | {"rng": rng_state()}
        torch.save(extra, path / f"rank{_rank()}.pt")
        sd = dict(states)
        if self.cfg.async_save and not wait:
            future = dcp.async_save(sd, checkpoint_id=str(path), process_group=self.async_group)
            record = SaveRecord(step, time.perf_counter() - start)
            self._pending = (future, step, start)
        else:
            dcp.save(sd, checkpoint_id=str(path))
            record = SaveRecord(step, time.perf_counter() - start)
            self._mark_complete(step)
            record.total_s = time.perf_counter() - start
        self.records.append(record)
        return record

    def finish_pending(self) -> None:
        """Block until an in-flight async save is written, then mark it complete and prune."""
        if self._pending is None:
            return
        future, step, start = self._pending
        self._pending = None
        future.result()
        self._mark_complete(step)
        for r in self.records:
            if r.step == step:
                r.total_s = time.perf_counter() - start

    def poll(self) -> None:
        """Complete a finished async save without blocking (call once per step)."""
        if self._pending is not None and self._pending[0].done():
            self.finish_pending()

    def _mark_complete(self, step: int) -> None:
        # DCP writes its metadata on rank 0 only after gathering every rank's write results, so when rank 0's
        # save has returned, all ranks' data is on disk: no barrier needed (and none allowed in poll()).
        if _rank() == 0:
            (step_dir(self.root, step) / COMPLETE).write_text(f"{step}\n")
            self._prune()

    def _prune(self) -> None:
        steps = complete_steps(self.root)
        keep = set(steps[-self.cfg.keep_latest :]) | set(self.cfg.save_steps)  # branch points stay
        newest = max(steps) if steps else -1
        for d in self.root.glob("step-*"):
            s = int(d.name[5:]) if d.name[5:].isdigit() else None
            if s is None:
                continue
            stale = s not in keep and (s in steps or s < newest)  # never touch a save still in flight
            if stale and s != 0:  # step 0 is the seed checkpoint: always kept
                shutil.rmtree(d, ignore_errors=True)

    # ----- loading ------------------------------------------------------------------------------
    def resolve_load_step(self) -> int | None:
        """The step to resume from: checkpoint.load_step if set (must be complete), else the latest."""
        steps = complete_steps(self.root)
        if self.cfg.load_step >= 0:
            if self.cfg.load_step not in steps:
                raise FileNotFoundError(
                    f"checkpoint.load_step={self.cfg.load_step}: no complete checkpoint at "
                    f"{step_dir(self.root, self.cfg.load_step)} (complete: {steps or 'none'})"
                )
            return self.cfg.load_step
        return steps[-1] if steps else None

    def load(
        self, path: Path, states: dict[str, Any], per_rank: dict[str, Any], check_config: Callable[[str], None]
    ) -> None:
        """Load a complete checkpoint folder into `states` (in place) and the per-rank objects.

        Keys missing from the checkpoint are skipped (a seed checkpoint holds only the model). A rank with no
        file of its own (the checkpoint came from fewer ranks) takes rank 0's data-loader state, whose position
        is global, and keeps its fresh RNG streams.
        """
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
        saved_cfg = path / "config.toml"
        if saved_cfg.is_file():
            check_config(saved_cfg.read_text())
        meta_keys = {k.split(".")[0] for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata}
        sd = {k: v for k, v in states.items() if k in meta_keys}
        dcp.load(sd, checkpoint_id=str(path))
        own = path / f"rank{_rank()}.pt"
        extra_path = own if own.is_file() else path / "rank0.pt"
        if extra_path.is_file():
            extra = torch.load(extra_path, weights_only=False)
            for key, obj in per_rank.items():
                if key in extra:
                    obj.load_state_dict(extra[key])
            if extra_path == own:
                set_rng_state(extra["rng"])
        logger.info("loaded checkpoint %s (%s)", path, ", ".join(sorted(sd)))

    def close(self) -> None:
        self.finish_pending()


# Keys whose change makes a checkpoint meaningless for this run: they change parameter shapes or what the
# parameters compute with (token ids, window length). Everything else (lr, schedule, intervals, ...) may change.
STRUCTURAL_KEYS = {
    "model": [
        "vocab_size",
        "d_model",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "d_ffn",
        "num_recursions",
        "sharing",
        "router",
        "router_arch",
        "aux_router",
        "tie_embeddings",
    ],
    "data": ["tokenizer"],
    "training": ["seq_len"],
}


def config_differences(saved_toml: str, current: dict[str, Any]) -> list[str]:
    """Structural keys that differ between a checkpoint's saved config and the current one."""
    saved = tomllib.loads(saved_toml)
    diffs = []
    for section, keys in STRUCTURAL_KEYS.items():
        for key in keys:
            old, new = saved.get(section, {}).get(key), current.get(section, {}).get(key)
            if old is not None and old != new:
                diffs.append(f"{section}.{key}: checkpoint has {old!r}, this run has {new!r}")
    return diffs


class PreemptionWatcher:
    """Turns SIGTERM/SIGUSR1 into a flag the loop checks after each step; every rank agrees on it.

    Schedulers signal each process, but not necessarily at the same step, so the flag is max-reduced over
    a CPU (gloo) group: all ranks stop after the same step, save together and exit 0.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.requested = False
        self._group: dist.ProcessGroup | None = None
        if dist.is_initialized():
            group = dist.new_group(backend="gloo")
            assert isinstance(group, dist.ProcessGroup)  # every rank is a member
            self._group = group
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning("received %s: will save and exit after this step", signal.Signals(signum).name)
        self.requested = True

    def should_stop(self) -> bool:
        if self._group is None:
            return self.requested
        flag = torch.tensor([int(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())
