"""Data pipeline: tokenizer, byte-range parts, packing, exactly-once sharding, exact and resharded resume
that seeks instead of replaying (every format, 2 ranks x 2 workers on gloo), the fixed validation set,
pre-tokenized shards and bad input. Everything runs on a small corpus written here and a 400-piece
SentencePiece model trained here (about a second)."""

import datetime
import importlib
import json
import logging
import os
import pickle
import random
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import GPU_LIKE_BACKEND, spawn, train_bpe

from mor_pretrain.config import DataConfig
from mor_pretrain.data import DataError, build_dataloader, dataset, load_tokenizer, resolve_vocab_size
from mor_pretrain.data.sources import Skips, iter_texts, open_source
from mor_pretrain.distributed import barrier

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "was", "with", "be", "king", "river", "stone"]
SEQ = 16


def import_tool(name: str):
    """A module from tools/ under its own name: pretokenize's worker processes unpickle its functions by it."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "tools"))


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 80))) + f" doc{i}." for i in range(n)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = make_docs(160)
    write_jsonl(root / "a.jsonl", docs[:100])
    write_jsonl(root / "b.jsonl", docs[100:])
    # A real pad piece (pad_id), so a window's lone first token and padding can be told apart.
    train_bpe(docs, root / "tok", 400, byte_fallback=True, pad_id=3)
    return root, docs


def cfg_for(root: Path, **kw) -> DataConfig:
    base = dict(
        sources=[str(root / "*.jsonl")],
        val_sources=[str(root / "*.jsonl")],
        tokenizer=str(root / "tok.model"),
        lanes=4,
        shuffle_buffer=4,
    )
    base.update(kw)
    return DataConfig(**base)


VAL_ALL = 1000  # validation windows that cover the whole test corpus (about 430 windows)


def loader(cfg: DataConfig, split="train", rank=0, world=1, batch=4, seed=0, val_windows=VAL_ALL):
    return build_dataloader(
        cfg,
        split=split,
        seq_len=SEQ,
        micro_batch_size=batch,
        dp_rank=rank,
        dp_world=world,
        seed=seed,
        val_windows=val_windows if split == "val" else 0,
    )


def take(dl, n: int) -> list[dict]:
    it = iter(dl)
    return [next(it) for _ in range(n)]


PAD = 3


def windows(batches: list[dict]) -> list[tuple[int, ...]]:
    """Each row back as its window of real tokens: input[0] then every scored label; padding rows dropped."""
    out = []
    for b in batches:
        for inp, lab in zip(b["input"], b["labels"], strict=True):
            real = lab[lab != -100]
            if len(real) or int(inp[0]) != PAD:
                out.append((int(inp[0]), *real.tolist()))
    return out


def reference_tokens(root: Path, docs: list[str]) -> list[int]:
    tok = load_tokenizer(str(root / "tok.model"))
    return [t for d in docs for t in tok.encode(d, eos=True)]


# --- tokenizer ---------------------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_ids(corpus):
    root, docs = corpus
    tok = load_tokenizer(str(root / "tok.model"))
    ids = tok.encode(docs[3], bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids[1:-1]) == docs[3]
    assert tok.encode_batch(docs[:3]) == [tok.encode(d) for d in docs[:3]]
    assert tok.decode(tok.encode("unseen: Ünïcödé €")) == "unseen: Ünïcödé €"  # byte fallback
    assert tok.pad_id == PAD
    assert pickle.loads(pickle.dumps(tok)).encode(docs[0]) == tok.encode(docs[0])
    assert tok.vocab_size == 400
    assert resolve_vocab_size(cfg_for(root)) == 448
    assert resolve_vocab_size(cfg_for(root, vocab_multiple=7)) == 406


def test_default_tokenizer_if_installed():
    pytest.importorskip("mistral_common")
    tok = load_tokenizer("default")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert tok.decode(tok.encode("Hello world")) == "Hello world"


def test_missing_tokenizer_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(str(tmp_path / "nope.model"))
    monkeypatch.setattr("mor_pretrain.data.tokenizer.DEFAULT_PACKAGE", "no_such_package_xyz")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mistral-common"):
        load_tokenizer("default")


# --- sources: disjoint parts -------------------------------------------------------------------------------


@pytest.mark.parametrize("parts", [1, 3, 7, 50])
def test_jsonl_parts_cover_every_document_once(corpus, parts):
    root, docs = corpus
    source = open_source(str(root / "*.jsonl"))
    got = [t for p in range(parts) for t in iter_texts(source, p, parts, Skips())]
    assert got == docs


@pytest.mark.parametrize("parts", [1, 2, 5, 40])
def test_separated_text_parts_cover_every_document_once(tmp_path, parts):
    docs = [d.replace(" ", "\n", 3) + "\n" for d in make_docs(30, seed=1)]
    (tmp_path / "x.txt").write_text("".join(d + "=====\n" for d in docs[:20]))
    (tmp_path / "y.txt").write_text("=====\n".join(docs[20:]))
    source = open_source(str(tmp_path), doc_separator="=====")
    got = [t for p in range(parts) for t in iter_texts(source, p, parts, Skips())]
    assert got == docs


def test_text_one_document_per_file(tmp_path):
    docs = make_docs(9, seed=2)
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d)
    source = open_source(str(tmp_path / "*.txt"))
    assert sorted(t for p in range(3) for t in iter_texts(source, p, 3, Skips())) == sorted(docs)


def test_parquet_parts(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = make_docs(50, seed=3)
    pq.write_table(pa.table({"body": docs[:30]}), tmp_path / "a.parquet", row_group_size=7)
    pq.write_table(pa.table({"body": docs[30:]}), tmp_path / "b.parquet", row_group_size=7)
    source = open_source(str(tmp_path), text_field="body")
    assert [t for p in range(4) for t in iter_texts(source, p, 4, Skips())] == docs


def test_parquet_lanes_keep_no_reader_open(tmp_path, monkeypatch):
    """pyarrow holds a decompressed column chunk per open reader: lanes must not each keep one (64 lanes of
    100 MB row groups would be 6 GB), so at most one reader is alive at a time, whatever the row groups."""
    import weakref

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = make_docs(200, seed=4)
    pq.write_table(pa.table({"text": docs}), tmp_path / "one.parquet")  # a single row group
    train_bpe(docs, tmp_path / "tok", 400, byte_fallback=True, pad_id=3)
    alive, most = [0], [0]

    class Counted(pq.ParquetFile):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            alive[0] += 1
            most[0] = max(most[0], alive[0])
            weakref.finalize(self, lambda: alive.__setitem__(0, alive[0] - 1))

    class Module:
        ParquetFile = Counted

    monkeypatch.setattr("mor_pretrain.data.sources._import_parquet", lambda: Module)
    cfg = DataConfig(sources=[str(tmp_path / "one.parquet")], tokenizer=str(tmp_path / "tok.model"), lanes=4)
    batches = take(loader(cfg), 20)
    assert len(windows(batches)) == 80
    assert most[0] == 1, f"{most[0]} parquet readers open at once"


# --- packing and sharding ----------------------------------------------------------------------------------


def test_packing_is_exact(corpus):
    root, docs = corpus
    cfg = cfg_for(root, lanes=1, shuffle=False)
    batches = list(loader(cfg, split="val", batch=3))
    for b in batches:
        assert b["input"].shape == b["labels"].shape == (3, SEQ)
        scored = b["labels"][:, :-1] != -100  # labels are the inputs shifted by one
        assert torch.equal(b["labels"][:, :-1][scored], b["input"][:, 1:][scored])
    stream = [t for w in windows(batches) for t in w]
    assert stream == reference_tokens(root, docs)
    assert all(len(w) == SEQ + 1 for w in windows(batches)[:-1])


def test_val_exactly_once_across_ranks_and_workers(corpus):
    root, docs = corpus
    cfg = cfg_for(root, num_workers=2)
    per_rank = [list(loader(cfg, split="val", rank=r, world=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])  # same number of batches: no rank waits at a collective
    tokens = [t for batches in per_rank for w in windows(batches) for t in w]
    assert Counter(tokens) == Counter(reference_tokens(root, docs))
    assert len(tokens) == len(reference_tokens(root, docs))


def test_train_same_windows_for_any_layout(corpus):
    """2 ranks x 2 workers for n steps draw exactly the windows that 1 rank, no workers, draws in 2n steps,
    and over more than an epoch (the corpus holds ~300 windows)."""
    root, _ = corpus
    n = 48
    two = [take(loader(cfg_for(root, num_workers=2), rank=r, world=2), n) for r in range(2)]
    one = take(loader(cfg_for(root)), 2 * n)
    assert Counter(windows(two[0] + two[1])) == Counter(windows(one))
    assert not set(windows(two[0])) & set(windows(two[1]))
    assert len(windows(one)) == 2 * n * 4


# --- resume ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(corpus, workers):
    root, _ = corpus
    cfg = cfg_for(root, num_workers=workers, sources=[str(root / "a.jsonl"), str(root / "b.jsonl")], weights=[3, 1])
    full = take(loader(cfg, rank=1, world=2), 9)
    first = loader(cfg, rank=1, world=2)
    head = take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint round trip
    resumed = loader(cfg, rank=1, world=2)
    resumed.load_state_dict(state)
    tail = take(resumed, 4)
    for a, b in zip(full, head + tail, strict=True):
        assert torch.equal(a["input"], b["input"]) and torch.equal(a["labels"], b["labels"])


def test_resume_refuses_other_data(corpus):
    root, _ = corpus
    dl = loader(cfg_for(root))
    take(dl, 2)
    other = loader(cfg_for(root), seed=1)
    with pytest.raises(DataError, match="seed"):
        other.load_state_dict(dl.state_dict())


def test_a_loaded_state_stays_the_callers(corpus):
    """The loader copies what it loads: training on does not rewrite the caller's state (a checkpoint's)."""
    root, _ = corpus
    dl = loader(cfg_for(root))
    take(dl, 2)
    state = json.loads(json.dumps(dl.state_dict()))
    saved = json.loads(json.dumps(state))
    resumed = loader(cfg_for(root))
    resumed.load_state_dict(state)
    take(resumed, 3)
    assert resumed.state_dict() != saved and state == saved


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("lane 3, window 7", "dataloader state must be a JSON object (keys version, lanes, "),
        ([2, 0, 1], "dataloader state must be a JSON object (keys version, lanes, "),
        ({"counts": "many"}, "dataloader state 'counts' must be a list of integers >= 0, got str 'many'"),
        ({"marks": {"0": [1]}}, "dataloader state 'marks' must be a list of lists of integers, got dict"),
        ({"batches": [3]}, "dataloader state 'batches' must be an integer >= 0, got list [3]"),
    ],
)
def test_a_dataloader_entry_of_the_wrong_shape_is_one_error_naming_the_file(corpus, tmp_path, entry, expected):
    """A hand-edited rank<r>.json (its manifest rewritten to match) whose "dataloader" entry is a string, a
    list or holds fields of the wrong type: an error naming the file and what the entry must be, not an
    AttributeError from inside the loader."""
    from mor_pretrain.checkpoint import Checkpointer
    from mor_pretrain.config import CheckpointConfig, CheckpointError
    from mor_pretrain.folders import mark_complete, step_dir
    from mor_pretrain.trainer import TrainState

    root, _ = corpus
    dl = loader(cfg_for(root))
    take(dl, 2)
    ck = Checkpointer(CheckpointConfig(), tmp_path)
    ck.save(1, {"train_state": TrainState(step=1)}, {"dataloader": dl})
    path = step_dir(tmp_path, 1) / "rank0.json"
    saved = json.loads(path.read_text())
    edited = {**saved["dataloader"], **entry} if isinstance(entry, dict) else entry
    path.write_text(json.dumps({**saved, "dataloader": edited}))
    mark_complete(step_dir(tmp_path, 1), 1)
    with pytest.raises(CheckpointError) as e:
        ck.load(
            step_dir(tmp_path, 1), {"train_state": TrainState()}, {"dataloader": loader(cfg_for(root))}, lambda _: None
        )
    assert str(e.value).startswith(f"{path}: unusable per-rank state (DataError: {expected}")


def test_weighted_mixing(corpus):
    root, _ = corpus
    cfg = cfg_for(root, sources=[str(root / "a.jsonl"), str(root / "b.jsonl")], weights=[4, 1])
    dl = loader(cfg)
    take(dl, 100)
    counts = dl.state_dict()["counts"]
    share = sum(counts[:4]) / sum(counts)
    assert 0.74 < share < 0.86, share


# --- resume without replay: every format, 2 ranks x 2 workers, later epochs, another DP degree -------------

SHUFFLE = 4  # cfg_for's shuffle_buffer


@pytest.fixture(scope="module")
def formats(corpus, tmp_path_factory):
    """The corpus in every source format: name -> DataConfig keywords."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    root, docs = corpus
    out = tmp_path_factory.mktemp("formats")
    (out / "text").mkdir()
    (out / "text/a.txt").write_text("".join(d + "\n=====\n" for d in docs[:90]))
    (out / "text/b.txt").write_text("\n=====\n".join(docs[90:]))
    (out / "parquet").mkdir()
    pq.write_table(pa.table({"text": docs[:100]}), out / "parquet/a.parquet", row_group_size=7)
    pq.write_table(pa.table({"text": docs[100:]}), out / "parquet/b.parquet", row_group_size=7)
    import_tool("pretokenize").pretokenize([str(root / "*.jsonl")], out / "tokens", str(root / "tok.model"), parts=3)
    base = dict(tokenizer=str(root / "tok.model"), lanes=4, shuffle_buffer=SHUFFLE)
    specs = {
        "jsonl": dict(sources=[str(root / "*.jsonl")]),
        "text": dict(sources=[str(out / "text")], doc_separator="=====", format="text"),
        "parquet": dict(sources=[str(out / "parquet")]),
        "tokens": dict(sources=[str(out / "tokens")]),
    }
    return {name: {**base, **spec, "val_sources": spec["sources"]} for name, spec in specs.items()}


