"""Data loader benchmarks.

Throughput on an existing corpus (tokens/s per worker, streaming or pre-tokenized):

    python tools/bench_data.py throughput jsonl data/corpus/train 2      # or: throughput tokens data/tokens/train 0

At corpus scale: writes a synthetic corpus of `--gb` GB of text (documents of 200 to 5,000 words cut at random
from data/corpus/train) as many jsonl shards, as parquet with 1,000-document row groups, as parquet with one
row group per file and as pre-tokenized shards (random token ids, the same token count), then measures for each
format, each in a fresh process: time to the first batch, steady tokens/s and peak RSS, fresh and resumed from
states saved after 400, 1,600 and 6,400 batches and in a later epoch (on a slice of the corpus); validation
start-up on a small and a large split; the pre-tokenizing rate. Prints markdown tables; deletes the corpus.

    python tools/bench_data.py scale --root /tmp/mor-data-bench --gb 0.25
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from queue import Empty
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the package imports torch (and numpy): each function imports what it runs, so --help is quick
    from mor_pretrain.config import DataConfig

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ["jsonl", "parquet-1000", "parquet-1rg", "tokens"]
PARQUET_SHARDS = 20  # jsonl shards per parquet file


def loader(cfg: DataConfig, seq_len: int, batch: int, split: str = "train", val_windows: int = 0) -> Any:
    from mor_pretrain.data import build_dataloader

    return build_dataloader(
        cfg,
        split=split,
        seq_len=seq_len,
        micro_batch_size=batch,
        dp_rank=0,
        dp_world=1,
        seed=0,
        val_windows=val_windows,
    )


def throughput(args: argparse.Namespace) -> None:
    from mor_pretrain.config import DataConfig

    cfg = DataConfig(sources=[args.source], val_sources=[args.source], format=args.format, num_workers=args.workers)
    batches = iter(loader(cfg, args.seq_len, args.batch))
    next(batches)  # start-up (filling every lane's shuffle block) is not throughput
    start, tokens = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:
        tokens += next(batches)["input"].numel()
    rate = tokens / (time.perf_counter() - start)
    print(f"{args.format}, {args.workers} workers: {rate:,.0f} tokens/s, {rate / max(args.workers, 1):,.0f} per worker")


# --- synthetic corpus --------------------------------------------------------------------------------------


def synthetic_docs(total_bytes: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """Documents of 200 to 5,000 words cut at random from the default corpus, until `total_bytes` of text."""
    words: list[str] = []
    for shard in sorted((ROOT / "data/corpus/train").glob("*.jsonl")):
        for line in shard.open():
            words += json.loads(line)["text"].split(" ")
    rng = random.Random(seed)
    written = 0
    while written < total_bytes:
        n = rng.randint(200, 5000)
        start = rng.randrange(len(words) - n)
        text = " ".join(words[start : start + n])
        written += len(text.encode())
        yield text


def write_corpus(out: Path, total_bytes: int, shard_bytes: int) -> dict[str, Path]:
    """The same documents as jsonl shards of `shard_bytes`, parquet files of PARQUET_SHARDS times that with
    1,000-document row groups and with one row group per file, and pre-tokenized shards of random ids with
    the same token count (at the tokenizer's measured tokens per byte)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mor_pretrain.data import load_tokenizer

    dirs = {name: out / name for name in FORMATS}
    for d in dirs.values():
        d.mkdir(parents=True)
    shard: list[str] = []
    group: list[str] = []
    shards = size = 0

    def flush_parquet() -> None:
        name = f"shard-{shards // PARQUET_SHARDS:05d}.parquet"
        table = pa.table({"text": group})
        pq.write_table(table, dirs["parquet-1000"] / name, row_group_size=1000)
        pq.write_table(table, dirs["parquet-1rg"] / name, row_group_size=len(group))
        group.clear()

    for text in synthetic_docs(total_bytes):
        shard.append(text)
        size += len(text.encode())
        if size >= shard_bytes:
            with open(dirs["jsonl"] / f"shard-{shards:05d}.jsonl", "w") as f:
                f.writelines(json.dumps({"text": d}) + "\n" for d in shard)
            group += shard
            shards, shard, size = shards + 1, [], 0
            if shards % PARQUET_SHARDS == 0:
                flush_parquet()
    if shard:
        with open(dirs["jsonl"] / f"shard-{shards:05d}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in shard)
        group += shard
        shards += 1
    if group:
        flush_parquet()
    tok = load_tokenizer("default")
    with open(dirs["jsonl"] / "shard-00000.jsonl") as f:
        sample = [json.loads(line)["text"] for line in f][:50]
    per_byte = sum(len(tok.encode(t)) for t in sample) / sum(len(t.encode()) for t in sample)
    write_tokens(dirs["tokens"], int(total_bytes * per_byte), shards, tok.vocab_size)
    return dirs


def write_tokens(out: Path, total_tokens: int, shards: int, vocab: int) -> None:
    import numpy as np

    from mor_pretrain.data.sources import TOKENS_FORMAT, offsets_path

    rng = np.random.default_rng(0)
    index: dict[str, Any] = {"format": TOKENS_FORMAT, "dtype": "uint16", "tokenizer": "default", "vocab_size": vocab}
    index["shards"] = []
    for s in range(shards):
        lengths = rng.integers(300, 7000, size=max(total_tokens // shards // 3650, 1))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        name = f"part-{s:05d}.bin"
        rng.integers(3, vocab, size=int(offsets[-1]), dtype=np.uint16).tofile(out / name)
        np.save(offsets_path(out / name), offsets)
        index["shards"].append({"file": name, "docs": len(lengths), "tokens": int(offsets[-1])})
    (out / "index.json").write_text(json.dumps(index))


def count_shards(path: Path) -> int:
    return sum(1 for f in path.iterdir() if f.suffix in (".jsonl", ".parquet", ".bin"))


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


# --- measurements, each in a fresh (forked) process --------------------------------------------------------


def measure(cfg: DataConfig, seq_len: int, batch: int, seconds: float, state: dict | None) -> dict[str, float]:
    """Time to the first batch (from building the loader), steady tokens/s, peak RSS of this process."""
    start = time.perf_counter()
    dl = loader(cfg, seq_len, batch)
    if state is not None:
        dl.load_state_dict(state)
    batches = iter(dl)
    next(batches)
    first = time.perf_counter() - start
    for _ in range(2 * cfg.lanes // batch):  # until every lane has started reading (steady state)
        next(batches)
    warm = time.perf_counter() - start
    start, tokens = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        tokens += next(batches)["input"].numel()
    rate = tokens / (time.perf_counter() - start)
    return {"first_s": first, "warm_s": warm, "tokens_s": rate, "rss_mb": peak_rss()}


def peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def states_at(cfg: DataConfig, seq_len: int, batch: int, points: list[int]) -> dict[int, dict]:
    """Loader states after each of `points` batches, from one uninterrupted run."""
    dl, states, taken = loader(cfg, seq_len, batch), {}, 0
    batches = iter(dl)
    for point in sorted(points):
        while taken < point:
            next(batches)
            taken += 1
        states[point] = dl.state_dict()
    return states


def _child(queue: Any, fn: Any, args: tuple) -> None:
    queue.put(fn(*args))


def in_fresh_process(fn: Any, *args: Any) -> Any:
    """fn(*args) in a forked child: its own peak RSS, no state left from earlier runs."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, args))
    proc.start()
    while proc.is_alive() or not queue.empty():
        try:
            result = queue.get(timeout=1.0)
        except Empty:
            continue
        proc.join()
        return result
    raise RuntimeError(f"{fn.__name__} failed in its process (exit code {proc.exitcode}); see above")


def val_startup(cfg: DataConfig, seq_len: int, batch: int, windows: int) -> dict[str, float]:
    start = time.perf_counter()
    dl = loader(cfg, seq_len, batch, split="val", val_windows=windows)
    built = time.perf_counter() - start
    n = sum(1 for _ in dl)
    return {"build_s": built, "pass_s": time.perf_counter() - start - built, "batches": n}


def pretokenize_rate(source: Path, out: Path, workers: int) -> dict[str, float]:
    """tools/pretokenize.py on `source`: tokens/s with `workers` processes, and tokens per byte of text."""
    cmd = [sys.executable, str(ROOT / "tools/pretokenize.py"), str(source), "--out", str(out)]
    start = time.perf_counter()
    subprocess.run([*cmd, "--workers", str(workers)], check=True, capture_output=True)
    seconds = time.perf_counter() - start
    index = json.loads((out / "index.json").read_text())
    text_bytes = sum(f.stat().st_size for f in source.glob("*.jsonl"))
    return {"tokens": index["tokens"], "seconds": seconds, "tokens_per_byte": index["tokens"] / text_bytes}


def scale(args: argparse.Namespace) -> None:
    import torch

    from mor_pretrain.config import DataConfig
    from mor_pretrain.data.sources import PARQUET_BATCH_ROWS, PARQUET_BUFFER_BYTES

    root = Path(args.root)
    if root.exists():
        raise SystemExit(f"{root} exists; pass a fresh --root (it is deleted at the end)")
    seq, batch = args.seq_len, args.batch
    try:
        start = time.perf_counter()
        # in a child, so that the word list does not count in the measured processes' RSS
        dirs = in_fresh_process(write_corpus, root / "big", int(args.gb * 1e9), int(args.shard_mb * 1e6))
        small = in_fresh_process(write_corpus, root / "small", int(args.small_mb * 1e6), int(args.small_mb * 1e4))
        print(
            f"corpus written in {time.perf_counter() - start:.0f} s: "
            + ", ".join(f"{name} {folder_mb(d):.0f} MB in {count_shards(d)} files" for name, d in dirs.items())
        )
        print(
            f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}, seq_len {seq}, micro batch {batch}, 64 lanes, shuffle_buffer 16, "
            f"0 workers, parquet read {PARQUET_BATCH_ROWS} rows at a time through {PARQUET_BUFFER_BYTES >> 20} MiB\n"
        )
        print(
            f"baseline RSS of a measuring process (torch imported, no loader): {in_fresh_process(peak_rss):,.0f} MB\n"
        )
        print("| format | resume after | first batch (s) | every lane started (s) | steady tokens/s | peak RSS (MB) |")
        print("|---|---|---|---|---|---|")
        for name in args.formats:
            fmt = "tokens" if name == "tokens" else name.split("-")[0]
            cfg = DataConfig(sources=[str(dirs[name])], val_sources=[str(dirs[name])], format=fmt)
            small_cfg = DataConfig(sources=[str(small[name])], val_sources=[str(small[name])], format=fmt)
            states = in_fresh_process(states_at, cfg, seq, batch, args.progress)
            # a later epoch: the small slice holds about 3 passes' worth of windows in `late` batches
            late = args.late_batches
            late_state = in_fresh_process(states_at, small_cfg, seq, batch, [late])[late]
            epoch = max(m[1] for m in late_state["marks"] if m)
            cases = [("fresh", None, cfg)] + [(f"{p:,} batches", states[p], cfg) for p in args.progress]
            cases.append((f"{late:,} batches, epoch {epoch + 1} (small slice)", late_state, small_cfg))
            for label, state, c in cases:
                r = in_fresh_process(measure, c, seq, batch, args.seconds, state)
                print(
                    f"| {name} | {label} | {r['first_s']:.2f} | {r['warm_s']:.2f} | {r['tokens_s']:,.0f} "
                    f"| {r['rss_mb']:,.0f} |",
                    flush=True,
                )
        print("\n| validation split | val_windows | loader built (s) | one pass (s) | batches |")
        print("|---|---|---|---|---|")
        for d in (small["jsonl"], dirs["jsonl"]):
            cfg = DataConfig(sources=[str(d)], val_sources=[str(d)], format="jsonl")
            r = in_fresh_process(val_startup, cfg, seq, batch, args.val_windows)
            print(
                f"| jsonl, {folder_mb(d):.0f} MB | {args.val_windows} | {r['build_s']:.2f} | {r['pass_s']:.2f} "
                f"| {r['batches']} |",
                flush=True,
            )
        shards = sorted(dirs["jsonl"].glob("*.jsonl"))[:2]
        part = root / "pretok-in"
        part.mkdir()
        for f in shards:
            shutil.copy(f, part / f.name)
        r = pretokenize_rate(part, root / "pretok-out", args.workers)
        rate = r["tokens"] / r["seconds"]
        print(
            f"\npretokenize: {r['tokens']:,} tokens from {folder_mb(part):.0f} MB in {r['seconds']:.1f} s with "
            f"{args.workers} workers: {rate:,.0f} tokens/s ({r['tokens_per_byte']:.3f} tokens per byte); "
            f"100 GB = {100e9 * r['tokens_per_byte'] / 1e9:.1f}B tokens"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("throughput", help="tokens/s on an existing corpus")
    p.add_argument("format", choices=["jsonl", "text", "parquet", "tokens"], help="source format")
    p.add_argument("source", help="file, glob or folder")
    p.add_argument("workers", type=int, help="DataLoader worker processes")
    p.add_argument("--seconds", type=float, default=30.0, help="measured after the first batch")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per window")
    p.add_argument("--batch", type=int, default=8, help="windows per batch")
    p = sub.add_parser("scale", help="resume, validation and memory at corpus scale (synthetic corpus)")
    p.add_argument("--root", required=True, help="scratch folder, created and deleted")
    p.add_argument("--gb", type=float, default=0.25, help="text in the synthetic corpus")
    p.add_argument("--shard-mb", type=float, default=2.5, help="text per shard")
    p.add_argument("--small-mb", type=float, default=4.0, help="the slice used for the later-epoch resume")
    p.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS, help="source formats to measure")
    p.add_argument("--progress", type=int, nargs="+", default=[400, 1600, 6400], help="batches before a resume")
    p.add_argument("--late-batches", type=int, default=2000, help="batches before the later-epoch resume")
    p.add_argument("--seconds", type=float, default=3.0, help="steady throughput measured for this long")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    p.add_argument("--batch", type=int, default=8, help="windows per batch")
    p.add_argument("--val-windows", type=int, default=64, help="windows in the validation set")
    p.add_argument("--workers", type=int, default=2, help="pre-tokenizing processes")
    args = parser.parse_args()
    throughput(args) if args.command == "throughput" else scale(args)


if __name__ == "__main__":
    main()
