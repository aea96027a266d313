"""Loader throughput in tokens/s per worker: streaming (tokenize on the fly) or pre-tokenized.

python tools/bench_data.py jsonl data/corpus/train 2      # or: tokens data/tokens/train 0
"""

from __future__ import annotations

import argparse
import time

from mor_pretrain.config import DataConfig
from mor_pretrain.data import build_dataloader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=["jsonl", "text", "parquet", "tokens"], help="source format")
    parser.add_argument("source", help="file, glob or folder")
    parser.add_argument("workers", type=int, help="DataLoader worker processes")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured after the first batch")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per window")
    parser.add_argument("--batch", type=int, default=8, help="windows per batch")
    args = parser.parse_args()
    cfg = DataConfig(sources=[args.source], val_sources=[args.source], format=args.format, num_workers=args.workers)
    loader = build_dataloader(
        cfg, split="train", seq_len=args.seq_len, micro_batch_size=args.batch, dp_rank=0, dp_world=1, seed=0
    )
    batches = iter(loader)
    next(batches)  # start-up (filling every lane's shuffle block) is not throughput
    start, tokens = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:
        tokens += next(batches)["input"].numel()
    rate = tokens / (time.perf_counter() - start)
    print(f"{args.format}, {args.workers} workers: {rate:,.0f} tokens/s, {rate / max(args.workers, 1):,.0f} per worker")


if __name__ == "__main__":
    main()