class CountReads:
    """Tokens of the documents the loader reads from its sources, in this process and its forked workers
    (each document read appends its size to a file)."""

    def __init__(self, path: Path):
        self.path = path
        self.original = dataset._doc_tokens

    def __enter__(self) -> "CountReads":
        self.path.write_text("")
        original, path = self.original, self.path

        def counted(*args):
            for doc in original(*args):
                with open(path, "a") as f:
                    f.write(f"{len(doc[2])}\n")
                yield doc

        dataset._doc_tokens = counted
        return self

    def __exit__(self, *exc) -> None:
        dataset._doc_tokens = self.original

    @property
    def tokens(self) -> int:
        return sum(int(n) for n in self.path.read_text().split())


def take_all(dl, n: int) -> list[dict]:
    """n batches, then the iterator (and its workers) shut down, so nothing reads behind our back."""
    it = iter(dl)
    batches = [next(it) for _ in range(n)]
    del it
    return batches


def read_bound(cfg: DataConfig, batches: int, workers: int, batch: int = 4) -> int:
    """What a resume may read: the windows of the batches taken and of those prefetched (4 per worker, one
    more in flight), and per lane one re-read shuffle block, one block read ahead and the longest document."""
    longest = max(len(load_tokenizer(cfg.tokenizer).encode(d)) + 1 for d in make_docs(160))
    produced = (batches + 5 * max(workers, 1)) * batch * (SEQ + 1)
    return produced + cfg.lanes * (2 * SHUFFLE * (SEQ + 1) + longest)


