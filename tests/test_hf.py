"""transformers folders (`to-hf`): Llama for plain models, generated remote code for MoR; tokenizers in every
export and folder. References: our MoRModel and our tokenizers."""

import json
import os
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch
from conftest import spread_thresholds, tiny_model, tools_module, train_bpe, train_byte_bpe

from mor_pretrain.evaluate import load_any_tokenizer
from mor_pretrain.folders import save_exported
from mor_pretrain.generate import SamplingConfig, generate

transformers = pytest.importorskip("transformers")
from mor_pretrain.integrations.hf import REMOTE_FILES, remote_source, save_hf  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

KINDS = {
    "vanilla": dict(num_recursions=1, sharing="cycle", tie_embeddings=False),
    "recursive": dict(num_recursions=3, sharing="middle_cycle"),
    "recursive_share": dict(num_recursions=3, kv_mode="share"),
    "expert": dict(router="expert"),
    "expert_share": dict(router="expert", kv_mode="share", capacities=[1.0, 0.5, 0.25]),
    "expert_aux": dict(router="expert", aux_router=True, init_std=0.2),
    "token": dict(router="token", balancing="loss_free"),
    "expert_threshold": dict(router="expert", expert_rule="threshold"),
    "recursive_gate": dict(num_recursions=3, sharing="middle_cycle", recursion_gate=0.2),
    "recursive_eps": dict(num_recursions=3, sharing="middle_cycle", residual_scale=1 / 3),
    "expert_random": dict(router="expert", expert_rule="random"),
}
TEXT = "The router picks a depth for every token.\n\nKeys  and values: café, naïve, 3.50 — 日本 🙂 end "


def to_hf(tmp_path, name, model, **kw):
    """A to-hf folder of `model`; unique folder names keep transformers' module cache apart."""
    return save_hf(tmp_path / f"hf_{name}", model.args, model.state_dict(), torch.float32, progress=False, **kw)


def load_auto(folder, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, **kw).eval()


def seeded(model, x, routing=None):
    """Logits of one forward after a fixed seed: random routing draws the same scores in every such call."""
    torch.manual_seed(11)
    return (model(x) if routing is None else model(x, routing=routing)).logits


@pytest.mark.parametrize("kind", list(KINDS))
def test_auto_model_logits_equal_ours(tmp_path, kind):
    model = tiny_model(**KINDS[kind]).eval()
    if kind == "token":
        model.stack.depth_bias.copy_(torch.tensor([0.3, -0.2, 0.1]))  # a trained loss-free bias travels too
    if kind == "expert_threshold":
        spread_thresholds(model, torch.randint(0, 97, (4, 24)))  # so do learned thresholds
    folder = to_hf(tmp_path, kind, model)
    cfg = json.loads((folder / "config.json").read_text())
    plain = kind in ("vanilla", "recursive")
    assert cfg["model_type"] == ("llama" if plain else "mor") and plain == ("auto_map" not in cfg)
    hf = load_auto(folder)
    x = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        # Each pair of forwards draws the same scores where routing is random (expert_random).
        torch.testing.assert_close(seeded(hf, x), seeded(model, x, "causal"), rtol=0, atol=1e-5)
        if kind.startswith("expert"):
            topk = load_auto(folder, routing="topk")
            torch.testing.assert_close(seeded(topk, x), seeded(model, x, "topk"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["expert", "expert_share", "token", "expert_threshold"])
def test_generate_uses_recursion_wise_caches_and_matches_ours(tmp_path, kind):
    model = tiny_model(init_std=0.2, **KINDS[kind]).eval()
    hf = load_auto(to_hf(tmp_path, kind, model))
    prompts = [[5, 17, 33, 2, 41, 9, 60], [71, 3, 12]]
    want = generate(model, prompts, SamplingConfig(max_new_tokens=8)).tokens
    # Left padding, as transformers pads for generation: each row must continue as if alone.
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 7 - len(p) :], mask[i, 7 - len(p) :] = torch.tensor(p), 1
    lengths = []
    forward = hf.forward

    def spy(*a, **kw):
        lengths.append(kw["input_ids"].shape[1])
        return forward(*a, **kw)

    hf.forward = spy
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert lengths[0] == 7 and set(lengths[1:]) == {1}  # one prefill, then one token per step: cached
    assert out[:, 7:].tolist() == want


