"""Document sources, read lazily in disjoint parts.

A source is one entry of data.sources (a file, a glob or a directory) in one format. It splits into `parts`
disjoint, deterministic parts: text and jsonl by byte range over the concatenation of its files (a document
belongs to the part in which it starts), parquet and pre-tokenized shards by document range. Reading a part
touches only its own bytes, plus the line that straddles its start.

Every document comes with its position (file index, unit): the byte where it starts (text, jsonl), its row
(parquet) or its index (pre-tokenized). Reading can start again at any such position without touching what
lies before it, which is what makes a resume cost the same early and late in training. Parquet is read in
batches of PARQUET_BATCH_ROWS rows, each by a reader opened for it and closed after (pyarrow decompresses a
whole column chunk per open reader), so a process holds at most one row group's column chunk at a time.

Bad records (undecodable bytes, a jsonl line that is not JSON or lacks the text field, an empty document) are
skipped, counted and logged with their location; empty files are skipped and logged when the source opens.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SUFFIX_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".rst": "text",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
    ".bin": "tokens",
}
TOKENS_INDEX = "index.json"
PARQUET_BATCH_ROWS = 64  # rows decoded at a time per lane
PARQUET_BUFFER_BYTES = 1 << 20  # read buffer of a parquet reader (pyarrow still decompresses whole column chunks)
TOKENS_FORMAT = "mor-pretrain-tokens/1"


class DataError(ValueError):
    """Data that cannot be used; the message names the file, source or setting."""


@dataclass(frozen=True)
class Source:
    """One configured source: its files in order and their sizes (bytes, or documents for parquet/tokens)."""

    spec: str
    format: str
    files: tuple[str, ...]
    sizes: tuple[int, ...]
    text_field: str = "text"
    doc_separator: str = ""
    dtype: str = ""  # tokens format: the shards' integer type

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def fingerprint(self) -> list[object]:
        """What a saved loader position depends on: same spec, format, files and sizes."""
        return [self.spec, self.format, len(self.files), self.total]


class Skips:
    """Counts skipped records by reason; the first few of each reason are logged with their location."""

    def __init__(self, log_first: int = 3) -> None:
        self.counts: Counter[str] = Counter()
        self.log_first = log_first

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if self.counts[reason] <= self.log_first:
            log.warning("skipping %s: %s", where, reason)

    def summary(self) -> str:
        return ", ".join(f"{n} x {reason}" for reason, n in sorted(self.counts.items()))


def resolve_files(spec: str) -> list[Path]:
    """A file, a directory (all files below it, sorted) or a glob (sorted matches); none is an error."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    else:
        files = [path] if path.is_file() else []
    if not files:
        raise DataError(f"data source {spec!r} matches no file")
    return files


def open_source(spec: str, fmt: str = "auto", text_field: str = "text", doc_separator: str = "") -> Source:
    """Resolve a source spec into its files, format and sizes; empty files are skipped with a warning."""
    if fmt == "tokens" or (Path(spec).is_dir() and (Path(spec) / TOKENS_INDEX).is_file()):
        return _open_tokens(spec)
    files = resolve_files(spec)
    if fmt == "auto":
        formats = {SUFFIX_FORMATS.get(f.suffix.lower(), "") for f in files}
        if "" in formats or len(formats) != 1 or "tokens" in formats:
            raise DataError(
                f"data source {spec!r}: cannot tell one format from the file suffixes "
                f"{sorted({f.suffix for f in files})}; set data.format (text, jsonl, parquet) "
                "or point at a pre-tokenized folder"
            )
        fmt = formats.pop()
    sizes = [_parquet_rows(f) if fmt == "parquet" else f.stat().st_size for f in files]
    for f, n in zip(files, sizes, strict=True):
        if n == 0:
            log.warning("skipping empty file %s (data source %r)", f, spec)
    kept = [(str(f), n) for f, n in zip(files, sizes, strict=True) if n > 0]
    if not kept:
        raise DataError(f"data source {spec!r}: all {len(files)} files are empty")
    return Source(spec, fmt, tuple(f for f, _ in kept), tuple(n for _, n in kept), text_field, doc_separator)


def part_range(total: int, part: int, parts: int) -> tuple[int, int]:
    """The [start, end) slice of `total` units that part `part` of `parts` owns."""
    return total * part // parts, total * (part + 1) // parts


def _file_slices(
    source: Source, part: int, parts: int, start: tuple[int, int] | None = None
) -> Iterator[tuple[int, str, int, int]]:
    """(file index, file, local start, local end) for each file that overlaps the part's range, from the
    document position `start` (file index, unit) on when given."""
    lo, hi = part_range(source.total, part, parts)
    begin = 0
    for index, (name, size) in enumerate(zip(source.files, source.sizes, strict=True)):
        a, b = max(lo, begin), min(hi, begin + size)
        if start is not None and index == start[0]:
            a = begin + start[1]
        if a < b and (start is None or index >= start[0]):
            yield index, name, a - begin, b - begin
        begin += size


