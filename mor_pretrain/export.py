"""Weights-only exports: a folder with `model.safetensors` and a self-describing `config.json`.

Loading needs no torch.distributed and no process group. The config carries every ModelArgs field
(Nr, sharing, router, capacities, KV mode, ...) plus the tokenizer spec, so an export fully describes the
model it holds.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mor_pretrain.config import _build
from mor_pretrain.models import ModelArgs, MoRModel

FORMAT = "mor-pretrain/v1"


def save_exported(
    path: str | Path,
    args: ModelArgs,
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype | None = torch.bfloat16,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `state_dict` (MoRModel names, full unsharded tensors) and its config to folder `path`."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().cpu()
        for k, v in state_dict.items()
    }
    meta = {"format": FORMAT, "model": dataclasses.asdict(args), **(extra or {})}
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    tmp.replace(out / "model.safetensors")  # a reader never sees a half-written file
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_export_config(path: str | Path) -> dict[str, Any]:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path} is not an export folder: {cfg_path} is missing")
    meta = json.loads(cfg_path.read_text())
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
    try:
        state = load_file(str(weights), device=str(device))
    except Exception as e:  # safetensors raises its own (non-OSError) type for truncated files
        raise ValueError(f"cannot read {weights}: {e}") from None
    with torch.device("meta"):
        model = MoRModel(args)
    model.to_empty(device=device)
    model.init_weights()  # fills non-persistent buffers (RoPE table)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(dtype), meta
