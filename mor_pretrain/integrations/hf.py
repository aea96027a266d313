"""Hugging Face transformers folders of our models (`convert_checkpoint.py to-hf`).

- Models without routing or KV sharing become a plain `LlamaForCausalLM` (convert.to_hf_llama: shared
  layers unrolled), readable by anything that reads Llama.
- MoR models (expert or token choice, either KV mode) and KV-sharing recursive models become a remote-code
  folder: `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`. The modeling code is
  GENERATED at export time from the project's own source: models/mor.py, models/layers.py and the cached
  inference path generate.py are copied into the folder with their package imports made relative, next to
  configuration_mor.py / modeling_mor.py (from the hf_configuration / hf_modeling templates). The folder needs
  only torch and transformers, and it computes what this version of the project computes.

Every folder also holds the tokenizer (export.save_tokenizer) and a generation_config.json with its
bos/eos/pad ids.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mor_pretrain.convert import to_hf_llama
from mor_pretrain.folders import make_readable, save_tokenizer
from mor_pretrain.models import ModelArgs

_PKG = Path(__file__).resolve().parents[1]
# Project module -> (its source file, the file it becomes in the folder). Order: what imports what.
REMOTE_FILES = {
    "mor_pretrain.models.layers": (_PKG / "models" / "layers.py", "layers.py"),
    "mor_pretrain.models.mor": (_PKG / "models" / "mor.py", "mor.py"),
    "mor_pretrain.generate": (_PKG / "generate.py", "generate.py"),
    "mor_pretrain.integrations.hf_configuration": (
        _PKG / "integrations" / "hf_configuration.py",
        "configuration_mor.py",
    ),
    "mor_pretrain.integrations.hf_modeling": (_PKG / "integrations" / "hf_modeling.py", "modeling_mor.py"),
}
_ALIASES = {"mor_pretrain.models": "mor_pretrain.models.mor"}  # the package re-exports mor.py's classes
_IMPORT = re.compile(r"^(\s*)from (mor_pretrain[\w.]*) import ", re.MULTILINE)


def needs_remote_code(args: ModelArgs) -> bool:
    """True for models that have no Llama equivalent (routing, KV sharing or a recursion gate)."""
    return not args.llama_equivalent


def remote_source(module: str) -> str:
    """The source of a project module as it is written into the folder: package imports made relative.
    Refuses an import of a project module the folder does not carry (it would not load without the package)."""
    path, _ = REMOTE_FILES[module]
    text = path.read_text()

    def relative(m: re.Match[str]) -> str:
        name = _ALIASES.get(m.group(2), m.group(2))
        if name not in REMOTE_FILES:
            raise RuntimeError(f"{path} imports {m.group(2)}, which a transformers folder does not carry")
        return f"{m.group(1)}from .{REMOTE_FILES[name][1].removesuffix('.py')} import "

    text = _IMPORT.sub(relative, text)
    if re.search(r"^\s*import mor_pretrain", text, re.MULTILINE):
        raise RuntimeError(f"{path} imports mor_pretrain directly, which a transformers folder does not carry")
    return text


def _special_ids(out: Path) -> dict[str, int]:
    """bos/eos/pad ids of the tokenizer written into `out`, for config.json and generation_config.json."""
    cfg_path = out / "tokenizer_config.json"
    if not cfg_path.is_file():
        return {}
    from mor_pretrain.evaluate import load_any_tokenizer

    spec = "tokenizer.model" if (out / "tokenizer.model").is_file() else "tokenizer.json"
    tok = load_any_tokenizer(spec, out)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}  # type: ignore[attr-defined]
    return {k: int(v) for k, v in ids.items() if v is not None and v >= 0}


def sentencepiece_to_json(model: Path, out: Path) -> None:
    """A SentencePiece model as a `tokenizers` tokenizer.json that encodes as SentencePiece does (transformers'
    converter, which follows the model's own normalizer settings), so fast tokenizers need no conversion."""
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model.read_bytes())
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    SpmConverter.build_tokenizer_from_spm_proto(proto, vocab).save(str(out))
    make_readable(out)