Doc = tuple[int, int, str]  # (file index, unit where the document starts, text)


def iter_docs(
    source: Source, part: int, parts: int, skips: Skips, start: tuple[int, int] | None = None
) -> Iterator[Doc]:
    """The documents of one part of a text, jsonl or parquet source with their positions, in order;
    from the position `start` (a document's own position) on when given."""
    for index, name, lo, hi in _file_slices(source, part, parts, start):
        if source.format == "jsonl":
            docs = _jsonl_texts(name, lo, hi, source.text_field, skips)
        elif source.format == "parquet":
            docs = _parquet_texts(name, lo, hi, source.text_field, skips)
        elif source.doc_separator:
            docs = _separated_texts(name, lo, hi, source.doc_separator, skips)
        else:
            docs = _whole_file(name, lo, skips)
        for unit, text in docs:
            yield index, unit, text


def iter_texts(source: Source, part: int, parts: int, skips: Skips) -> Iterator[str]:
    """The documents of one part of a text, jsonl or parquet source, in order."""
    for _, _, text in iter_docs(source, part, parts, skips):
        yield text


def _whole_file(name: str, lo: int, skips: Skips) -> Iterator[tuple[int, str]]:
    """One document per file: it belongs to the part holding its first byte."""
    if lo == 0:
        with open(name, "rb") as f:
            text = _decode(f.read(), name, skips)
        if text is not None:
            yield 0, text


def check_readable(source: Source) -> None:
    """Refuse a text, jsonl or parquet source that yields no document at all, with the count of records
    skipped per reason. It reads the whole source when nothing is readable: call it only once a part has
    come out empty."""
    if source.format == "tokens":
        return
    skips = Skips(log_first=0)
    if next(iter_texts(source, 0, 1, skips), None) is not None:
        return
    field = f" with data.text_field {source.text_field!r}" if source.format in ("jsonl", "parquet") else ""
    files = f"its {len(source.files)} file(s), read as {source.format} (data.format){field},"
    raise DataError(
        f"data source {source.spec!r} has no readable document: "
        + (f"{files} gave only skipped records: {skips.summary()}" if skips.counts else f"{files} hold no record")
    )


def _decode(raw: bytes, where: str, skips: Skips) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        skips.add("undecodable bytes", f"{where} ({e.reason} at byte {e.start})")
        return None
    if not text.strip():
        skips.add("empty document", where)
        return None
    return text


def _first_line_start(f, lo: int) -> int:  # type: ignore[no-untyped-def]
    """Offset of the first line that starts at or after `lo`."""
    if lo == 0:
        return 0
    f.seek(lo - 1)
    if f.read(1) == b"\n":
        return lo
    f.readline()
    return int(f.tell())


def _jsonl_texts(name: str, lo: int, hi: int, field: str, skips: Skips) -> Iterator[tuple[int, str]]:
    with open(name, "rb") as f:
        pos = _first_line_start(f, lo)
        f.seek(pos)
        while pos < hi:
            line = f.readline()
            if not line:
                break
            where, start = f"{name} at byte {pos}", pos
            pos += len(line)
            if not line.strip():
                continue  # blank lines hold no document
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                skips.add("undecodable bytes", where)
                continue
            except json.JSONDecodeError:
                skips.add("line is not JSON", where)
                continue
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                skips.add(f"no string field {field!r}", where)
            elif not text.strip():
                skips.add("empty document", where)
            else:
                yield start, text


def _follows_separator(f, pos: int, sep: bytes) -> bool:  # type: ignore[no-untyped-def]
    """True when the line that ends at `pos` is exactly the separator."""
    for newline in (b"\n", b"\r\n"):
        tail = sep + newline
        begin = pos - len(tail)
        if begin < 0:
            continue
        f.seek(begin)
        if f.read(len(tail)) != tail:
            continue
        if begin == 0:
            return True
        f.seek(begin - 1)
        if f.read(1) == b"\n":
            return True
    return False


def _separated_texts(name: str, lo: int, hi: int, separator: str, skips: Skips) -> Iterator[tuple[int, str]]:
    sep = separator.encode("utf-8")
    with open(name, "rb") as f:
        pos = _first_line_start(f, lo)
        # A document starts at the file start or right after a separator line.
        doc_start: int | None = pos if pos == 0 or _follows_separator(f, pos, sep) else None
        if pos >= hi:
            return
        f.seek(pos)
        lines: list[bytes] = []
        while True:
            line = f.readline()
            if not line:
                break
            pos += len(line)
            if line.rstrip(b"\r\n") == sep:
                if doc_start is not None:
                    text = _decode(b"".join(lines), f"{name} at byte {doc_start}", skips)
                    if text is not None:
                        yield doc_start, text
                lines, doc_start = [], pos
                if pos >= hi:  # the next document starts in a later part
                    return
            elif doc_start is not None:
                lines.append(line)
        if doc_start is not None:
            text = _decode(b"".join(lines), f"{name} at byte {doc_start}", skips)
            if text is not None:
                yield doc_start, text