def test_padded_batches_score_like_single_rows(tmp_path):
    model = tiny_model(init_std=0.2, router="expert").eval()
    hf = load_auto(to_hf(tmp_path, "pad", model))
    rows = [torch.randint(0, 97, (n,)) for n in (9, 5)]
    for left in (True, False):
        ids = torch.zeros(2, 9, dtype=torch.long)
        mask = torch.zeros(2, 9, dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(9 - len(r), 9) if left else slice(0, len(r))
            ids[i, sl], mask[i, sl] = r, 1
        with torch.no_grad():
            logits = hf(ids, attention_mask=mask).logits
            for i, r in enumerate(rows):
                want = model(r[None], routing="causal").logits[0]
                torch.testing.assert_close(logits[i][mask[i].bool()], want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="topk"):
        load_auto(to_hf(tmp_path, "pad_topk", model), routing="topk")(ids, attention_mask=mask)


@pytest.mark.slow  # a fresh interpreter imports torch and transformers (about 20 s on 2 cores)
def test_folder_loads_without_the_project_package(tmp_path):
    """A folder ready to share: sharded weights with their index, files others can read, a model card,
    transformers' own config keys; AutoModel loads it where this package cannot be imported."""
    model = tiny_model(router="expert").eval()
    folder = to_hf(tmp_path, "alone", model, max_shard_size=40_000)
    (tmp_path / "probe").write_text("x")  # the mode any new file gets here (0o644 under umask 022)
    want = oct((tmp_path / "probe").stat().st_mode & 0o777)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {f.name for f in shards}
    assert {oct(f.stat().st_mode & 0o777) for f in folder.iterdir() if f.is_file()} == {want} != {"0o600"}
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "float32" and config["transformers_version"] == transformers.__version__
    assert "torch_dtype" not in config
    card = (folder / "README.md").read_text()
    assert "Mixture-of-Recursions: expert-topk routing, Nr=3" in card and "trust_remote_code=True" in card
    x = torch.randint(0, 97, (1, 12))
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x, routing="causal").logits, tmp_path / "want.pt")
    script = f"""
import sys
from pathlib import Path
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mor_pretrain":
            raise ImportError("the folder imported " + name)
sys.meta_path.insert(0, Block())
import torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
x, want = torch.load({str(tmp_path / "x.pt")!r}), torch.load({str(tmp_path / "want.pt")!r})
with torch.no_grad():
    torch.testing.assert_close(m(x).logits, want, rtol=0, atol=1e-5)
print("ok")
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_remote_source_refuses_imports_the_folder_lacks(monkeypatch, tmp_path):
    text = remote_source("mor_pretrain.generate")
    assert "from .mor import MoRModel" in text and "mor_pretrain" not in text.split('"""', 2)[2]
    bad = tmp_path / "layers.py"
    bad.write_text("from mor_pretrain.data.tokenizer import Tokenizer\n")
    monkeypatch.setitem(REMOTE_FILES, "mor_pretrain.models.layers", (bad, "layers.py"))
    with pytest.raises(RuntimeError, match="mor_pretrain.data.tokenizer"):
        remote_source("mor_pretrain.models.layers")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    lines = [f"{i} the router picks a depth for every token, keys and values cached" for i in range(300)]
    return train_bpe(lines, tmp_path_factory.mktemp("spm") / "tok", 400, byte_fallback=True)


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory):
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    return train_byte_bpe([TEXT] * 4, tmp_path_factory.mktemp("bpe") / "tokenizer.json", specials)


@pytest.mark.parametrize("which", ["default", "trained_spm", "bpe"])
def test_auto_tokenizer_of_exports_and_hf_folders_gives_our_ids(tmp_path, which, spm_model, bpe_json):
    spec = {"default": "default", "trained_spm": str(spm_model), "bpe": str(bpe_json)}[which]
    ours = load_any_tokenizer(spec)
    model = tiny_model(vocab_size=max(ours.vocab_size, 97)).eval()
    export = save_exported(tmp_path / "export", model.args, model.state_dict(), dtype=None, extra={"tokenizer": spec})
    folder = to_hf(tmp_path, which, model, tokenizer=spec)
    want = ours.encode(TEXT)
    if which != "bpe":  # independent reference: SentencePiece itself
        sp = spm.SentencePieceProcessor(model_file=str(load_any_tokenizer(spec).path))
        assert want == sp.encode(TEXT)
    if which != "bpe":  # a SentencePiece model ships converted too: tokenizer.json alone encodes the same
        from tokenizers import Tokenizer

        assert Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids == want
        (folder / "tokenizer.model").rename(tmp_path / "moved.model")
        assert transformers.AutoTokenizer.from_pretrained(str(folder))(TEXT)["input_ids"] == want
        (tmp_path / "moved.model").rename(folder / "tokenizer.model")
    for path in (export, folder):
        auto = transformers.AutoTokenizer.from_pretrained(str(path))
        assert auto(TEXT)["input_ids"] == want
        moved = load_any_tokenizer(json.loads((export / "config.json").read_text())["tokenizer"], export)
        assert moved.encode(TEXT) == want  # the export's own copy, as eval and generate load it
        assert (auto.eos_token_id, auto.pad_token_id) == (ours.eos_id, ours.pad_id)
        assert auto.bos_token_id == (None if ours.bos_id < 0 else ours.bos_id)
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ours.eos_id


