"""tools/generate.py end to end: a tiny random model exported with a tiny SentencePiece tokenizer."""

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from conftest import tiny_model, train_bpe, train_byte_bpe

from mor_pretrain.folders import load_exported, save_exported
from mor_pretrain.generate import DepthControl, SamplingConfig, generate

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "a", "recursion", "token", "router", "depth", "cache", "layer", "model", "stack", "expert"]
WORDS += ["choice", "sequence", "step", "key", "value"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_cli")
    rng = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=rng)) for _ in range(300)]
    train_bpe(lines, root / "tok", 60, byte_fallback=False)
    sp = spm.SentencePieceProcessor(model_file=str(root / "tok.model"))
    model = tiny_model(init_std=0.1, router="expert", vocab_size=sp.vocab_size())
    extra = {"tokenizer": str(root / "tok.model")}
    return save_exported(root / "export", model.args, model.state_dict(), dtype=None, extra=extra)


def load_cli():
    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "tools/generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli(*argv):
    """tools/generate.py main(), in this process (a subprocess would re-import torch)."""
    return load_cli().main([str(a) for a in argv])


def expected(export_dir, prompts, **kw):
    model, meta = load_exported(export_dir)
    sp = spm.SentencePieceProcessor(model_file=str(export_dir / meta["tokenizer"]))  # the copy beside the weights
    ctl = kw.pop("ctl", DepthControl())
    cfg = SamplingConfig(eos_ids=[sp.eos_id()], **kw)
    ids = [sp.encode(p) for p in prompts]
    gen = generate(model.eval(), ids, cfg, ctl)
    return gen, [sp.decode(i + t)[len(sp.decode(i)) :] for i, t in zip(ids, gen.tokens, strict=True)]


@pytest.mark.parametrize("engine", [False, True])
def test_cli_json_matches_library_generation(export_dir, capsys, engine):
    prompts = ["the router", "expert choice depth cache layer"]
    flags = ["--engine", "--slots", 1] if engine else []
    rc = cli(export_dir, "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", 6, "--json", *flags)
    assert rc == 0
    got = json.loads(capsys.readouterr().out)
    gen, texts = expected(export_dir, prompts, max_new_tokens=6)
    assert [c["tokens"] for c in got["completions"]] == gen.tokens
    assert [c["text"] for c in got["completions"]] == texts
    assert got["depth_histogram"] == gen.depth_histogram(3)


def test_cli_streams_one_prompt_and_reports_depths(export_dir, capsys):
    rc = cli(export_dir, "--prompt", "the model", "--max-new-tokens", 8, "--max-depth", 2)
    assert rc == 0
    out, err = capsys.readouterr()
    _, texts = expected(export_dir, ["the model"], max_new_tokens=8, ctl=DepthControl(max_depth=2))
    assert out == "the model" + texts[0] + "\n"
    assert "depth of 8 generated tokens" in err and "3: 0 (0.0%)" in err


def test_stream_printer_holds_back_a_partial_stop_string():
    class Chars:
        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    buf = io.StringIO()
    printer = load_cli().StreamPrinter(Chars(), [], ["XYZ"], out=buf)
    seen = []
    for ch in "abXYc dXYZ tail":
        printer.on_token(0, ord(ch))
        seen.append(buf.getvalue())
    printer.finish()
    assert seen[2] == "ab" and seen[4] == "abXYc"  # "XY" held back until it cannot start "XYZ"
    assert buf.getvalue() == "abXYc d\n"


def test_cli_errors_name_the_problem(export_dir, tmp_path, capsys):
    assert cli(export_dir) == 2
    assert "no prompt" in capsys.readouterr().err
    assert cli(tmp_path, "--prompt", "x") == 2
    assert "is not a model folder" in capsys.readouterr().err
    assert cli(export_dir, "--prompt", "x", "--threshold", 1.5) == 2
    out, err = capsys.readouterr()
    assert "threshold" in err and out == ""  # refused before the prompt is echoed
    assert cli(export_dir, "--prompt", "the " * 80) == 2
    out, err = capsys.readouterr()
    assert "prompt 0 has" in err and "max_seq_len is 64" in err and out == ""


def test_cli_runs_as_a_script(export_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(ROOT / "tools/generate.py"), str(export_dir), "--prompt", "the", "--max-new-tokens", "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("the") and "tokens/s" in res.stderr


def test_stop_strings_take_backslash_escapes():
    args = load_cli().parse_args(["x", "--stop", "\\n\\n", "--stop", "caf\\u00e9 é\\t"])
    assert args.stop == ["\n\n", "café é\t"]


def test_cli_takes_run_folders_dcp_checkpoints_and_bpe_exports(export_dir, tmp_path, capsys):
    """Everything tools/eval.py takes: a run folder (latest complete checkpoint), a DCP folder, a BPE export."""
    import torch.distributed.checkpoint as dcp

    from mor_pretrain.config import JobConfig, TrainingConfig, dump_toml
    from mor_pretrain.folders import mark_complete

    model, meta = load_exported(export_dir)
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step-00000002"
    cfg = JobConfig(model=model.args, training=TrainingConfig(seq_len=16))
    cfg.data.tokenizer = meta["tokenizer_source"]
    run.mkdir()
    (run / "config.toml").write_text(dump_toml(cfg))
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt))
    (ckpt / "tokenizer.model").write_bytes(Path(meta["tokenizer_source"]).read_bytes())  # a save's own copy
    mark_complete(ckpt, 2)  # the checksum manifest a trainer save writes
    _, texts = expected(export_dir, ["the router"], max_new_tokens=5)
    for src in (run, ckpt):
        assert cli(src, "--prompt", "the router", "--max-new-tokens", 5, "--json") == 0
        assert json.loads(capsys.readouterr().out)["completions"][0]["text"] == texts[0]

    tokenizers = pytest.importorskip("tokenizers")
    t = tokenizers.Tokenizer.from_file(str(train_byte_bpe([" ".join(WORDS)] * 20, tmp_path / "bpe.json")))
    bpe_model = tiny_model(init_std=0.1, vocab_size=t.get_vocab_size())
    bpe = save_exported(
        tmp_path / "bpe",
        bpe_model.args,
        bpe_model.state_dict(),
        dtype=None,
        extra={"tokenizer": str(tmp_path / "bpe.json")},
    )
    assert cli(bpe, "--prompt", "the router", "--max-new-tokens", 4, "--json") == 0
    got = json.loads(capsys.readouterr().out)["completions"][0]
    prompt = t.encode("the router").ids
    eos = t.token_to_id("<|endoftext|>")
    want = generate(bpe_model.eval(), [prompt], SamplingConfig(max_new_tokens=4, eos_ids=[eos])).tokens[0]
    assert got["tokens"] == want and got["text"] == t.decode(prompt + want)[len("the router") :]
