"""Loader throughput in tokens/s per worker: streaming (tokenize on the fly) or pre-tokenized.

    python tools/bench_data.py jsonl data/corpus/train 2      # or: tokens data/tokens/train 0
"""
import sys
import time

from mor_pretrain.config import DataConfig
from mor_pretrain.data import build_dataloader

fmt, src, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = DataConfig(sources=[src], val_sources=[src], num_workers=workers, format=fmt if fmt == "tokens" else "auto")
dl = build_dataloader(cfg, split="train", seq_len=2048, micro_batch_size=8, dp_rank=0, dp_world=1, seed=0)
it = iter(dl); next(it)
t = time.perf_counter(); n = 0
while time.perf_counter() - t < 30:
    b = next(it); n += b["input"].numel()
dt = time.perf_counter() - t
print(f"{fmt}: workers={workers} {n/dt:,.0f} tokens/s total, {n/dt/max(workers,1):,.0f} per worker")
