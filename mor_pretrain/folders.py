"""Model folders, written and read in one place: weights-only exports, transformers Llama folders, and DCP
checkpoint folders read offline; `open_model` opens any of them. Nothing here needs a process group.

- An export holds `model.safetensors`, a self-describing `config.json` (every ModelArgs field plus the
  tokenizer spec) and its tokenizer (`tokenizer.model` for SentencePiece, `tokenizer.json` for byte-level
  BPE) with a `tokenizer_config.json`, so the folder moves as a whole and transformers'
  `AutoTokenizer.from_pretrained(folder)` reads it: bos/eos/pad as trained, nothing added to encoded text
  (the training data has no bos; eos only ends documents).
- A DCP checkpoint is <checkpoint.folder>/step-<8 digits>/, complete once its `COMPLETE` manifest (size and
  XXH3 hash of every other file) is written. Every file is verified against it, and DCP's pickled
  `.metadata` admitted only as DCP metadata, before anything is read. Saving and resuming during training
  (checkpoint.py) build on this.

Whatever the format, a file that resolves outside its folder, sizes the weights do not back and weights
holding NaN or inf are refused with one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import mmap
import os
import pickle
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
import torch.distributed.checkpoint as dcp
import xxhash
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem
from tqdm import tqdm

from mor_pretrain.config import CheckpointError, RunFolder, _build, load_config
from mor_pretrain.data.tokenizer import default_tokenizer_path
from mor_pretrain.models import ModelArgs, MoRModel

logger = logging.getLogger(__name__)
FORMAT = "mor-pretrain/v1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the --dtype names of every tool
TOKENIZER_CONFIG = "tokenizer_config.json"
# Specials of a byte-level BPE without a tokenizer_config.json (SmolLM2 exports written before there was one).
BPE_SPECIALS = {"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
# The rule for the tokenizer of a folder read offline (export, transformers folder, checkpoint), said in errors.
TOKENIZER_RULE = (
    "a model folder's tokenizer must be a file of that folder (tokenizer.model or tokenizer.json) or the "
    "built-in 'default'"
)
# Sizes a folder's config may give that its weights do not pin: the RoPE table (max_seq_len x head_dim fp32)
# is allocated from max_seq_len alone. It may not outgrow the weights (or ROPE_FLOOR_BYTES, for tiny models
# with a long context), nor MAX_SEQ_LEN positions.
MAX_SEQ_LEN = 2**24
ROPE_FLOOR_BYTES = 256 * 2**20
COMPLETE = "COMPLETE"
MANIFEST_VERSION = 1
_READ_BYTES = 256 * 2**20  # tensors read per DCP call: bounds memory spikes and drives the progress bar


class ExportError(OSError):
    """A model folder that could not be written (full disk, no permission): one line naming it and the cause."""


def folder_file(base: str | Path, name: str) -> Path:
    """`base / name`, refused unless it resolves (symlinks followed) to a path inside `base`: a model folder
    from anyone must not make a reader open a file elsewhere on the machine."""
    base = Path(base)
    path = base / name
    inside = base.resolve()
    target = path.resolve()
    if target != inside and not target.is_relative_to(inside):
        raise ValueError(f"refusing {path}: it resolves to {target}, outside its folder {base}")
    return path


def check_finite(state: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse weights holding NaN or inf, naming the first such tensor: no model folder, of any format, is
    loaded or exported with them."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: tensor {name} holds NaN or inf; refusing to use these weights")


def validate_args(args: Any, where: str) -> None:
    """ModelArgs read from a folder's config must validate (n_heads 0 would divide by zero, ...)."""
    try:
        args.validate()
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise ValueError(f"{where}: {e}") from None


