"""Weights-only exports: a folder with `model.safetensors`, a self-describing `config.json` and its tokenizer.

Loading needs no torch.distributed and no process group. The config carries every ModelArgs field
(Nr, sharing, router, capacities, KV mode, ...) plus the tokenizer spec, so an export fully describes the
model it holds. The tokenizer is copied beside the weights (`tokenizer.model` for SentencePiece,
`tokenizer.json` for byte-level BPE) with a `tokenizer_config.json`, so the folder moves as a whole and
transformers' `AutoTokenizer.from_pretrained(folder)` reads it: bos/eos/pad as trained, nothing added to
encoded text (the training data has no bos; eos only ends documents).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mor_pretrain.config import RunFolder, _build
from mor_pretrain.models import ModelArgs, MoRModel

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
    from mor_pretrain.data.tokenizer import default_tokenizer_path

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
    import sentencepiece as spm

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
    (export.atomic_write), config.json last: it records the `export_id` that the weights' header also
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


def open_model(
    path: str | Path, progress: bool = True
) -> tuple[ModelArgs, dict[str, torch.Tensor], dict[str, Any], Path]:
    """Any model folder as (args, fp32 state dict, its config, the folder read): an export (also what a GGUF
    import writes), a DCP checkpoint, a run folder (its export, else its latest complete checkpoint), or a
    transformers folder written by to-hf (Llama or MoR remote code). The config's "tokenizer" names the
    tokenizer, relative to the folder read when that folder holds a config.json; for a DCP checkpoint it is
    'default' or the checkpoint's own copy, as a checked absolute path (checkpoint.checkpoint_tokenizer).

    Whatever the format, a file that resolves outside the folder, sizes the weights do not back
    (check_model_sizes) and weights holding NaN or inf (check_finite) are refused with one line."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model folder not found: {p}")
    if (p / ".metadata").is_file():
        from mor_pretrain.checkpoint import load_dcp_model

        args, state, extra = load_dcp_model(p, progress=progress)
        return args, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, extra, p
    config = p / "config.json"
    run = RunFolder.at(p)
    if run.config.is_file() and not config.is_file():
        from mor_pretrain.checkpoint import complete_steps, step_dir

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
        from mor_pretrain.convert import load_hf_llama

        args, state = load_hf_llama(p)
    elif kind == "mor" and isinstance(meta.get("mor"), dict):
        from mor_pretrain.checkpoint import check_shapes, expected_state_shapes

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