def test_convert_cli_to_hf_and_upcycle_report_progress_and_carry_the_tokenizer(tmp_path, capsys, spm_model):
    convert_checkpoint = tools_module("convert_checkpoint")
    from conftest import tiny_args

    from mor_pretrain.config import JobConfig, TrainingConfig, dump_toml

    vanilla = tiny_model(num_recursions=1, sharing="cycle", vocab_size=400).eval()
    src = save_exported(tmp_path / "src", vanilla.args, vanilla.state_dict(), extra={"tokenizer": str(spm_model)})
    (tmp_path / "target.toml").write_text(
        dump_toml(JobConfig(model=tiny_args(router="expert", vocab_size=400), training=TrainingConfig(seq_len=16)))
    )
    up, hf = tmp_path / "up", tmp_path / "hf_cli"
    assert convert_checkpoint.main(["upcycle", str(src), str(up), "--config", str(tmp_path / "target.toml")]) == 0
    assert convert_checkpoint.main(["to-hf", str(up), str(hf)]) == 0
    err = capsys.readouterr().err
    assert "upcycling (stepwise)" in err and f"writing {hf}" in err
    want = spm.SentencePieceProcessor(model_file=str(spm_model)).encode(TEXT)
    assert transformers.AutoTokenizer.from_pretrained(str(hf))(TEXT)["input_ids"] == want
    assert load_auto(hf).config.mor["router"] == "expert"


def test_convert_cli_errors_are_one_line_and_to_hf_keeps_a_bf16_models_dtype(tmp_path, capsys):
    convert_checkpoint = tools_module("convert_checkpoint")

    from mor_pretrain.config import JobConfig, TrainingConfig, dump_toml

    model = tiny_model(router="expert")
    training = {"steps": 10, "tokens": 640, "seq_len": 16, "dtype": "bfloat16", "data": ["x.jsonl"]}
    extra = {"tokenizer": "default", "training": training}
    src = save_exported(tmp_path / "src", model.args, model.state_dict(), extra=extra)
    assert convert_checkpoint.main(["to-dcp", str(src), str(tmp_path / "dcp")]) == 0
    (tmp_path / "file").write_text("x")
    (tmp_path / "job.toml").write_text(dump_toml(JobConfig(model=model.args, training=TrainingConfig(seq_len=16))))
    capsys.readouterr()
    to_export = ["to-export", str(tmp_path / "dcp"), str(tmp_path / "file" / "export")]
    assert convert_checkpoint.main([*to_export, "--config", str(tmp_path / "job.toml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Not a directory" in err[-1] and "Traceback" not in "\n".join(err)
    assert convert_checkpoint.main(["to-hf", str(src), str(tmp_path / "hf_bf16")]) == 0
    folder = tmp_path / "hf_bf16"
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert "Training: steps 10, tokens 640, seq_len 16, dtype bfloat16" in (folder / "README.md").read_text()


def test_convert_cli_to_hf_max_shard_size_shards_like_transformers(tmp_path, capsys):
    """--max-shard-size in transformers' syntax: shards named and indexed as transformers names them, no shard
    over the limit unless one tensor alone is, and the sharded folder loads to the one-file folder's logits."""
    convert_checkpoint = tools_module("convert_checkpoint")
    from safetensors.torch import load_file

    # bytes become an int; a size with a unit goes to huggingface_hub as written, which parses it for transformers
    assert [convert_checkpoint.shard_size(t) for t in ("40000", "2.5 gb", "500MB")] == [40_000, "2.5 gb", "500MB"]
    model = tiny_model(router="expert").eval()
    src = save_exported(tmp_path / "src", model.args, model.state_dict(), dtype=None)
    one, sharded = tmp_path / "hf_unsharded", tmp_path / "hf_sharded"
    assert convert_checkpoint.main(["to-hf", str(src), str(one)]) == 0
    assert convert_checkpoint.main(["to-hf", str(src), str(sharded), "--max-shard-size", "40KB"]) == 0
    assert [f.name for f in one.glob("*.safetensors")] == ["model.safetensors"]
    assert not (one / "model.safetensors.index.json").exists()
    names = sorted(f.name for f in sharded.glob("*.safetensors"))
    n = len(names)
    assert n > 1 and names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    whole = load_file(one / "model.safetensors")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in whole.values())
    assert set(index["weight_map"]) == set(whole) and set(index["weight_map"].values()) == set(names)
    for name in names:
        part = load_file(sharded / name)
        assert {k for k, v in index["weight_map"].items() if v == name} == set(part)
        assert len(part) == 1 or sum(t.numel() * t.element_size() for t in part.values()) <= 40_000
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        want = load_auto(one)(x).logits
        torch.testing.assert_close(load_auto(sharded)(x).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(want, model(x, routing="causal").logits, rtol=0, atol=1e-5)
    for bad in ("2XB", "0", "-5MB", "GB"):
        with pytest.raises(SystemExit):
            convert_checkpoint.main(["to-hf", str(src), str(tmp_path / "hf_bad"), f"--max-shard-size={bad}"])
        assert f"error: argument --max-shard-size: {bad!r} is not a size" in capsys.readouterr().err
    assert not (tmp_path / "hf_bad").exists()