def check_model_sizes(args: Any, weight_bytes: int, where: str) -> None:
    """Sizes read from a folder's config against sane bounds and the weights, before anything is allocated:
    the config must validate, and its RoPE table may not outgrow the weights (MAX_SEQ_LEN, ROPE_FLOOR_BYTES)."""
    validate_args(args, where)
    rope = args.max_seq_len * args.head_dim * 4
    if args.max_seq_len > MAX_SEQ_LEN or rope > max(weight_bytes, ROPE_FLOOR_BYTES):
        gib = 2**30
        raise ValueError(
            f"{where}: max_seq_len {args.max_seq_len} would need a {rope / gib:.2f} GiB RoPE table for weights of "
            f"{weight_bytes / gib:.2f} GiB (at most {MAX_SEQ_LEN} positions, and a table no larger than the "
            f"weights or {ROPE_FLOOR_BYTES // 2**20} MiB); refusing to allocate it"
        )


def io_cause(e: BaseException) -> str:
    """The cause of a failed write in words ("No space left on device"), whatever raised it: an OSError, or
    safetensors' own error type, which carries the OS error number in its text."""
    if isinstance(e, OSError) and e.errno:
        return e.strerror or os.strerror(e.errno)
    found = re.search(r"\(os error (\d+)\)", str(e))
    if found:
        return os.strerror(int(found.group(1)))
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write `path` through `write(tmp)` on a temporary file beside it, fsync it, give it the umask's mode and
    rename it into place: a reader (or a relaunch after a crash) sees the old file or the whole new one."""
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(text.encode()))


@contextlib.contextmanager
def writing(out: Path) -> Iterator[None]:
    """Turn a failed write into one ExportError naming the folder and the cause (a full disk, ...)."""
    try:
        yield
    except ExportError:
        raise
    except (OSError, SafetensorError) as e:
        # The file written: a copy's destination is filename2 (its source is filename); no temporary name.
        target = (e.filename2 or e.filename) if isinstance(e, OSError) else None
        what = f" (writing {Path(str(target)).name.removesuffix('.tmp')})" if target else ""
        raise ExportError(f"cannot write {out}: {io_cause(e)}{what}") from None


def tokenizer_file(spec: str, base: str | Path | None = None) -> Path:
    """The file a tokenizer spec names: "default" (the packaged SentencePiece model), or a path. With `base`
    (a model folder read offline, whose config may come from anyone) the spec must name a file of that folder,
    and that file must not resolve outside it: a config that points elsewhere (/etc/passwd, ../..) or a
    symlink out of the folder is refused, so it reads nothing outside. A training config's own path (no
    `base`) is taken as it is."""
    if spec == "default":
        return default_tokenizer_path()
    path = Path(spec)
    if base is not None:
        if path.name != spec or spec in (".", ".."):
            raise ValueError(f"{Path(base) / 'config.json'} names the tokenizer {spec!r}: {TOKENIZER_RULE}")
        path = folder_file(base, spec)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return path


def tokenizer_specials(path: Path) -> dict[str, str]:
    """bos/eos/pad/unk token strings of a tokenizer file: a SentencePiece model's own pieces (pad falls back
    to eos, as in data.tokenizer), a tokenizer.json's from the tokenizer_config.json beside it."""
    if path.suffix == ".json":
        cfg = folder_file(path.parent, TOKENIZER_CONFIG)
        found = json.loads(cfg.read_text()) if cfg.is_file() else BPE_SPECIALS
        keys = ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template")
        return {k: found[k] for k in keys if isinstance(found.get(k), str)}
    sp = spm.SentencePieceProcessor(model_file=str(path))
    ids = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id(), "pad_token": sp.pad_id()}
    if ids["pad_token"] < 0:
        ids["pad_token"] = ids["eos_token"]
    return {k: sp.id_to_piece(i) for k, i in ids.items() if i >= 0}


def save_tokenizer(
    out: str | Path,
    spec: str,
    base: str | Path | None = None,
    specials: dict[str, str] | None = None,
    max_len: int | None = None,
) -> str:
    """Copy the tokenizer `spec` names into folder `out` with its tokenizer_config.json; returns the name to
    record as the folder's tokenizer spec. `specials` overrides the bos/eos/pad/unk found in the source."""
    src = tokenizer_file(spec, base)
    out = Path(out)
    dst = out / ("tokenizer.json" if src.suffix == ".json" else "tokenizer.model")
    found = {**tokenizer_specials(src), **(specials or {})}
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **found}
    cfg.update(add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False)
    if max_len:
        cfg["model_max_length"] = max_len
    with writing(out):
        if src.resolve() != dst.resolve():
            atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
        atomic_write_text(out / TOKENIZER_CONFIG, json.dumps(cfg, indent=2) + "\n")
    return dst.name


