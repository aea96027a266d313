"""Saving and resuming a training job with torch.distributed.checkpoint (DCP): atomic, pruned, async,
reshardable. The folder format (step-<8 digits>/, the `COMPLETE` manifest, safe reads) is folders.py's.

A save writes the DCP files, `config.toml` (the resolved job config), a copy of the tokenizer file the config
names (`tokenizer.model`; none for the built-in 'default') and, once every rank has finished writing,
`COMPLETE`. Only complete checkpoints are loaded or counted when pruning, so a crash mid-save leaves the
previous checkpoint usable (a save that fails removes its partial folder), and every file is verified against
the manifest, and to lie inside the folder, before anything is read.

Nothing here unpickles what can run code: the per-rank state is JSON, DCP's pickled `.metadata` is first
checked with an unpickler that admits only the classes DCP metadata is made of (and storage entries that
name files of the folder), and DCP's non-tensor items (train state, scheduler, optimizer param groups) are
read with `torch.load(weights_only=True)`, which admits plain values only.

Collectives go over the host (gloo) group of mor_pretrain.distributed, never the default group.

Top-level keys: "model" and "optimizer" (sharded DTensors via torch.distributed.checkpoint.state_dict, so a
checkpoint saved on one mesh loads on another), "lr_scheduler" and "train_state" (identical on every rank),
and, beside the DCP files, one `rank<r>.json` per rank with its data-loader position and RNG states, which
differ between ranks. Each rank writes its file before joining the DCP save, and rank 0's save returns only
after every rank's DCP writes, so `COMPLETE` implies every file is there.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
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

from mor_pretrain.config import CheckpointConfig, CheckpointError, JobConfig
from mor_pretrain.distributed import host_group, rank, world_size
from mor_pretrain.folders import (
    COMPLETE,
    SafeLoadPlanner,
    atomic_write,
    check_dcp_metadata,
    checkpoint_tokenizer_name,
    complete_steps,
    io_cause,
    last_good_hint,
    mark_complete,
    one_line,
    read_failure,
    read_manifest,
    root_failure,
    step_dir,
    verify_files,
)
from mor_pretrain.models.mor import STRUCTURAL_FIELDS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

logger = logging.getLogger(__name__)


def dcp_load(state_dict: dict[str, Any], path: Path) -> None:
    """dcp.load through SafeLoadPlanner over the host group; any failure is a one-line CheckpointError."""
    try:
        planner = SafeLoadPlanner(folder=path)
        dcp.load(state_dict, checkpoint_id=str(path), planner=planner, process_group=host_group())
    except (Exception, dcp.CheckpointException) as e:  # DCP wraps per-rank errors in a BaseException
        raise read_failure(path, e) from None


def all_finite(model: nn.Module) -> bool:
    """Whether every parameter of the (possibly sharded) model is finite on every rank: one check on the
    parameters' device, one host copy, then a MIN over the host group."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    finite = [torch.isfinite(t.detach()).all() for t in local if t.numel()]
    ok = torch.stack(finite).all().to("cpu", torch.int32) if finite else torch.ones((), dtype=torch.int32)
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=host_group())
    return bool(ok.item())


def nonfinite_parameter(model: nn.Module) -> str | None:
    """The name of a parameter holding NaN or inf on any rank of the (possibly sharded) model, or None. The
    check is all_finite's single reduction; names are gathered only when some rank found one."""
    if all_finite(model):
        return None
    found = None
    for name, p in model.named_parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        if t.numel() and not bool(torch.isfinite(t.detach()).all()):
            found = name
            break
    if dist.is_initialized() and world_size() > 1:
        names: list[str | None] = [None] * world_size()
        dist.all_gather_object(names, found, group=host_group())
        found = next((n for n in names if n), None)
    return found or "?"


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


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """Every RNG stream as JSON-able values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": _b64(torch.get_rng_state()),
        "python": [version, list(internal), gauss_next],
        "numpy": [name, np.asarray(keys).tolist(), pos, has_gauss, gauss],
        # The current device's only: a resume may see fewer GPUs (one per task under SLURM, a smaller node).
        "cuda": _b64(torch.cuda.get_rng_state()) if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))


def _space_problem(root: Path, need: int) -> str:
    """Why a save of about `need` bytes under root would not fit ("" if it fits, with 5% to spare)."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free >= need * 1.05:
        return ""
    gib = 2**30
    return (
        f"No space left on device: {root} has {free / gib:.2f} GiB free, a checkpoint needs about "
        f"{need / gib:.2f} GiB (free space, or move checkpoint.folder or run_root; nothing was written)"
    )