def save_hf(
    out: str | Path,
    args: ModelArgs,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    tokenizer: str = "",
    tokenizer_base: str | Path | None = None,
    progress: bool = True,
    about: dict[str, Any] | None = None,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write a transformers folder for `args` / `state` (MoRModel names): Llama when possible, else MoR
    remote code (module docstring); plus the tokenizer `tokenizer` names (relative to `tokenizer_base`) and
    a model card (README.md) from `about` (the export's config: training facts, evaluation results).

    Weights are written by huggingface_hub (sharded above max_shard_size, with model.safetensors.index.json)
    and every file is left readable as the umask allows (safetensors writes 0600)."""
    import transformers
    from huggingface_hub import save_torch_state_dict

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_name = save_tokenizer(out, tokenizer, tokenizer_base, max_len=args.max_seq_len) if tokenizer else ""
    if tokenizer_name == "tokenizer.model":
        sentencepiece_to_json(out / "tokenizer.model", out / "tokenizer.json")
    ids = _special_ids(out)
    if not needs_remote_code(args):
        tensors, config = to_hf_llama(args, state)
    else:
        for module, (_, name) in REMOTE_FILES.items():
            (out / name).write_text(remote_source(module))
        tensors = {f"model.{k}": v for k, v in state.items()}
        config = {
            "architectures": ["MoRForCausalLM"],
            "model_type": "mor",
            "auto_map": {
                "AutoConfig": "configuration_mor.MoRConfig",
                "AutoModelForCausalLM": "modeling_mor.MoRForCausalLM",
            },
            "mor": dataclasses.asdict(args),
            "routing": "causal",
        }
    # Unrolled shared layers alias one tensor; safetensors needs separate storage for each name.
    items = tqdm(tensors.items(), desc="convert", unit="tensor", disable=not progress)
    written = {k: (v.detach().to(dtype) if v.is_floating_point() else v).contiguous().clone() for k, v in items}
    save_torch_state_dict(written, out, max_shard_size=max_shard_size, metadata={"format": "pt"})
    config.update(ids, dtype=str(dtype).removeprefix("torch."), transformers_version=transformers.__version__)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation: dict[str, Any] = {"_from_model_config": True, **ids}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "README.md").write_text(model_card(args, config, sum(v.numel() for v in state.values()), about or {}))
    for f in out.iterdir():
        if f.is_file():
            make_readable(f)
    return out


def model_card(args: ModelArgs, config: dict[str, Any], params: int, about: dict[str, Any]) -> str:
    """README.md of a transformers folder: what the model is, how it was trained, how to load it."""
    remote = config["model_type"] == "mor"
    # The router and its rule by their one name (ModelArgs.router_kind), never worked out here again.
    kind = args.router_kind
    if args.num_recursions > 1:
        kind += f", Nr={args.num_recursions}, {args.sharing} sharing"
    if args.router != "none":
        caps = ", ".join(f"{c:.3g}" for c in args.step_capacities)
        causal = "" if args.topk_routing else " (causal)"
        kind = f"Mixture-of-Recursions: {args.router_kind} routing{causal}, Nr={args.num_recursions}, capacities {caps}"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [mor-pretrain, mixture-of-recursions]" if remote else "tags: [mor-pretrain, llama]",
        "---",
        "",
        "# Model card",
        "",
        f"- Architecture: {'MoR remote code (MoRForCausalLM)' if remote else 'LlamaForCausalLM'}; {kind}.",
        f"- Shape: {args.n_layers} applied layers, d_model {args.d_model}, {args.n_heads} heads "
        f"({args.n_kv_heads} KV), FFN {args.d_ffn}, vocabulary {args.vocab_size}, context {args.max_seq_len}; "
        f"{params / 1e6:.1f}M parameters stored.",
    ]
    if remote:
        lines.append(f"- KV mode {args.kv_mode}; generation routes causally (`routing` in config.json).")
    training = about.get("training")
    if isinstance(training, dict):
        facts = ", ".join(f"{k} {v}" for k, v in training.items())
        lines.append(f"- Training: {facts}.")
    lines.append(f"- Weights: {config['dtype']}; written with transformers {config['transformers_version']}.")
    evals = about.get("eval")
    if isinstance(evals, list) and evals:
        lines += ["", "## Evaluation", "", "| task | metric | value |", "|---|---|---|"]
        lines += [f"| {e['task']} | {e['metric']} | {e['value']:.4f} |" for e in evals]
    trust = ", trust_remote_code=True" if remote else ""
    lines += [
        "",
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tok = AutoTokenizer.from_pretrained("PATH"{trust})',
        f'model = AutoModelForCausalLM.from_pretrained("PATH"{trust})',
        "```",
        "",
        "Written by mor-pretrain (`python tools/convert_checkpoint.py to-hf`).",
    ]
    return "\n".join(lines) + "\n"