def save_exported(
    path: str | Path,
    args: ModelArgs,
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype | None = torch.bfloat16,
    extra: dict[str, Any] | None = None,
    tokenizer_base: str | Path | None = None,
) -> Path:
    """Write `state_dict` (MoRModel names, full unsharded tensors), its config and the tokenizer that
    extra["tokenizer"] names (resolved against `tokenizer_base` when relative) to folder `path`.

    Weights holding NaN or inf are refused before anything is written. Every file is written atomically
    (atomic_write), config.json last: it records the `export_id` that the weights' header also
    carries, so a folder a crash left between the two is seen as incomplete (export_problem), never read as
    whole. A failed write (full disk, ...) is one ExportError naming the folder and the cause."""
    out = Path(path)
    check_finite(state_dict, f"the weights to export to {out}")
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    if extra.get("tokenizer"):
        spec = extra["tokenizer"]
        extra["tokenizer"] = save_tokenizer(out, spec, tokenizer_base, max_len=args.max_seq_len)
        if extra["tokenizer"] != spec:
            extra.setdefault("tokenizer_source", spec)
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().cpu()
        for k, v in state_dict.items()
    }
    export_id = uuid.uuid4().hex
    meta = {"format": FORMAT, "export_id": export_id, "model": dataclasses.asdict(args), **extra}
    header = {"format": FORMAT, "export_id": export_id}
    with writing(out):
        atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=header))
        atomic_write_text(out / "config.json", json.dumps(meta, indent=2) + "\n")
    return out


