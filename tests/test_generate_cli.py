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
from conftest import tiny_model, train_bpe

from mor_pretrain.export import load_exported, save_exported
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
    sp = spm.SentencePieceProcessor(model_file=meta["tokenizer"])
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
    assert "not an export folder" in capsys.readouterr().err
    assert cli(export_dir, "--prompt", "x", "--threshold", 1.5) == 2
    assert "threshold" in capsys.readouterr().err
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