def _resume_rank(rank: int, world: int, init: str, out: Path, formats: dict, n: int, m: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    mp.set_start_method("fork", force=True)  # spawned ranks default to spawning their loader workers (slow)
    dist.init_process_group(
        GPU_LIKE_BACKEND, init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    results = {}
    for name, kw in formats.items():
        cfg = DataConfig(**kw, num_workers=2)
        reference = take_all(loader(cfg, rank=rank, world=2), n + m)
        first = loader(cfg, rank=rank, world=2)
        head = take_all(first, n)
        state = json.loads(json.dumps(first.state_dict()))  # a collective, then a checkpoint round trip
        resumed = loader(cfg, rank=rank, world=2)
        resumed.load_state_dict(state)
        with CountReads(out / f"reads-{name}-{rank}") as reads:
            tail = take_all(resumed, m)
        exact = all(torch.equal(a[k], b[k]) for a, b in zip(reference, head + tail, strict=True) for k in a)
        single = loader(DataConfig(**kw))  # 1 rank, no workers: no collective
        head_one = take_all(single, 2 * n)
        grown = loader(cfg, rank=rank, world=2)
        grown.load_state_dict(single.state_dict())
        with CountReads(out / f"reads-grown-{name}-{rank}") as grown_reads:
            tail_two = take_all(grown, m)
        results[name] = dict(
            exact=exact,
            reads=reads.tokens,
            grown_reads=grown_reads.tokens,
            state=state,
            head=windows(head),
            head_one=windows(head_one),
            tail_two=windows(tail_two),
        )
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    barrier()
    dist.destroy_process_group()


def as_windows(rows: list) -> list[tuple[int, ...]]:
    return [tuple(w) for w in rows]


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_reads_a_bounded_amount_for_every_format(formats, tmp_path):
    """After n batches on 2 ranks x 2 workers (2.5 epochs of the corpus), a resume gives exactly the next
    batches and reads at most a block per lane plus what it yields, for text, jsonl, parquet and
    pre-tokenized sources; so do resumes onto 1 rank (from 2) and onto 2 ranks x 2 workers (from 1)."""
    n, m = 128, 4
    init = f"file://{tmp_path}/rendezvous-{uuid.uuid4().hex}"
    spawn(_resume_rank, 2, 2, init, tmp_path, formats, n, m)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name, kw in formats.items():
        cfg = DataConfig(**kw)
        per_pass = len(windows(list(loader(cfg, split="val", batch=1))))
        assert 2 * n * 4 > 2 * per_pass, "the resume point must lie in a later epoch"
        bound = read_bound(cfg, m, workers=2)
        assert bound * 3 < per_pass * (SEQ + 1), "a replay of one pass must exceed the bound"
        for r in range(2):
            assert ranks[r][name]["exact"], (name, r)
            assert ranks[r][name]["reads"] <= bound, (name, r, ranks[r][name]["reads"], bound)
            assert ranks[r][name]["grown_reads"] <= bound, (name, r)
        assert ranks[0][name]["state"] == ranks[1][name]["state"]  # global: any rank's copy will do
        # 2 ranks -> 1 rank, and 1 rank -> 2 ranks: together exactly the windows one uninterrupted rank draws
        shrunk = loader(cfg)
        shrunk.load_state_dict(ranks[0][name]["state"])
        with CountReads(tmp_path / f"reads-shrunk-{name}") as reads:
            tail = windows(take_all(shrunk, 2 * m))
        assert reads.tokens <= read_bound(cfg, 2 * m, workers=0), name
        seen = as_windows(ranks[0][name]["head"] + ranks[1][name]["head"]) + tail
        assert Counter(seen) == Counter(windows(take(loader(cfg), 2 * n + 2 * m))), name
        grown = as_windows(ranks[0][name]["head_one"] + ranks[0][name]["tail_two"] + ranks[1][name]["tail_two"])
        assert Counter(grown) == Counter(windows(take(loader(cfg), 2 * n + 2 * m))), name


# --- validation: a fixed set of windows, read on demand -----------------------------------------------------


def lane_windows(cfg: DataConfig, lane: int) -> list[tuple[int, ...]]:
    """An independent packing of one lane's documents into windows of SEQ+1 real tokens (padding dropped)."""
    tok = load_tokenizer(cfg.tokenizer)
    source = open_source(cfg.val_sources[0], cfg.format, cfg.text_field, cfg.doc_separator)
    stream = [t for d in iter_texts(source, lane, cfg.lanes, Skips()) for t in tok.encode(d, eos=True)]
    return [tuple(stream[i : i + SEQ + 1]) for i in range(0, len(stream), SEQ + 1)]


@pytest.mark.parametrize("val_windows", [10, 37])
def test_validation_is_a_fixed_set_on_any_layout(formats, tmp_path, val_windows):
    """The first val_windows // lanes windows of every lane (the first lanes one more), read when iterated:
    the same windows on 1 and 2 ranks and on every call, the same number of batches on every rank."""
    cfg = DataConfig(**formats["jsonl"], num_workers=2)
    quota = [val_windows // 4 + (lane < val_windows % 4) for lane in range(4)]
    expected = [w for lane in range(4) for w in lane_windows(cfg, lane)[: quota[lane]]]
    with CountReads(tmp_path / "reads") as reads:
        one = loader(cfg, split="val", val_windows=val_windows)
        two = [loader(cfg, split="val", rank=r, world=2, val_windows=val_windows) for r in range(2)]
        assert reads.tokens == 0  # start-up reads nothing, whatever the split's size
    assert windows(list(one)) == expected == windows(list(one))
    per_rank = [list(dl) for dl in two]
    assert len(per_rank[0]) == len(per_rank[1]) == len(two[0]) == len(two[1])
    assert Counter(windows(per_rank[0] + per_rank[1])) == Counter(expected)
    assert all(b["input"].shape == (4, SEQ) for b in per_rank[0] + per_rank[1])


def test_validation_deals_past_empty_lanes(corpus, tmp_path, caplog):
    """A val split of few long documents leaves byte-range lanes empty: the others give the missing windows,
    so the set is full (no padding row) and the same on 1 and 2 ranks; a split too small says so."""
    root, docs = corpus
    write_jsonl(tmp_path / "long.jsonl", [" ".join(docs[i::3]) for i in range(3)])
    cfg = cfg_for(root, val_sources=[str(tmp_path / "long.jsonl")], lanes=8)
    per_lane = [lane_windows(cfg, lane) for lane in range(8)]
    assert any(not w for w in per_lane) and sum(map(len, per_lane)) > 40  # the case: empty lanes, enough windows
    quota, dealt = [0] * 8, 0
    for r in range(max(map(len, per_lane))):
        for lane in range(8):
            if dealt < 40 and r < len(per_lane[lane]):
                quota[lane], dealt = quota[lane] + 1, dealt + 1
    expected = [w for lane in range(8) for w in per_lane[lane][: quota[lane]]]
    with caplog.at_level(logging.WARNING):
        one = list(loader(cfg, split="val", val_windows=40))
        two = [list(loader(cfg, split="val", rank=r, world=2, val_windows=40)) for r in range(2)]
    assert "padding" not in caplog.text
    assert windows(one) == expected and len(expected) == 40 and sum(len(b["input"]) for b in one) == 40
    assert Counter(windows(two[0] + two[1])) == Counter(expected) and len(two[0]) == len(two[1])
    total = sum(map(len, per_lane))
    with caplog.at_level(logging.WARNING):
        assert len(windows(list(loader(cfg, split="val", val_windows=total + 5)))) == total
    assert f"holds {total} windows of the {total + 5} asked for" in caplog.text


# --- pre-tokenized shards ----------------------------------------------------------------------------------


def test_pretokenized_matches_streaming(corpus, tmp_path):
    root, _ = corpus
    pretokenize = import_tool("pretokenize")
    pretokenize.pretokenize([str(root / "*.jsonl")], tmp_path / "tok", str(root / "tok.model"), workers=2, parts=3)
    index = json.loads((tmp_path / "tok/index.json").read_text())
    assert index["dtype"] == "uint16" and index["docs"] == 160
    streamed = list(loader(cfg_for(root, lanes=1), split="val"))
    tokens_cfg = cfg_for(root, lanes=1, sources=[str(tmp_path / "tok")], val_sources=[str(tmp_path / "tok")])
    pretokenized = list(loader(tokens_cfg, split="val"))
    assert windows(streamed) == windows(pretokenized)
    train = take(loader(tokens_cfg), 3)
    assert train[0]["input"].dtype == torch.int64


# --- bad input ---------------------------------------------------------------------------------------------


def test_empty_files_are_skipped_and_all_empty_refused(corpus, tmp_path, caplog):
    root, docs = corpus
    (tmp_path / "empty.jsonl").write_text("")
    write_jsonl(tmp_path / "full.jsonl", docs[:5])
    with caplog.at_level(logging.WARNING):
        source = open_source(str(tmp_path / "*.jsonl"))
    assert "empty.jsonl" in caplog.text and len(source.files) == 1
    (tmp_path / "full.jsonl").write_text("")
    with pytest.raises(DataError, match="all 2 files are empty"):
        open_source(str(tmp_path / "*.jsonl"))


def test_bad_jsonl_lines_are_counted_and_logged(tmp_path, caplog):
    good = make_docs(3)
    lines = [json.dumps({"text": good[0]}), "{not json", json.dumps({"title": "x"}), json.dumps({"text": 5}),
             json.dumps({"text": good[1]}), json.dumps({"text": "  "}), json.dumps({"text": good[2]})]  # fmt: skip
    (tmp_path / "d.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "caf\xe9"}\n')
    skips = Skips()
    with caplog.at_level(logging.WARNING):
        got = list(iter_texts(open_source(str(tmp_path / "d.jsonl")), 0, 1, skips))
    assert got == good
    assert skips.counts == {"line is not JSON": 1, "no string field 'text'": 2, "empty document": 1,
                            "undecodable bytes": 1}  # fmt: skip
    assert "d.jsonl at byte" in caplog.text and "line is not JSON" in caplog.text


def test_undecodable_text_file_is_skipped(tmp_path, caplog):
    (tmp_path / "ok.txt").write_text("fine words here")
    (tmp_path / "bad.txt").write_bytes(b"broken \xff\xfe bytes")
    skips = Skips()
    with caplog.at_level(logging.WARNING):
        got = list(iter_texts(open_source(str(tmp_path)), 0, 1, skips))
    assert got == ["fine words here"]
    assert "bad.txt" in caplog.text and "undecodable" in caplog.text


def test_corpus_smaller_than_one_window_per_rank(corpus, tmp_path):
    root, _ = corpus
    write_jsonl(tmp_path / "tiny.jsonl", ["the king", "a river", "one stone", "light"])
    cfg = cfg_for(root, sources=[str(tmp_path / "tiny.jsonl")], val_sources=[str(tmp_path / "tiny.jsonl")])
    with pytest.raises(DataError, match="less than one window"):
        take(loader(cfg, world=2), 1)


def test_configuration_errors(corpus, tmp_path):
    root, _ = corpus
    with pytest.raises(DataError, match="matches no file"):
        loader(cfg_for(root, sources=[str(tmp_path / "nothing*.jsonl")]))
    with pytest.raises(DataError, match="data.lanes=4 is fewer than"):
        loader(cfg_for(root, num_workers=3), world=2)
    with pytest.raises(DataError, match="split"):
        loader(cfg_for(root), split="test")
    few = tmp_path / "few.jsonl"
    write_jsonl(few, make_docs(2))
    with pytest.raises(DataError, match="holds no document"):
        take(loader(cfg_for(root, sources=[str(few)], lanes=8)), 1)


def test_train_tokenizer_tool(corpus, tmp_path):
    root, _ = corpus
    train_tokenizer = import_tool("train_tokenizer")
    path = train_tokenizer.train(
        [str(root / "a.jsonl")], str(tmp_path / "t"), vocab_size=40, model_type="unigram", byte_fallback=False
    )
    tok = load_tokenizer(str(path))
    assert tok.vocab_size == 40 and tok.decode(tok.encode("the king")) == "the king"
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": " "}) + "\n")
    with pytest.raises(DataError, match="no text"):
        train_tokenizer.train([str(tmp_path / "blank.jsonl")], str(tmp_path / "u"))