def _umask() -> int:
    """The process's umask. Reading it means setting it, so this runs once, at import, before any thread
    (an async checkpoint writer) could create a file under the temporary value."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _umask()


def make_readable(path: Path) -> None:
    """Give a file the mode a new file gets under the umask (0644 under 022): safetensors writes 0600,
    which others on a shared cluster cannot read."""
    path.chmod(0o666 & ~_UMASK)


def read_export_config(path: str | Path) -> dict[str, Any]:
    cfg_path = folder_file(path, "config.json")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path} is not an export folder: {cfg_path} is missing")
    try:
        meta = json.loads(cfg_path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise ValueError(f"{cfg_path} is not an export config (a JSON object with a 'model' object)")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta


def load_exported(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[MoRModel, dict[str, Any]]:
    """Build the model an export describes and load its weights. Returns (model, config dict)."""
    meta = read_export_config(path)
    cfg_path = Path(path) / "config.json"
    try:
        args = _build(ModelArgs, meta["model"], "model.")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    weights = folder_file(path, "model.safetensors")
    if not weights.is_file():
        raise FileNotFoundError(f"{path} is not a complete export: {weights} is missing")
    validate_args(args, str(cfg_path))
    with torch.device("meta"):
        model = MoRModel(args)
    # The config's shapes against the file's header before anything is allocated: a config.json with
    # huge sizes must not try to allocate them.
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(str(weights), framework="pt") as f:
            header = f.metadata() or {}
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (no __iter__)
    except Exception as e:  # safetensors raises its own (non-OSError) type for truncated files
        raise ValueError(f"cannot read {weights}: {e}") from None
    if header.get("export_id") != meta.get("export_id"):
        raise ValueError(
            f"{weights} is not the file {cfg_path} describes (their export_id differs): a write of this export "
            f"was interrupted; write it again"
        )
    if found != expected:
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        wrong = [f"{k}: config {v}, file {found[k]}" for k, v in expected.items() if found.get(k, v) != v]
        raise ValueError(
            f"{weights} does not match {cfg_path}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
        )
    check_model_sizes(args, weights.stat().st_size, str(cfg_path))  # what no weight pins: the RoPE table
    try:
        state = load_file(str(weights), device=str(device))
    except Exception as e:  # a header that parses over truncated tensor data
        raise ValueError(f"cannot read {weights}: {e}") from None
    check_finite(state, str(weights))
    model.to_empty(device=device)
    model.init_weights()  # fills non-persistent buffers (RoPE table)
    model.load_state_dict(state)
    return model.to(dtype), meta


# ---------------------------------------------------------------------------------------------------------------
# transformers Llama folders (read; convert.to_hf_llama writes the layout)

HF_BLOCK = {  # our block tensor names -> a Llama layer's
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}


def hf_llama_args(config: dict[str, Any]) -> ModelArgs:
    """The vanilla ModelArgs an HF Llama config dict describes."""
    if config.get("model_type") != "llama":
        raise ValueError(f"expected an HF Llama config, got model_type={config.get('model_type')!r}")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        raise ValueError(f"RoPE scaling is not supported: {rope or config.get('rope_scaling')}")
    d, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim", d // heads) != d // heads:
        raise ValueError(f"head_dim {config['head_dim']} != hidden_size / num_attention_heads = {d // heads}")
    return ModelArgs(
        vocab_size=config["vocab_size"],
        d_model=d,
        n_layers=config["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads", heads),
        d_ffn=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        norm_eps=config.get("rms_norm_eps", 1e-5),
        tie_embeddings=config.get("tie_word_embeddings", False),
        num_recursions=1,
        sharing="cycle",
        router="none",
    )


def from_hf_llama(config: dict[str, Any], hf: dict[str, torch.Tensor]) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """A vanilla ModelArgs and state dict from an HF Llama config dict and its tensors."""
    args = hf_llama_args(config)
    state = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    for i in range(args.n_layers):
        for ours, theirs in HF_BLOCK.items():
            state[f"stack.layers.{i}.{ours}"] = hf[f"model.layers.{i}.{theirs}"]
    if not args.tie_embeddings:
        state["output.weight"] = hf["lm_head.weight"]
    state["stack.depth_bias"] = torch.zeros(0)
    return args, state


def load_hf_llama(path: str | Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Read an HF Llama folder (config.json + *.safetensors) into a vanilla ModelArgs and state dict."""
    p = Path(path)
    files = [folder_file(p, f.name) for f in sorted(p.glob("*.safetensors"))]  # none may lead outside
    config = folder_file(p, "config.json")
    if not config.is_file() or not files:
        raise FileNotFoundError(f"{p} is not an HF checkpoint folder (config.json + *.safetensors)")
    try:
        meta = json.loads(config.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{config} is not valid JSON: {e}") from None
    hf: dict[str, torch.Tensor] = {}
    try:
        # The config's sizes against the files before anything is built from them.
        args = hf_llama_args(meta) if isinstance(meta, dict) else hf_llama_args({})
        check_model_sizes(args, sum(f.stat().st_size for f in files), str(config))
        names: set[str] = set()
        for f in files:
            with safe_open(str(f), framework="pt") as opened:
                names.update(opened.keys())
        if args.n_layers * len(HF_BLOCK) > len(names):
            raise ValueError(f"{config} has {args.n_layers} layers; the weights hold {len(names)} tensors in all")
        for f in files:
            hf.update(load_file(str(f)))
        args, state = from_hf_llama(meta, hf)
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise ValueError(f"{p}: config.json and the weights do not describe one Llama model ({e!r})") from None
    except SafetensorError as e:  # a truncated or garbled file
        raise ValueError(f"cannot read the weights of {p}: {e}") from None
    check_shapes(expected_state_shapes(args), {k: tuple(v.shape) for k, v in state.items()}, f"folder {p}")
    return args, state


# ---------------------------------------------------------------------------------------------------------------
# DCP checkpoint folders: layout, manifest, safe reads


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
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}{last_good_hint(path)}")


def last_good_hint(path: Path) -> str:
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


# ---------------------------------------------------------------------------------------------------------------
# Any model folder


