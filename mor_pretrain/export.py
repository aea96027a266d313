"""Weights-only exports: a folder with `model.safetensors`, a self-describing `config.json` and its tokenizer.

Loading needs no torch.distributed and no process group. The config carries every ModelArgs field
(Nr, sharing, router, capacities, KV mode, ...) plus the tokenizer spec, so an export fully describes the
model it holds. The tokenizer is copied beside the weights (`tokenizer.model` for SentencePiece,
`tokenizer.json` for byte-level BPE) with a `tokenizer_config.json`, so the folder moves as a whole and
transformers' `AutoTokenizer.from_pretrained(folder)` reads it: bos/eos/pad as trained, nothing added to
encoded text (the training data has no bos; eos only ends documents).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mor_pretrain.config import RunFolder, _build
from mor_pretrain.models import ModelArgs, MoRModel

FORMAT = "mor-pretrain/v1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the --dtype names of every tool
TOKENIZER_CONFIG = "tokenizer_config.json"
# Specials of a byte-level BPE without a tokenizer_config.json (SmolLM2 exports written before there was one).
BPE_SPECIALS = {"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def tokenizer_file(spec: str, base: str | Path | None = None) -> Path:
    """The file a tokenizer spec names: "default" (the packaged SentencePiece model), or a path. With `base`
    (an export folder, whose config.json may come from anyone) the spec must name a file of that folder:
    a config.json that points elsewhere (/etc/passwd, ../..) is refused, so it reads nothing outside."""
    from mor_pretrain.data.tokenizer import default_tokenizer_path

    if spec == "default":
        return default_tokenizer_path()
    path = Path(spec)
    if base is not None:
        if path.name != spec or spec in (".", ".."):
            raise ValueError(
                f"{Path(base) / 'config.json'} names the tokenizer {spec!r}: an export's tokenizer must be a "
                f"file of its own folder (tokenizer.model or tokenizer.json) or 'default'"
            )
        path = Path(base) / spec
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return path


def tokenizer_specials(path: Path) -> dict[str, str]:
    """bos/eos/pad/unk token strings of a tokenizer file: a SentencePiece model's own pieces (pad falls back
    to eos, as in data.tokenizer), a tokenizer.json's from the tokenizer_config.json beside it."""
    if path.suffix == ".json":
        cfg = path.parent / TOKENIZER_CONFIG
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
    if src.resolve() != dst.resolve():
        shutil.copyfile(src, dst)
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **found}
    cfg.update(add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False)
    if max_len:
        cfg["model_max_length"] = max_len
    (out / TOKENIZER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
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
    extra["tokenizer"] names (resolved against `tokenizer_base` when relative) to folder `path`."""
    out = Path(path)
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
    meta = {"format": FORMAT, "model": dataclasses.asdict(args), **extra}
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    make_readable(tmp)
    tmp.replace(out / "model.safetensors")  # a reader never sees a half-written file
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
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
    cfg_path = Path(path) / "config.json"
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
    args = _build(ModelArgs, meta["model"], "model.")
    weights = Path(path) / "model.safetensors"
    with torch.device("meta"):
        model = MoRModel(args)
    # The config's shapes against the file's header before anything is allocated: a config.json with
    # huge sizes must not try to allocate them.
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(str(weights), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (no __iter__)
    except Exception as e:  # safetensors raises its own (non-OSError) type for truncated files
        raise ValueError(f"cannot read {weights}: {e}") from None
    if found != expected:
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        wrong = [f"{k}: config {v}, file {found[k]}" for k, v in expected.items() if found.get(k, v) != v]
        raise ValueError(
            f"{weights} does not match {Path(path) / 'config.json'}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
        )
    try:
        state = load_file(str(weights), device=str(device))
    except Exception as e:  # a header that parses over truncated tensor data
        raise ValueError(f"cannot read {weights}: {e}") from None
    bad = next((k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise ValueError(f"{weights}: tensor {bad} holds NaN or inf; refusing to use these weights")
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
    tokenizer, relative to the folder read when that folder holds a config.json."""
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

        args = _build(ModelArgs, meta["mor"], "mor.")
        state = {}
        for f in sorted(p.glob("*.safetensors")):
            state.update({k.removeprefix("model."): v.float() for k, v in load_file(str(f)).items()})
        check_shapes(expected_state_shapes(args), {k: tuple(v.shape) for k, v in state.items()}, f"folder {p}")
    else:
        raise ValueError(f"{config}: neither an export ({FORMAT}) nor a transformers Llama or MoR folder")
    tokenizer = next((name for name in ("tokenizer.model", "tokenizer.json") if (p / name).is_file()), "")
    return args, state, {"tokenizer": tokenizer}, p
