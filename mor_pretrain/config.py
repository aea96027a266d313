"""Typed job configuration: TOML file -> nested dataclasses, with `--section.key=value` overrides.

Every section is a dataclass whose fields carry a one-line docstring-style comment. Unknown keys, wrong
types and inconsistent values are refused with a message naming the key and where its value came from: the
file, or the command-line override that set it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from mor_pretrain.models.mor import ModelArgs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the source."""


class CheckpointError(ValueError):
    """A run folder or checkpoint that must not be used: damaged, incomplete, unsafe, locked by another job,
    or not this run's to overwrite."""


@dataclass
class TrainingConfig:
    steps: int = 100  # optimizer steps to run
    global_batch_size: int = 8  # sequences per optimizer step, across all data-parallel ranks
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    seq_len: int = 256  # tokens per sequence (the model sees seq_len, predicts seq_len)
    seed: int = 0  # seed for weights, data order and routing noise
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto picks cuda when available
    dtype: Literal["float32", "bfloat16"] = "bfloat16"  # compute dtype (FSDP2 mixed-precision parameters)
    deterministic: bool = False  # torch.use_deterministic_algorithms, for bit-exact resume tests
    nonfinite: Literal["skip", "stop"] = "stop"  # NaN/inf grad norm: skip the update (one host sync per
    # step) or stop at the next log step (no extra sync)
    val_interval: int = 0  # steps between validation passes; 0 = never
    val_batches: int = 8  # validation set: the first val_batches x global_batch_size windows of the val split

    def validate(self) -> None:
        for name in ("steps", "global_batch_size", "micro_batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:  # numpy's seed sequences (data order) take non-negative integers only
            raise ConfigError(f"training.seed must be >= 0, got {self.seed}")
        if self.val_interval < 0 or self.val_batches < 1:
            raise ConfigError(
                f"training.val_interval must be >= 0 and training.val_batches >= 1, "
                f"got {self.val_interval} and {self.val_batches}"
            )


@dataclass
class OptimizerConfig:
    lr: float = 3e-3  # peak learning rate (paper: 3e-3)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay for matrices
    decay_norms_and_embeddings: bool = False  # also decay norms, biases and embeddings
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"  # warmup-stable-decay (trapezoid) or cosine
    warmup_fraction: float = 0.05  # fraction of steps spent warming up
    decay_fraction: float = 0.2  # wsd: fraction of steps in the final linear decay
    min_lr_ratio: float = 0.0  # lr at the end of decay, as a fraction of peak

    def validate(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"optimizer.lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):  # AdamW: only once training starts
            raise ConfigError(f"optimizer.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ConfigError(f"optimizer.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optimizer.betas must be two values in [0, 1), got {self.betas}")
        for name in ("warmup_fraction", "decay_fraction", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"optimizer.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.warmup_fraction + self.decay_fraction > 1.0:
            raise ConfigError("optimizer.warmup_fraction + optimizer.decay_fraction must be <= 1")


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: ["data/corpus/train/*.jsonl"])  # files, globs or dirs
    weights: list[float] = field(default_factory=list)  # mixing weight per source; empty = uniform
    val_sources: list[str] = field(default_factory=lambda: ["data/corpus/val/*.jsonl"])  # held-out split
    format: Literal["auto", "text", "jsonl", "parquet", "tokens"] = "auto"  # auto: by file suffix
    text_field: str = "text"  # jsonl field / parquet column holding the text
    doc_separator: str = ""  # text files: split documents on this line; empty = one document per file
    tokenizer: str = "default"  # SentencePiece model path; "default" = mistral-common's 32k model
    vocab_multiple: int = 64  # pad the embedding size up to a multiple of this
    num_workers: int = 0  # DataLoader worker processes per rank
    lanes: int = 64  # disjoint parts per source, dealt to (rank, worker); >= ranks x workers, fixed for a run
    shuffle: bool = True  # shuffle windows within blocks of shuffle_buffer in each lane, anew each epoch
    shuffle_buffer: int = 16  # windows shuffled together per lane (a worker fills lanes x this before its first batch)

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources must name at least one file, glob or directory")
        if self.weights and len(self.weights) != len(self.sources):
            raise ConfigError(f"data.weights has {len(self.weights)} entries but data.sources has {len(self.sources)}")
        if not all(math.isfinite(w) and w > 0 for w in self.weights):
            raise ConfigError(f"data.weights must all be finite numbers > 0, got {self.weights}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        for name in ("vocab_multiple", "lanes", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ParallelismConfig:
    dp_replicate: int = 1  # replicas of the model (HSDP outer dimension)
    dp_shard: int = -1  # FSDP2 shard degree; -1 = whatever the world size leaves
    tp: int = 1  # tensor-parallel degree
    # FSDP2: free the gathered parameters after forward and gather them again for backward ("always"), keep
    # them to backward ("never"), or "auto": keep them when the whole model's gathered copy is small
    # (parallel.RESHARD_ABOVE_BYTES), trading that memory for an all-gather per unit and micro-batch.
    reshard_after_forward: Literal["auto", "always", "never"] = "auto"
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"  # FSDP2 gradient reduction (compute: training.dtype)
    activation_checkpoint: Literal["none", "full", "selective"] = "none"  # recompute policy
    compile: bool = False  # torch.compile each block (regional)

    def validate(self) -> None:
        for name in ("dp_replicate", "tp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallelism.{name} must be >= 1, got {getattr(self, name)}")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ConfigError(f"parallelism.dp_shard must be >= 1 or -1, got {self.dp_shard}")


@dataclass
class CheckpointConfig:
    folder: str = "checkpoints"  # under the run folder
    interval: int = 0  # save every N steps; 0 = only at the end
    keep_latest: int = 2  # complete checkpoints to keep
    async_save: bool = False  # write with dcp.async_save while training continues
    load_step: int = -1  # -1 = resume from the latest complete checkpoint, if any
    export_bf16: bool = True  # write weights-only bf16 at the end
    # Extra steps to save at (isoFLOP branch points); kept regardless of keep_latest, cooldowns start there.
    save_steps: list[int] = field(default_factory=list)
    # Checkpoint folder to start from when this run has none of its own (a cooldown branched from a longer
    # run): model, optimizer, data loader and train state are loaded; the lr schedule is this run's.
    init_from: str = ""
    create_seed: bool = False  # write the initial weights as step 0 and exit; any layout then starts from them
    # Save and export at the last step. False only for throwaway runs (benchmarks): nothing is kept, and a
    # relaunch trains again from the last periodic checkpoint.
    save_final: bool = True

    def validate(self) -> None:
        if self.interval < 0 or self.keep_latest < 1:
            raise ConfigError("checkpoint.interval must be >= 0 and checkpoint.keep_latest >= 1")
        if any(s < 1 for s in self.save_steps):
            raise ConfigError(f"checkpoint.save_steps must all be >= 1, got {self.save_steps}")
        if self.load_step < -1:
            raise ConfigError(f"checkpoint.load_step must be a step >= 0, or -1 for the latest; got {self.load_step}")
        if not self.folder or Path(self.folder).is_absolute() or ".." in Path(self.folder).parts:
            raise ConfigError(f"checkpoint.folder must be a folder name inside the run folder, got {self.folder!r}")


@dataclass
class MetricsConfig:
    log_interval: int = 10  # steps between log lines (the only host syncs in the loop)
    # Where scalars go: TensorBoard (<run_dir>/tb) and/or Weights & Biases (<run_dir>/wandb; WANDB_MODE=offline
    # keeps it local). A resumed run continues the same W&B run (its id is saved in the checkpoint).
    backends: list[Literal["tensorboard", "wandb"]] = field(default_factory=lambda: ["tensorboard"])
    wandb_project: str = "mor-pretrain"  # W&B project (entity and API key: W&B's own environment variables)
    peak_tflops: float = 0.0  # bf16 dense peak per device; 0 = look the device up by name

    def validate(self) -> None:
        if self.log_interval < 1:
            raise ConfigError(f"metrics.log_interval must be >= 1, got {self.log_interval}")
        if len(set(self.backends)) != len(self.backends):
            raise ConfigError(f"metrics.backends lists a backend twice: {self.backends}")


# Scalar tags of a run's logs (tb/, wandb/) that readers rely on: the trainer logs them under these names.
TRAIN_LOSS = "train/loss"
STEP_TIME = "perf/step_time_s"
TOKENS_PER_S = "perf/tokens_per_s"
MFU = "perf/mfu"
VAL_LOSS = {"causal": "val/loss_causal", "topk": "val/loss_topk"}  # by routing mode


@dataclass(frozen=True)
class RunFolder:
    """A run folder's layout: the contract between the trainer, which writes it, and every reader (evaluation,
    the isoFLOP report, the tools, scripts/sweep.sh through them).

        <run_root>/<name>/config.toml     the resolved config the run trained with
                          .lock           held by rank 0 while a job trains here
                          tb/  wandb/     TensorBoard scalars, W&B files (the tags readers use: above)
                          <checkpoint.folder>/step-<8 digits>/   DCP checkpoints (folders.py: COMPLETE)
                          export/         weights-only export of the last step
                          eval/           tools/eval.py results
    """

    path: Path
    checkpoint_folder: str = "checkpoints"

    @classmethod
    def at(cls, path: str | Path) -> RunFolder:
        """The run folder at `path`, with the checkpoint folder its saved config.toml names."""
        path = Path(path)
        folder = cls.checkpoint_folder
        config = path / "config.toml"
        if config.is_file():
            try:
                folder = tomllib.loads(config.read_text()).get("checkpoint", {}).get("folder", folder)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{config}: not TOML ({e})") from None
        return cls(path, folder)

    @property
    def config(self) -> Path:
        return self.path / "config.toml"

    @property
    def lock(self) -> Path:
        return self.path / ".lock"

    @property
    def tb(self) -> Path:
        return self.path / "tb"

    @property
    def checkpoints(self) -> Path:
        return self.path / self.checkpoint_folder

    @property
    def export(self) -> Path:
        return self.path / "export"

    @property
    def eval(self) -> Path:
        return self.path / "eval"


@dataclass
class JobConfig:
    name: str = "debug"  # run name; logs go to <run_root>/<name>
    run_root: str = "runs"  # parent folder of run folders
    model: ModelArgs = field(default_factory=ModelArgs)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.name

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.run_dir, self.checkpoint.folder)

    def validate(self) -> None:
        if not self.name or self.name in (".", "..") or "/" in self.name or "\\" in self.name:
            raise ConfigError(f"name must be a run folder name (no path separators, not empty), got {self.name!r}")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section) and not isinstance(section, type):
                try:
                    section.validate()  # type: ignore[attr-defined]
                except ValueError as e:
                    msg = str(e)
                    raise ConfigError(msg if msg.startswith(f.name) else f"{f.name}: {msg}") from None
        t = self.training
        if t.seq_len > self.model.max_seq_len:
            raise ConfigError(f"training.seq_len ({t.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        if t.global_batch_size % t.micro_batch_size:
            raise ConfigError(
                f"training.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"training.micro_batch_size ({t.micro_batch_size})"
            )


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key} must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):  # TOML's inf and nan: no option means anything by them
            raise ConfigError(f"{key} must be a finite number, got {value}")
        return float(value)
    if tp in (int, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{key} must be {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp} for {key}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"[{prefix[:-1]}]" if prefix else "the top level"
        raise ConfigError(f"unknown key {prefix}{unknown[0]} in {where}; known keys: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} must be a table [{prefix}{name}]")
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _parse_override(arg: str) -> tuple[list[str], Any]:
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"override {arg!r} must look like --section.key=value")
    key, raw = arg[2:].split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings need no quotes on the command line
    return key.split("."), value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _names_key(message: str, key: str) -> bool:
    """Whether a config error message is about `key` (dotted, as messages spell keys). A top-level key
    counts only where messages put one (their start, "unknown key ..."): "name" is also an English word."""
    if "." in key:
        return re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", message) is not None
    return re.match(rf"(unknown key )?{re.escape(key)}\b", message) is not None


def error_source(message: str, path: str | Path | None, overrides: list[str], file_alone_valid: bool = False) -> str:
    """Where the value a config error complains about came from: the command-line overrides whose keys the
    message names; if it names none, every override when the file alone validates (`file_alone_valid`),
    else the file ("defaults" without one)."""
    given: dict[str, str] = {}
    for arg in overrides:
        if arg.startswith("--") and "=" in arg:
            given[arg[2:].split("=", 1)[0]] = arg  # the last override of a key wins, as in load_config
    named = [arg for key, arg in given.items() if _names_key(message, key)]
    if not named and file_alone_valid:
        named = list(given.values())
    if named:
        return f"override{'s' if len(named) > 1 else ''} {' '.join(named)}"
    return "defaults" if path is None else str(path)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Defaults, then the TOML file, then `--section.key=value` overrides; validated. An error names the
    override that set the bad value, or the file."""
    data: dict[str, Any] = {}
    if path is not None:
        if Path(path).is_dir():
            raise ConfigError(f"config file {path} is a directory; give the path of a TOML file")
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
    from_file = copy.deepcopy(data)
    for arg in overrides or []:
        keys, value = _parse_override(arg)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r}: {k} is not a section")
        node[keys[-1]] = value
    try:
        cfg = _build(JobConfig, data, "")
        cfg.validate()
    except ConfigError as e:
        file_alone_valid = False
        if overrides:
            try:
                _build(JobConfig, from_file, "").validate()
                file_alone_valid = True
            except ValueError:
                pass
        raise ConfigError(f"{error_source(str(e), path, overrides or [], file_alone_valid)}: {e}") from None
    return cfg


def dump_toml(cfg: Any) -> str:
    """Write a config back as TOML (the resolved config stored in each run folder). tomli-w writes it, so
    every value load_config accepts (a string with control characters included) reads back equal; None
    values (no TOML form) are left out, as load_config's defaults fill them."""

    def drop_none(d: dict[str, Any]) -> dict[str, Any]:
        return {k: drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}

    return tomli_w.dumps(drop_none(config_to_dict(cfg)))