def open_model(
    path: str | Path, progress: bool = True
) -> tuple[ModelArgs, dict[str, torch.Tensor], dict[str, Any], Path]:
    """Any model folder as (args, fp32 state dict, its config, the folder read): an export (also what a GGUF
    import writes), a DCP checkpoint, a run folder (its export, else its latest complete checkpoint), or a
    transformers folder written by to-hf (Llama or MoR remote code). The config's "tokenizer" names the
    tokenizer, relative to the folder read when that folder holds a config.json; for a DCP checkpoint it is
    'default' or the checkpoint's own copy, as a checked absolute path (checkpoint_tokenizer).

    Whatever the format, a file that resolves outside the folder, sizes the weights do not back
    (check_model_sizes) and weights holding NaN or inf (check_finite) are refused with one line."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model folder not found: {p}")
    if (p / ".metadata").is_file():
        args, state, extra = load_dcp_model(p, progress=progress)
        return args, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, extra, p
    config = p / "config.json"
    run = RunFolder.at(p)
    if run.config.is_file() and not config.is_file():
        if (run.export / "config.json").is_file():
            return open_model(run.export, progress)
        steps = complete_steps(run.checkpoints)
        if not steps:
            raise FileNotFoundError(f"run folder {p} has no export and no complete checkpoint")
        return open_model(step_dir(run.checkpoints, steps[-1]), progress)
    if not config.is_file():
        raise FileNotFoundError(
            f"{p} is not a model folder: no config.json (export, transformers), .metadata (DCP checkpoint) "
            "or config.toml (run folder)"
        )
    folder_file(p, "config.json")
    try:
        meta = json.loads(config.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{config} is not valid JSON: {e}") from None
    if isinstance(meta, dict) and meta.get("format") == FORMAT:
        model, meta = load_exported(p)
        return model.args, model.state_dict(), meta, p
    kind = meta.get("model_type") if isinstance(meta, dict) else None
    if kind == "llama":
        args, state = load_hf_llama(p)
    elif kind == "mor" and isinstance(meta.get("mor"), dict):
        try:
            args = _build(ModelArgs, meta["mor"], "mor.")
        except (TypeError, ValueError) as e:
            raise ValueError(f"{config}: {e}") from None
        files = [folder_file(p, f.name) for f in sorted(p.glob("*.safetensors"))]
        if not files:
            raise FileNotFoundError(f"{p} holds no *.safetensors weights")
        check_model_sizes(args, sum(f.stat().st_size for f in files), str(config))
        state = {}
        for f in files:
            try:
                tensors = load_file(str(f))
            except Exception as e:  # safetensors' own error type for a truncated or garbled file
                raise ValueError(f"cannot read {f}: {e}") from None
            state.update({k.removeprefix("model."): v.float() for k, v in tensors.items()})
        check_shapes(expected_state_shapes(args), {k: tuple(v.shape) for k, v in state.items()}, f"folder {p}")
    else:
        raise ValueError(f"{config}: neither an export ({FORMAT}) nor a transformers Llama or MoR folder")
    check_finite(state, str(p))
    tokenizer = next((name for name in ("tokenizer.model", "tokenizer.json") if (p / name).is_file()), "")
    if tokenizer:
        tokenizer_file(tokenizer, p)  # a symlink out of the folder is refused here, before anyone opens it
    return args, state, {"tokenizer": tokenizer}, p


def export_problem(path: str | Path) -> str | None:
    """Why the export folder `path` is missing or incomplete (None if it is whole): its config.json must
    parse, its weights' header must carry the same export_id (a crash between writing the two leaves them
    different) and its tokenizer must be there. Cheap: headers only, no weights are read."""
    p = Path(path)
    try:
        meta = read_export_config(p)
        weights = folder_file(p, "model.safetensors")
        if not weights.is_file():
            return f"{weights} is missing"
        with safe_open(str(weights), framework="pt") as f:
            header = f.metadata() or {}
        if header.get("export_id") != meta.get("export_id"):
            return f"{weights} is not the file {p / 'config.json'} describes (an interrupted write)"
        if meta.get("tokenizer"):
            tokenizer_file(str(meta["tokenizer"]), p)
    except (ValueError, OSError, SafetensorError) as e:
        return str(e)
    return None
