"""Tokenize text/jsonl/parquet sources once into memory-mapped token shards for data.format = "tokens".

Each source splits into parts (the same byte/row ranges the streaming loader uses); worker processes tokenize
parts in parallel, each into `part-NNNNN.bin` (uint16 when the vocabulary fits, else uint32) with its document
offsets in `part-NNNNN.idx.npy`. `index.json`, written last, lists the shards: a folder without it is incomplete.

    python tools/pretokenize.py data/corpus/train --out data/tokens/train --workers 2
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the package (and torch with it) loads where used: --help answers at once
    from mor_pretrain.data.sources import Source
    from mor_pretrain.data.tokenizer import Tokenizer

FLUSH_TOKENS = 1 << 20  # tokens buffered per write


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def write_part(task: tuple[Source, int, int, Tokenizer, str]) -> tuple[str, int, int, str]:
    """Tokenize one part of a source into a shard; returns (file name, documents, tokens, skip summary)."""
    from mor_pretrain.data.sources import Skips, iter_texts, offsets_path

    source, part, parts, tokenizer, path = task
    dtype = token_dtype(tokenizer.vocab_size)
    skips = Skips()
    offsets, pending, written = [0], [], 0
    with open(path, "wb") as f:
        for text in iter_texts(source, part, parts, skips):
            ids = np.asarray(tokenizer.encode(text), dtype=dtype)
            pending.append(ids)
            offsets.append(offsets[-1] + len(ids))
            if offsets[-1] - written >= FLUSH_TOKENS:
                f.write(np.concatenate(pending).tobytes())
                pending, written = [], offsets[-1]
        if pending:
            f.write(np.concatenate(pending).tobytes())
    np.save(offsets_path(path), np.asarray(offsets, dtype=np.int64))
    return Path(path).name, len(offsets) - 1, offsets[-1], skips.summary()


def pretokenize(
    specs: list[str],
    output: Path,
    tokenizer_spec: str = "default",
    fmt: str = "auto",
    text_field: str = "text",
    doc_separator: str = "",
    workers: int = 1,
    parts: int = 0,
) -> dict:
    """Write the token shards and index.json under `output`; returns the index."""
    from tqdm import tqdm

    from mor_pretrain.data.sources import TOKENS_FORMAT, TOKENS_INDEX, DataError, open_source, part_range
    from mor_pretrain.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_spec)
    sources = [open_source(s, fmt, text_field, doc_separator) for s in specs]
    if any(s.format == "tokens" for s in sources):
        raise DataError("the inputs are already pre-tokenized")
    parts = parts or 4 * workers
    output.mkdir(parents=True, exist_ok=True)
    (output / TOKENS_INDEX).unlink(missing_ok=True)
    tasks, sizes = [], []
    for source in sources:
        for part in range(parts):
            path = str(output / f"part-{len(tasks):05d}.bin")
            tasks.append((source, part, parts, tokenizer, path))
            lo, hi = part_range(source.total, part, parts)
            sizes.append(hi - lo)
    shards = []
    start = time.perf_counter()
    with (
        # fork: workers start in milliseconds instead of re-importing torch
        mp.get_context("fork").Pool(workers) as pool,
        tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="pretokenize") as bar,
    ):
        for (name, docs, tokens, skipped), size in zip(pool.imap(write_part, tasks), sizes, strict=True):
            shards.append({"file": name, "docs": docs, "tokens": tokens})
            if skipped:
                logging.warning("%s: skipped %s", name, skipped)
            bar.update(size)
    total = sum(s["tokens"] for s in shards)
    if total == 0:
        raise DataError(f"no tokens in {specs}: every document was empty or skipped")
    index = {
        "format": TOKENS_FORMAT,
        "dtype": token_dtype(tokenizer.vocab_size),
        "tokenizer": tokenizer.path,
        "vocab_size": tokenizer.vocab_size,
        "sources": specs,
        "docs": sum(s["docs"] for s in shards),
        "tokens": total,
        "shards": shards,
    }
    tmp = output / (TOKENS_INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(output / TOKENS_INDEX)
    seconds = time.perf_counter() - start
    print(f"{total:,} tokens in {index['docs']:,} documents, {seconds:.1f} s ({total / seconds:,.0f} tokens/s)")
    return index


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="files, globs or directories")
    parser.add_argument("--out", required=True, type=Path, help="folder for the shards and index.json")
    parser.add_argument("--tokenizer", default="default", help='SentencePiece .model, or "default"')
    parser.add_argument(
        "--format", default="auto", choices=["auto", "text", "jsonl", "parquet"], help="source format; auto = by suffix"
    )
    parser.add_argument("--text-field", default="text", help="jsonl field / parquet column")
    parser.add_argument("--doc-separator", default="", help="text files: line that separates documents")
    parser.add_argument("--workers", type=int, default=2, help="tokenizing processes")
    parser.add_argument("--parts", type=int, default=0, help="parts per source (default 4 x workers)")
    args = parser.parse_args(argv)
    from mor_pretrain.data.sources import DataError

    try:
        pretokenize(
            args.sources,
            args.out,
            args.tokenizer,
            args.format,
            args.text_field,
            args.doc_separator,
            args.workers,
            args.parts,
        )
    except (DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