def _os_cause(e: BaseException | None) -> str | None:
    """The OS error (and its file) behind a failure, from it or its cause chain; None if there is none."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            where = f" ({e.filename})" if e.filename else ""
            return f"{e.strerror or os.strerror(e.errno)}{where}"
        e = e.__cause__ or e.__context__
    return None


@dataclass
class SaveRecord:
    step: int
    stall_s: float  # how long training was blocked by this save
    total_s: float | None = None  # wall time until the checkpoint was complete


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not per-rank JSON state (garbled, or a pickle): {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds {type(data).__name__}, not per-rank state")
    return data


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
            return self.cfg.save_final
        if step in self.cfg.save_steps:
            return True
        return self.cfg.interval > 0 and step % self.cfg.interval == 0

    def save(
        self,
        step: int,
        states: dict[str, Any],
        per_rank: dict[str, Any],
        wait: bool = False,
        written: Callable[[SaveRecord], None] | None = None,
    ) -> SaveRecord:
        """Write a checkpoint for `step`. Async saves return once the state is staged in host memory.
        written(record) runs once the state is written (async: staged), before `COMPLETE` makes the checkpoint
        one a relaunch resumes from: what must be on disk by then (the metrics of the steps up to it)."""
        self.finish_pending()
        path = step_dir(self.root, step)
        model = states.get("model")
        if isinstance(model, ModelState) and not all_finite(model.model):
            raise FloatingPointError(
                f"step {step}: the weights hold NaN or inf; not saving them over good checkpoints. "
                f"Resume from the last checkpoint in {self.root} with a lower lr"
            )
        if (path / COMPLETE).is_file():
            raise CheckpointError(f"refusing to overwrite the complete checkpoint {path}")
        need = self._expected_bytes(model)
        problem = [""]
        if rank() == 0:
            if path.exists():  # a leftover of a crashed save at this step
                shutil.rmtree(path)
            problem = [_space_problem(self.root, need)]
            if not problem[0]:
                try:
                    path.mkdir(parents=True)
                    (path / "config.toml").write_text(self.config_toml)
                    self._copy_tokenizer(path)
                except OSError as e:
                    shutil.rmtree(path, ignore_errors=True)
                    where = f" ({e.filename})" if e.filename else ""
                    problem = [f"{io_cause(e)}{where}; nothing was written"]
        if dist.is_initialized():
            dist.broadcast_object_list(problem, src=0, group=host_group())
        if problem[0]:
            raise CheckpointError(f"not saving step {step}: {problem[0]}")
        start = time.perf_counter()
        sd = dict(states)
        try:
            extra = {key: obj.state_dict() for key, obj in per_rank.items()} | {"rng": rng_state()}
            (path / f"rank{rank()}.json").write_text(json.dumps(extra))
            if self.cfg.async_save and not wait:
                future = dcp.async_save(sd, checkpoint_id=str(path), process_group=self.async_group)
            else:
                dcp.save(sd, checkpoint_id=str(path), process_group=host_group())
        except (Exception, dcp.CheckpointException) as e:  # DCP wraps per-rank errors in a BaseException
            raise self._save_error(path, need, e) from None
        record = SaveRecord(step, time.perf_counter() - start)
        if written is not None:
            written(record)
        if self.cfg.async_save and not wait:
            self._pending = (future, step, start)
        else:
            try:
                self._mark_complete(step)
            except OSError as e:  # the manifest could not be written: the save is not complete
                raise self._save_error(path, need, e) from None
            record.total_s = time.perf_counter() - start
        self.records.append(record)
        return record

    def _copy_tokenizer(self, path: Path) -> None:
        """Copy the tokenizer file the job config names into the checkpoint folder (covered by the manifest),
        so the checkpoint is read offline with its own tokenizer (folders.TOKENIZER_RULE); the built-in
        'default' needs no copy."""
        try:
            spec = tomllib.loads(self.config_toml).get("data", {}).get("tokenizer", "default")
        except tomllib.TOMLDecodeError:
            return
        if not isinstance(spec, str) or spec == "default" or not Path(spec).is_file():
            return
        src = Path(spec)
        atomic_write(path / checkpoint_tokenizer_name(spec), lambda tmp: shutil.copyfile(src, tmp))

    def _expected_bytes(self, model: Any) -> int:
        """What a save will write, all ranks together: the last complete checkpoint's size, or before the
        first one, fp32 weights and two AdamW moments."""
        steps = complete_steps(self.root)
        if steps:
            try:
                return sum(f["bytes"] for f in read_manifest(step_dir(self.root, steps[-1])).values())
            except CheckpointError:
                pass
        if isinstance(model, ModelState):
            return 3 * 4 * sum(p.numel() for p in model.model.parameters())
        return 0

    def _save_error(self, path: Path, need: int, e: BaseException) -> CheckpointError:
        """One line for a failed write, naming the cause: the OS error behind DCP's wrapper (disk full,
        permission denied, ...), a full disk even when torch's own message is about stream positions. Rank 0
        removes the partial folder (a failed save is never complete, so nothing there is lost)."""
        root = root_failure(e)
        cause = _os_cause(root)
        if cause is None:
            full = "No space left on device" in str(e) or bool(_space_problem(self.root, need))
            cause = "No space left on device" if full else one_line(root)
        removed = ""
        if rank() == 0 and path.is_dir() and not (path / COMPLETE).exists():
            shutil.rmtree(path, ignore_errors=True)
            removed = "; its partial folder was removed"
        last = complete_steps(self.root)
        kept = f"; the last complete checkpoint, {step_dir(self.root, last[-1])}, is intact" if last else ""
        return CheckpointError(f"saving checkpoint {path} failed: {cause}{removed}{kept}")

    def finish_pending(self) -> None:
        """Block until an in-flight async save is written, then mark it complete and prune."""
        if self._pending is None:
            return
        future, step, start = self._pending
        self._pending = None
        try:
            future.result()
            self._mark_complete(step)
        except (Exception, dcp.CheckpointException) as e:
            raise self._save_error(step_dir(self.root, step), 0, e) from None
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
        if rank() == 0:
            mark_complete(step_dir(self.root, step), step)
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
        steps = complete_steps(self.root, log_skipped=rank() == 0)
        want = self.cfg.load_step
        if want >= 0:
            if want not in steps:
                raise FileNotFoundError(
                    f"checkpoint.load_step={want}: no complete checkpoint at "
                    f"{step_dir(self.root, want)} (complete: {steps or 'none'})"
                )
            later = [s for s in steps if s > want]
            if later:  # its saves would replace them and the export as the run passes them
                raise CheckpointError(
                    f"checkpoint.load_step={want} would rewind over the later checkpoints {later} in "
                    f"{self.root}. Branch instead: a new --name with --checkpoint.init_from="
                    f"{step_dir(self.root, want)} (or move the later folders out of {self.root})"
                )
            return want
        return steps[-1] if steps else None

    def load(
        self, path: Path, states: dict[str, Any], per_rank: dict[str, Any], check_config: Callable[[str], None]
    ) -> None:
        """Load a complete checkpoint folder into `states` (in place) and the per-rank objects.

        Keys missing from the checkpoint are skipped (a seed checkpoint holds only the model). A rank with no
        file of its own (the checkpoint came from fewer ranks) takes rank 0's data-loader state, whose position
        is global, and keeps its fresh RNG streams.
        """
        files = read_manifest(path)
        self._verify(path, sorted(files))
        check_dcp_metadata(path)
        saved = saved_config(path)
        if saved is not None:
            check_config(saved)
        meta_keys = {k.split(".")[0] for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata}
        sd = {k: v for k, v in states.items() if k in meta_keys}
        dcp_load(sd, path)
        model = sd.get("model")
        bad = nonfinite_parameter(model.model) if isinstance(model, ModelState) else None
        if bad is not None:  # a checkpoint written otherwise than by a save, which refuses them
            raise CheckpointError(
                f"checkpoint {path}: tensor {bad} holds NaN or inf; refusing to resume from these weights"
                f"{last_good_hint(path)}"
            )
        if pickled := sorted(f for f in files if f.endswith(".pt")):
            raise CheckpointError(f"{path / pickled[0]}: per-rank state as a pickle is never loaded (unsafe)")
        own = f"rank{rank()}.json"
        name = own if own in files else "rank0.json"  # a rank the saving job did not have
        if name in files:
            extra = _read_json(path / name)
            try:
                for key, obj in per_rank.items():
                    if key in extra:
                        obj.load_state_dict(extra[key])
                if name == own:
                    set_rng_state(extra["rng"])
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:  # hand-edited or damaged
                raise CheckpointError(f"{path / name}: unusable per-rank state ({type(e).__name__}: {e})") from None
        elif per_rank and "train_state" in sd:
            raise CheckpointError(f"{path} has no per-rank state (rank0.json): its data position is unknown")
        logger.info("loaded checkpoint %s (%s)", path, ", ".join(sorted(sd)))

    @staticmethod
    def _verify(path: Path, names: list[str]) -> None:
        """Each rank checks its share of the files; every rank raises if any share fails."""
        world = world_size()
        problems: list[str | None] = [verify_files(path, names[rank() :: world])]
        if world > 1:
            problems = [None] * world
            dist.all_gather_object(problems, verify_files(path, names[rank() :: world]), group=host_group())
        found = [p for p in problems if p is not None]
        if found:
            raise CheckpointError(f"checkpoint {path} is damaged: {found[0]}{last_good_hint(path)}")

    def close(self) -> None:
        self.finish_pending()


# Keys whose change makes a checkpoint meaningless for this run: the model fields that change what the weights
# mean (models.mor.STRUCTURAL_FIELDS, the one list; every other model field is NON_STRUCTURAL_FIELDS), the
# token ids (tokenizer) and the window length (seq_len). Everything else (lr, schedule, loss coefficients,
# intervals, ...) may change.
STRUCTURAL_KEYS = {
    "model": list(STRUCTURAL_FIELDS),
    "data": ["tokenizer"],
    "training": ["seq_len"],
}


def saved_config(path: Path) -> str | None:
    """The job config a checkpoint folder was saved with (its config.toml), checked to be a TOML document of
    tables; None if the folder has none. Anything else is a CheckpointError naming the file."""
    f = path / "config.toml"
    if not f.is_file():
        return None
    try:
        text = f.read_bytes().decode()
        parsed = tomllib.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise CheckpointError(f"{f} is not a TOML job config: {e}") from None
    sections = [f.name for f in fields(JobConfig) if f.name not in ("name", "run_root")]
    bad = [k for k in sections if not isinstance(parsed.get(k, {}), dict)]
    if bad:
        raise CheckpointError(f"{f}: [{bad[0]}] must be a table, got {type(parsed[bad[0]]).__name__}")
    return text


def config_differences(
    saved_toml: str, current: dict[str, Any], keys: dict[str, list[str]] | None = STRUCTURAL_KEYS
) -> list[str]:
    """`keys` (default: the structural ones; None: every key of `current`) that differ between a checkpoint's
    saved config and the current one; a key the saved config lacks is not a difference."""
    saved = tomllib.loads(saved_toml)
    if keys is None:
        keys = {section: list(values) for section, values in current.items() if isinstance(values, dict)}
    diffs = []
    for section, names in keys.items():
        for key in names:
            old, new = saved.get(section, {}).get(key), current.get(section, {}).get(key)
            if old is not None and old != new:
                diffs.append(f"{section}.{key}: checkpoint has {old!r}, this run has {new!r}")
    return diffs
