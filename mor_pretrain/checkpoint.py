"""Distributed checkpoints with torch.distributed.checkpoint (DCP): atomic, pruned, async, reshardable.

Layout: <run_dir>/<checkpoint.folder>/step-<8 digits>/ holds the DCP files, `config.toml` (the resolved job
config), a copy of the tokenizer file the config names (`tokenizer.model`; none for the built-in 'default'),
and, once every rank has finished writing, `COMPLETE`: a JSON manifest with the size and XXH3 hash of every
other file. Only complete checkpoints are loaded or counted when pruning, so a crash mid-save leaves the
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
import contextlib
import dataclasses
import fcntl
import io
import json
import logging
import math
import mmap
import os
import pickle
import random
import re
import shutil
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm

from mor_pretrain.config import CheckpointConfig, JobConfig, RunFolder, load_config
from mor_pretrain.distributed import host_group, rank, world_size
from mor_pretrain.export import (
    TOKENIZER_RULE,
    atomic_write,
    atomic_write_text,
    check_finite,
    check_model_sizes,
    folder_file,
    io_cause,
)
from mor_pretrain.models import ModelArgs, MoRModel
from mor_pretrain.models.mor import STRUCTURAL_FIELDS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

logger = logging.getLogger(__name__)
COMPLETE = "COMPLETE"
MANIFEST_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded: damaged, incomplete, unsafe, or not this run's to overwrite."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def complete_steps(root: Path, log_skipped: bool = False) -> list[int]:
    """Steps of the complete checkpoints under root, ascending (optionally logging the folders skipped)."""
    if not root.is_dir():
        return []
    steps = []
    for d in root.glob("step-*"):
        if not d.name[5:].isdigit():
            reason = "its name is not step-<digits>"
        elif not (d / COMPLETE).is_file():
            reason = f"no {COMPLETE} marker: its save never finished"
        else:
            steps.append(int(d.name[5:]))
            continue
        if log_skipped:
            logger.warning("skipping checkpoint folder %s: %s", d, reason)
    return sorted(steps)


def _digest(path: Path) -> str:
    """XXH3-64 of the file, read through mmap: about 25 GiB/s from the page cache, so a save barely notices."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_64(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return xxhash.xxh3_64(m).hexdigest()


def mark_complete(path: Path, step: int) -> None:
    """Write `COMPLETE`: the manifest (size and XXH3 hash) of every file now in the checkpoint folder.

    The hash finds torn writes and flipped bytes; it is no defence against a forger (the loaders' refusal
    to unpickle is). Written atomically: a crash leaves no half marker."""
    files = {
        f.name: {"bytes": f.stat().st_size, "xxh3": _digest(f)}
        for f in sorted(path.iterdir())
        if f.is_file() and f.name != COMPLETE and not f.name.startswith(COMPLETE)
    }
    manifest = {"version": MANIFEST_VERSION, "step": step, "files": files}
    atomic_write_text(path / COMPLETE, json.dumps(manifest, indent=1) + "\n")


