"""GGUF import (`convert.gguf_to_export`) on a tiny GGUF written here.

The file is written the way llama.cpp's convert_hf_to_gguf.py writes a Llama: Q/K rows permuted for its
interleaved-pair RoPE, names blk.N.*, a byte-level BPE in tokenizer.ggml.* with SmolLM's pre-tokenizer
("smollm": each digit alone, then GPT-2 byte-level splitting). The import must give back the model it was
written from, tensor for tensor and logit for logit, and the tokenizer its ids, whitespace before digits
included (transformers 5.25's GGUF tokenizer splits those differently). SmolLM2's real, quantized GGUF:
tests/test_convert_smollm2.py.
"""

import dataclasses
import importlib.util
import json

import pytest
import torch
from conftest import tiny_model

from mor_pretrain.convert import gguf_to_export, to_hf_llama
from mor_pretrain.folders import load_exported

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("gguf", "tokenizers")),
    reason="needs the convert extra (gguf, tokenizers)",
)

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TEXTS = [
    "the cat sat on the mat",
    "<|im_start|>user\nthe dog<|im_end|>\n<|endoftext|>",
    "a  b   c\n\n  the 12 cats",
    "year  2024\n\t\t3 and 1,234.5",  # whitespace runs before digits: where the pre-tokenizer matters
]
# llama.cpp's GGUF tensor names of a Llama block, by HF name.
GGUF_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def train_smollm_bpe(texts, path):
    """A 300-token byte-level BPE with SmolLM's pre-tokenizer, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    t.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    t.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIALS), initial_alphabet=alphabet)
    )
    t.save(str(path))
    return path


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's rotate-half Q/K rows to interleaved pairs per head."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path, hf, config, tokenizer_json, pre="smollm"):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_dimension_count(config["head_dim"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    tok = json.loads(tokenizer_json.read_text())
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|endoftext|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

    def add(name, t):
        w.add_tensor(name, t.detach().float().contiguous().numpy())

    add("token_embd.weight", hf["model.embed_tokens.weight"])
    add("output_norm.weight", hf["model.norm.weight"])
    if "lm_head.weight" in hf:
        add("output.weight", hf["lm_head.weight"])
    for i in range(config["num_hidden_layers"]):
        for theirs, name in GGUF_BLOCK.items():
            t = hf[f"model.layers.{i}.{theirs}.weight"]
            if name == "attn_q":
                t = llama_cpp_permute(t, config["num_attention_heads"])
            elif name == "attn_k":
                t = llama_cpp_permute(t, config["num_key_value_heads"])
            add(f"blk.{i}.{name}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny(tmp_path, tie=True, pre="smollm"):
    from tokenizers import Tokenizer

    # Whitespace runs often enough that "ĠĠ", "ĊĊ", "ĉĉ" are merged: a split before digits shows in the ids.
    texts = ["the cat sat on the mat", "the dog ate the cat", "a  b   c 12 34", "  2024\n\n  7\t\t8"] * 20
    tok_path = train_smollm_bpe(texts, tmp_path / "tokenizer.json")
    vocab = Tokenizer.from_file(str(tok_path)).get_vocab_size()
    # n_kv_heads < n_heads: the K permutation goes by the KV head count.
    model = tiny_model(vocab_size=vocab, num_recursions=1, sharing="cycle", n_layers=3, tie_embeddings=tie).eval()
    hf, config = to_hf_llama(model.args, model.state_dict())
    # A folder of its own: a tokenizer.json beside a GGUF would be read instead of the GGUF's by transformers.
    (tmp_path / "gguf").mkdir()
    write_llama_gguf(tmp_path / "gguf" / "tiny.gguf", hf, config, tok_path, pre)
    return model, tok_path


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_import_gives_back_the_model_and_tokenizer_it_was_written_from(tmp_path, tie):
    from tokenizers import Tokenizer

    model, tok_path = write_tiny(tmp_path, tie)
    vocab = model.args.vocab_size

    export = gguf_to_export(tmp_path / "gguf" / "tiny.gguf", tmp_path / "export", progress=False)
    got, meta = load_exported(export, dtype=torch.float32)
    # GGUF stores rms_norm_eps as float32: 1e-5 comes back as 9.99999975e-06.
    assert got.args.norm_eps == pytest.approx(model.args.norm_eps, rel=1e-7)
    assert dataclasses.replace(got.args, norm_eps=model.args.norm_eps) == model.args
    want = model.state_dict()
    assert set(got.state_dict()) == set(want)
    for k, v in want.items():  # F32 in the file: exactly the tensors written, Q/K back in HF's row order
        torch.testing.assert_close(got.state_dict()[k], v, rtol=0, atol=0, msg=k)
    x = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            got(x, routing="causal").logits, model(x, routing="causal").logits, rtol=0, atol=1e-6
        )

    assert meta["tokenizer"] == "tokenizer.json"
    ref, imported = Tokenizer.from_file(str(tok_path)), Tokenizer.from_file(str(export / "tokenizer.json"))
    for text in TEXTS:
        assert imported.encode(text).ids == ref.encode(text).ids, text
    ids = imported.encode(TEXTS[1]).ids
    assert ids[0] == ref.token_to_id("<|im_start|>") and ids[-1] == ref.token_to_id("<|endoftext|>")
    cfg = json.loads((export / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<|im_start|>", "<|endoftext|>", "<|endoftext|>")
    assert cfg["chat_template"].startswith("{% for m in messages %}")


def test_gguf_import_refuses_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        gguf_to_export(tmp_path / "nothing.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_gguf_import_refuses_another_pre_tokenizer(tmp_path):
    """The import rebuilds SmolLM's digit-splitting pre-tokenizer; a file declaring another one is refused."""
    write_tiny(tmp_path, pre="llama-bpe")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre = 'smollm'.*got 'llama-bpe'"):
        gguf_to_export(tmp_path / "gguf" / "tiny.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
