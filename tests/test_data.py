"""Data pipeline: tokenizer, byte-range parts, packing, exactly-once sharding, exact and resharded resume,
pre-tokenized shards and bad input. Everything runs on a small corpus written here and a 400-piece
SentencePiece model trained here (about a second)."""

import importlib
import json
import logging
import pickle
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import train_bpe

from mor_pretrain.config import DataConfig
from mor_pretrain.data import DataError, build_dataloader, load_tokenizer, resolve_vocab_size
from mor_pretrain.data.sources import Skips, iter_texts, open_source

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "was", "with", "be", "king", "river", "stone"]
SEQ = 16


def import_tool(name: str):
    """A module from tools/ (command lines, not a package)."""
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


def loader(cfg: DataConfig, split="train", rank=0, world=1, batch=4, seed=0):
    return build_dataloader(
        cfg, split=split, seq_len=SEQ, micro_batch_size=batch, dp_rank=rank, dp_world=world, seed=seed
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


@pytest.mark.parametrize(("world_a", "world_b"), [(2, 1), (1, 2)])
def test_resume_with_another_dp_degree(corpus, world_a, world_b):
    root, _ = corpus
    cfg_a = cfg_for(root, num_workers=2 if world_a == 2 else 0)
    cfg_b = cfg_for(root, num_workers=2 if world_b == 2 else 0)
    steps_a, steps_b = 10, 14
    loaders = [loader(cfg_a, rank=r, world=world_a) for r in range(world_a)]
    seen = [w for dl in loaders for w in windows(take(dl, steps_a))]
    states = [dl.state_dict() for dl in loaders]
    assert all(s == states[0] for s in states)  # global position: any rank's copy will do
    for r in range(world_b):
        dl = loader(cfg_b, rank=r, world=world_b)
        dl.load_state_dict(states[0])
        seen += windows(take(dl, steps_b))
    total = steps_a * world_a + steps_b * world_b  # batches of 4 windows taken in all
    reference = windows(take(loader(cfg_for(root)), total))
    assert Counter(seen) == Counter(reference)


def test_resume_refuses_other_data(corpus):
    root, _ = corpus
    dl = loader(cfg_for(root))
    take(dl, 2)
    other = loader(cfg_for(root), seed=1)
    with pytest.raises(DataError, match="seed"):
        other.load_state_dict(dl.state_dict())


def test_weighted_mixing(corpus):
    root, _ = corpus
    cfg = cfg_for(root, sources=[str(root / "a.jsonl"), str(root / "b.jsonl")], weights=[4, 1])
    dl = loader(cfg)
    take(dl, 100)
    counts = dl.state_dict()["counts"]
    share = sum(counts[:4]) / sum(counts)
    assert 0.74 < share < 0.86, share


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
    with pytest.raises(DataError, match="less than one window of seq_len"):
        loader(cfg, split="val", world=2)


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