def read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The per-file sizes and checksums recorded in `path/COMPLETE`."""
    try:
        marker = folder_file(path, COMPLETE)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if not marker.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE} marker): its save never finished")
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
        if manifest["version"] != MANIFEST_VERSION or not isinstance(files, dict):
            raise ValueError(f"manifest version {manifest['version']!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{marker} is not a checkpoint manifest ({e}); it was written by an older version or damaged, "
            f"so its files cannot be verified"
        ) from None
    return files


def verify_files(path: Path, names: list[str] | None = None) -> str | None:
    """The first problem with the listed files (default: all) of a checkpoint, or None if they verify."""
    try:
        files = read_manifest(path)
    except CheckpointError as e:
        return str(e)
    inside = path.resolve()
    for name in sorted(files) if names is None else names:
        f, want = path / name, files[name]
        if f.resolve().parent != inside:  # a link out of the folder, or a name with a path in it
            return f"{f} resolves to {f.resolve()}, outside the checkpoint folder: refused unread"
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{f} has {size} bytes, the manifest says {want['bytes']} (truncated or damaged)"
        if _digest(f) != want["xxh3"]:
            return f"{f} does not match its checksum (damaged)"
    return None


def verify_checkpoint(path: Path) -> None:
    """Raise if any file of the checkpoint is missing, truncated or damaged (one process, all files)."""
    problem = verify_files(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}{_last_good_hint(path)}")


def _last_good_hint(path: Path) -> str:
    root = path.parent
    here = int(path.name[5:]) if path.name[5:].isdigit() else None
    for step in reversed(complete_steps(root)):
        if here is not None and step < here and verify_files(step_dir(root, step)) is None:
            return (
                f". The last checkpoint that verifies is {step_dir(root, step)}: move the damaged folder out "
                f"of {root} to resume from it"
            )
    return ". No earlier checkpoint in its folder verifies"


# What DCP's .metadata pickle may contain (torch 2.11 to 2.14): its dataclasses, torch.Size, dtypes, layout.
_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "ChunkStorageMetadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")


def check_dcp_metadata(path: Path) -> None:
    """Refuse a `.metadata` that holds anything but DCP metadata, or whose storage entries name a file
    outside the folder, before DCP unpickles it."""
    meta = path / ".metadata"
    try:
        metadata = _MetadataUnpickler(io.BytesIO(meta.read_bytes())).load()
        storage = getattr(metadata, "storage_data", None) or {}
        files = {getattr(info, "relative_path", None) for info in storage.values()}
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a DCP checkpoint: {meta} is missing") from None
    except Exception as e:  # truncated, garbled or hostile: none of it is loaded
        raise CheckpointError(f"refusing to load {meta}: {type(e).__name__}: {e}") from None
    for name in files:
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"refusing to load {meta}: a storage entry names {name!r}, not a file of {path}")


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner unpickles the non-tensor items of a state dict with weights_only=False, so a
    forged `.distcp` could run code. Ours reads them with weights_only=True (plain numbers, strings,
    containers and tensors only) and hands DCP a re-serialized copy of what it read. `folder` (the
    checkpoint's) makes a refusal name the file in full."""

    def __init__(self, folder: Path | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.folder = folder

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            info = self.metadata.storage_data.get(read_item.storage_index) if self.metadata else None
            where = getattr(info, "relative_path", "?")
            if self.folder is not None:
                where = str(self.folder / where)
            # torch's text is a page of advice (with terminal escapes); the unpickler's own finding is the cause.
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
            found = re.search(r"WeightsUnpickler error: (.*?)(?:\.\s|\.?$)", text, re.MULTILINE)
            first = found.group(1) if found else (text.splitlines()[0] if text else "")
            raise CheckpointError(
                f"{where}: item {read_item.dest_index.fqn!r} is not plain data, refused unread "
                f"({type(e).__name__}: {first})"
            ) from None
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


def root_failure(e: BaseException) -> BaseException:
    """The error behind DCP's wrapper (a CheckpointException holds each failed rank's exception and
    traceback; its text is all of them, many lines): the lowest failed rank's own exception."""
    for _ in range(8):  # nested wrappers, never a cycle
        failures = getattr(e, "failures", None) if isinstance(e, dcp.CheckpointException) else None
        if not failures:
            break
        found = failures[min(failures)]
        e = found[0] if isinstance(found, tuple) else found
    return e


def one_line(e: BaseException) -> str:
    """`Type: first line of the message` of the error behind any DCP wrapper."""
    root = root_failure(e)
    text = str(root).strip()
    return f"{type(root).__name__}: {text.splitlines()[0]}" if text else type(root).__name__


def read_failure(path: Path, e: BaseException) -> CheckpointError:
    """One line for a failed DCP read of `path`: our own refusal as it is (it names the file and the
    item), anything else as the underlying error's first line."""
    root = root_failure(e)
    if isinstance(root, CheckpointError):
        return CheckpointError(str(root))
    return CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {one_line(root)}")


def dcp_load(state_dict: dict[str, Any], path: Path) -> None:
    """dcp.load through SafeLoadPlanner over the host group; any failure is a one-line CheckpointError."""
    try:
        planner = SafeLoadPlanner(folder=path)
        dcp.load(state_dict, checkpoint_id=str(path), planner=planner, process_group=host_group())
    except (Exception, dcp.CheckpointException) as e:  # DCP wraps per-rank errors in a BaseException
        raise read_failure(path, e) from None


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
        so the checkpoint is read offline with its own tokenizer (TOKENIZER_RULE); the built-in 'default'
        needs no copy."""
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
                f"{_last_good_hint(path)}"
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
            raise CheckpointError(f"checkpoint {path} is damaged: {found[0]}{_last_good_hint(path)}")

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


# ---------------------------------------------------------------------------------------------------------------
# A checkpoint's model weights, read whole in one process (conversion, evaluation)

_READ_BYTES = 256 * 2**20  # tensors read per DCP call: bounds memory spikes and drives the progress bar


@contextlib.contextmanager
def without_process_group() -> Iterator[None]:
    """Silence DCP's warning about running without a process group: that is the point here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def expected_state_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Names and shapes of MoRModel(args).state_dict(), built on the meta device (no memory)."""
    with torch.device("meta"):
        model = MoRModel(args)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# DCP <-> export


def _dcp_model_entries(ckpt: Path) -> dict[str, TensorStorageMetadata]:
    """The tensors under the top-level "model" key of a complete DCP checkpoint, by model state-dict name."""
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {ckpt}")
    if not (ckpt / ".metadata").is_file():
        raise ValueError(f"{ckpt} is not a DCP checkpoint: {ckpt / '.metadata'} is missing")
    if not (ckpt / COMPLETE).is_file():
        raise ValueError(f"{ckpt} is incomplete (no {COMPLETE} marker): its save never finished")
    verify_checkpoint(ckpt)
    check_dcp_metadata(ckpt)  # DCP unpickles it: admit only what DCP metadata is made of
    meta = dcp.FileSystemReader(str(ckpt)).read_metadata()
    entries = {
        k[len("model.") :]: v
        for k, v in meta.state_dict_metadata.items()
        if k.startswith("model.") and isinstance(v, TensorStorageMetadata)
    }
    if not entries:
        raise ValueError(f"{ckpt} holds no tensors under the top-level 'model' key")
    return entries


def _find_run_config(ckpt: Path) -> Path:
    for cand in (ckpt / "config.toml", ckpt.parent.parent / "config.toml"):
        if cand.is_file():
            return folder_file(cand.parent, cand.name)  # a link out of its folder is refused
    raise FileNotFoundError(f"no config.toml in {ckpt} or its run folder {ckpt.parent.parent}; pass --config")


def checkpoint_tokenizer_name(spec: str) -> str:
    """The name of a checkpoint's own copy of the tokenizer file `spec` names."""
    return "tokenizer.json" if spec.endswith(".json") else "tokenizer.model"


def checkpoint_tokenizer(ckpt: Path, spec: str, cfg_path: Path) -> str:
    """The tokenizer of a checkpoint read offline, whose config.toml may come from anyone: the built-in
    'default', or the checkpoint's own copy (saves write one), as a path checked to lie inside the folder.
    The path the config names is never opened: it may point anywhere on this machine."""
    if spec == "default":
        return spec
    copy = ckpt / checkpoint_tokenizer_name(spec)
    if not copy.is_file():
        raise CheckpointError(
            f"{cfg_path} names the tokenizer {spec!r}, and {ckpt} holds no copy of it: {TOKENIZER_RULE}. "
            f"Copy the tokenizer to {copy}, or (to-export) pass your own job config with --config"
        )
    return str(folder_file(ckpt, copy.name).resolve())


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], what: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k}: config {v}, found {found[k]}" for k, v in expected.items() if found.get(k, v) != v]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{what} does not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shapes {wrong[:5]}"
        )