def _import_parquet():  # type: ignore[no-untyped-def]
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("parquet sources need pyarrow: pip install 'mor-pretrain[parquet]'") from None
    return pq


def _open_parquet(path: str | Path, **kw: Any):  # type: ignore[no-untyped-def]
    """A pyarrow ParquetFile; a file that is not parquet is a DataError naming it."""
    pq = _import_parquet()
    try:
        return pq.ParquetFile(path, **kw)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path} is not a readable parquet file: {e}") from None


def _parquet_rows(path: Path) -> int:
    return int(_open_parquet(path).metadata.num_rows)


def _parquet_texts(name: str, lo: int, hi: int, column: str, skips: Skips) -> Iterator[tuple[int, str]]:
    """Rows [lo, hi) of one file, PARQUET_BATCH_ROWS at a time. Between reads no reader stays open: pyarrow
    holds a whole decompressed column chunk per open reader, which across 64 lanes would be 64 row groups."""
    row = lo
    while row < hi:
        values = _parquet_read(name, column, row, min(hi, row + PARQUET_BATCH_ROWS))
        for i, text in enumerate(values, start=row):
            if not isinstance(text, str) or not text.strip():
                skips.add(f"no text in column {column!r}", f"{name} row {i}")
            else:
                yield i, text
        row += len(values)


def _parquet_read(name: str, column: str, lo: int, hi: int) -> list[object]:
    """Rows [lo, hi) of one column: decoded in batches from the start of the row group holding `lo`."""
    pf = _open_parquet(name, buffer_size=PARQUET_BUFFER_BYTES, pre_buffer=False)
    try:
        if column not in pf.schema_arrow.names:
            raise DataError(f"{name}: no column {column!r} (data.text_field); columns: {pf.schema_arrow.names}")
        group, row = 0, 0
        while row + pf.metadata.row_group(group).num_rows <= lo:
            row += pf.metadata.row_group(group).num_rows
            group += 1
        values: list[object] = []
        groups = range(group, pf.num_row_groups)
        for batch in pf.iter_batches(PARQUET_BATCH_ROWS, row_groups=groups, columns=[column], use_threads=False):
            n = batch.num_rows
            if row + n > lo:
                values += batch.column(0).slice(max(lo - row, 0), min(hi, row + n) - max(lo, row)).to_pylist()
            row += n
            if row >= hi:
                break
        return values
    finally:
        pf.close()


def _open_tokens(spec: str) -> Source:
    index_path = Path(spec) / TOKENS_INDEX if Path(spec).is_dir() else Path(spec)
    if not index_path.is_file():
        raise DataError(f"pre-tokenized source {spec!r}: no {TOKENS_INDEX} (write one with tools/pretokenize.py)")
    index = json.loads(index_path.read_text())
    if index.get("format") != TOKENS_FORMAT:
        raise DataError(f"{index_path}: format {index.get('format')!r}, expected {TOKENS_FORMAT!r}")
    shards = [s for s in index["shards"] if s["docs"] > 0]
    if not shards:
        raise DataError(f"{index_path}: no documents")
    files = tuple(str(index_path.parent / s["file"]) for s in shards)
    return Source(spec, "tokens", files, tuple(int(s["docs"]) for s in shards), dtype=index["dtype"])


def tokens_index(source: Source) -> dict:
    """The index.json of a pre-tokenized source (dtype, tokenizer, vocab size, shards)."""
    index_path = Path(source.files[0]).parent / TOKENS_INDEX
    return dict(json.loads(index_path.read_text()))


def offsets_path(shard: str | Path) -> Path:
    """Where a token shard keeps its document offsets (int64, documents + 1 entries)."""
    return Path(shard).with_suffix(".idx.npy")


def iter_token_docs(
    source: Source, part: int, parts: int, start: tuple[int, int] | None = None
) -> Iterator[tuple[int, int, np.ndarray]]:
    """The documents of one part of a pre-tokenized source with their positions (file index, document), as
    read-only views of the memory-mapped shards; from the position `start` on when given."""
    for index, name, lo, hi in _file_slices(source, part, parts, start):
        offsets = np.load(offsets_path(name), mmap_mode="r")
        tokens = np.memmap(name, dtype=source.dtype, mode="r")
        for d in range(lo, hi):
            yield index, d, tokens[offsets[d] : offsets[d + 1]]