def load_dcp_model(
    ckpt: str | Path, config: str | Path | None = None, progress: bool = True
) -> tuple[ModelArgs, dict[str, torch.Tensor], dict[str, Any]]:
    """Read the model weights of a complete DCP checkpoint into full CPU tensors, without a process group.

    `config` is the job TOML (default: the checkpoint's own config.toml, else the run folder's). A
    model.vocab_size of 0 is taken from the stored embedding. Returns (args, state_dict, extra) where extra
    holds the tokenizer spec for the export config: the `config` you pass names any path, but a config found
    with the checkpoint only 'default' or the checkpoint's own copy (checkpoint_tokenizer). Sizes the weights
    do not pin are checked before anything is allocated, and weights holding NaN or inf are refused.
    """
    ckpt = Path(ckpt)
    entries = _dcp_model_entries(ckpt)
    cfg_path = Path(config) if config is not None else _find_run_config(ckpt)
    cfg = load_config(cfg_path)
    args = cfg.model
    if args.vocab_size == 0 and "tok_embeddings.weight" in entries:
        args = dataclasses.replace(args, vocab_size=entries["tok_embeddings.weight"].size[0])
    found = {k: tuple(v.size) for k, v in entries.items()}
    check_shapes(expected_state_shapes(args), found, f"checkpoint {ckpt}")
    weight_bytes = sum(math.prod(v.size) * v.properties.dtype.itemsize for v in entries.values())
    check_model_sizes(args, weight_bytes, str(cfg_path))
    # A job config the user passes is theirs, like a training config; one found with the checkpoint is not.
    spec = cfg.data.tokenizer if config is not None else checkpoint_tokenizer(ckpt, cfg.data.tokenizer, cfg_path)
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in entries.items()}
    bar = tqdm(
        total=sum(t.numel() * t.element_size() for t in state.values()),
        unit="B",
        unit_scale=True,
        desc=f"read {ckpt.name}",
        disable=not progress,
    )
    with bar:  # closed before an error is printed, so the error starts a line of its own
        for chunk in _chunks(state, _READ_BYTES):
            try:
                with without_process_group():
                    dcp.load({"model": chunk}, checkpoint_id=str(ckpt), planner=SafeLoadPlanner(folder=ckpt))
            except (Exception, dcp.CheckpointException) as e:  # DCP wraps per-rank errors in a BaseException
                raise read_failure(ckpt, e) from None
            check_finite(chunk, f"checkpoint {ckpt}")
            bar.update(sum(t.numel() * t.element_size() for t in chunk.values()))
    extra = {"tokenizer": spec}
    if spec != cfg.data.tokenizer:
        extra["tokenizer_source"] = cfg.data.tokenizer
    return args, state, extra


def _chunks(state: dict[str, torch.Tensor], max_bytes: int) -> Iterable[dict[str, torch.Tensor]]:
    chunk: dict[str, torch.Tensor] = {}
    size = 0
    for k, t in state.items():
        chunk[k] = t
        size += t.numel() * t.element_size()
        if size >= max_bytes:
            yield chunk
            chunk, size = {}, 0
    if chunk:
        yield chunk
