"""Packed windows from lanes: the global data order that makes loading sharded, resumable and reshardable.

Each source is cut into `lanes` disjoint parts (sources.py). A lane is an endless stream of windows of
seq_len+1 tokens: its documents, each followed by eos, packed back to back; the last window of a pass over the
lane is padded (labels -100 there), so every pass ("epoch") holds the same windows, shuffled within blocks of
`shuffle_block` windows by a seed drawn from (seed, lane, epoch, block).

Lanes are dealt to (rank, worker) slots, so each one reads and tokenizes a disjoint part. A worker emits windows
from its own lanes: a seeded draw picks a source by weight, then it takes the lane of that source it has drawn
fewest windows from. Every choice depends only on how many windows each lane has given, so the position of the
whole job is one count per lane, the same on every rank; any rank can compute it for all ranks (loader.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mor_pretrain.data.sources import DataError, Skips, Source, check_readable, iter_texts, iter_token_docs
from mor_pretrain.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_MASK64 = (1 << 64) - 1


@dataclass
class Plan:
    """Everything a worker needs to produce its windows (picklable)."""

    sources: list[Source]
    weights: list[float]  # sampling weight per source, summing to 1
    lanes: int  # lanes per source
    seq_len: int
    seed: int
    shuffle_block: int  # windows shuffled together within a lane; 1 = keep the packing order
    tokenizer: Tokenizer
    dp_rank: int
    dp_world: int
    batch_size: int
    finite: bool  # one pass over every lane (validation) instead of endless epochs
    lane_windows: list[int] = field(default_factory=list)  # finite: windows per lane, from a counting pass

    @property
    def num_lanes(self) -> int:
        return len(self.sources) * self.lanes


def owned_lanes(plan: Plan, rank: int, slot: int, num_slots: int) -> list[list[int]]:
    """Lane ids (source * lanes + lane) of one (rank, worker slot), grouped by source."""
    mine = [
        lane
        for lane in range(plan.lanes)
        if lane % plan.dp_world == rank and (lane // plan.dp_world) % num_slots == slot
    ]
    return [[s * plan.lanes + lane for lane in mine] for s in range(len(plan.sources))]


def _mix(x: int) -> int:
    """splitmix64 finalizer: a cheap, well-spread hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def pick_lane(counts: list[int], owned: list[list[int]], weights: list[float], seed: int) -> int:
    """The lane a worker takes its next window from: a seeded weighted draw of the source, then that
    source's least-used lane (lowest id on ties). Depends on the counts only, so it can be replayed."""
    source = 0
    if len(owned) > 1:
        drawn = sum(counts[lane] for group in owned for lane in group)
        u = _mix(_mix(seed) ^ _mix(owned[0][0]) ^ drawn) / 2.0**64
        cumulative = 0.0
        for source, w in enumerate(weights):  # noqa: B007 (the last source takes rounding leftovers)
            cumulative += w
            if u < cumulative:
                break
    return min(owned[source], key=lambda lane: (counts[lane], lane))


def _doc_tokens(plan: Plan, source: Source, part: int, skips: Skips) -> Iterator[np.ndarray]:
    if source.format == "tokens":
        yield from iter_token_docs(source, part, plan.lanes)
    else:
        for text in iter_texts(source, part, plan.lanes, skips):
            yield np.asarray(plan.tokenizer.encode(text), dtype=np.int64)


def pass_windows(plan: Plan, lane: int) -> Iterator[tuple[np.ndarray, int]]:
    """One pass over a lane: (window of seq_len+1 tokens, number of real tokens); only the last is padded."""
    source, part = plan.sources[lane // plan.lanes], lane % plan.lanes
    size = plan.seq_len + 1
    eos = np.array([plan.tokenizer.eos_id], dtype=np.int64)
    skips = Skips()
    pending = np.empty(0, dtype=np.int64)
    for doc in _doc_tokens(plan, source, part, skips):
        tokens = np.concatenate([pending, doc, eos])
        full = len(tokens) // size
        for i in range(full):
            yield tokens[i * size : (i + 1) * size], size
        pending = tokens[full * size :]
    if skips.counts:
        log.warning("data source %r, lane %d: skipped %s in one pass", source.spec, part, skips.summary())
    if len(pending):
        pad = np.full(size - len(pending), plan.tokenizer.pad_id, dtype=np.int64)
        yield np.concatenate([pending, pad]), len(pending)


def _block_order(plan: Plan, lane: int, epoch: int, block: int, n: int) -> list[int]:
    if plan.shuffle_block <= 1:
        return list(range(n))
    return np.random.default_rng([plan.seed, lane, epoch, block]).permutation(n).tolist()


def lane_stream(plan: Plan, lane: int, start: int) -> Iterator[tuple[np.ndarray, int]]:
    """The windows of a lane from position `start` on (position = windows already drawn from it).

    Every pass holds the same windows, so once one pass has been counted a position maps to (epoch, offset)
    directly: resuming re-reads at most one pass of the lane.
    """
    position, per_pass = start, 0
    while True:
        epoch, offset = divmod(position, per_pass) if per_pass else (0, position)
        count = tokens = 0
        block: list[tuple[np.ndarray, int]] = []
        windows = pass_windows(plan, lane)
        while True:
            window = next(windows, None)
            if window is not None:
                block.append(window)
                tokens += window[1]
            if len(block) == plan.shuffle_block or (window is None and block):
                first, count = count, count + len(block)
                if count > offset:
                    order = _block_order(plan, lane, epoch, first // plan.shuffle_block, len(block))
                    for j in order[max(offset - first, 0) :]:
                        yield block[j]
                        position += 1
                block = []
            if window is None:
                break
        _check_pass(plan, lane, count, tokens)
        if plan.finite:
            return
        per_pass = count


def _check_pass(plan: Plan, lane: int, windows: int, tokens: int) -> None:
    if plan.finite:  # validation: empty lanes are fine; the loader checks the total
        return
    where = f"data source {plan.sources[lane // plan.lanes].spec!r}, lane {lane % plan.lanes} of {plan.lanes}"
    if windows == 0:
        check_readable(plan.sources[lane // plan.lanes])
        raise DataError(
            f"{where} holds no document: the source has too few documents (or too few usable ones) "
            f"for data.lanes={plan.lanes}; lower data.lanes or add data"
        )
    if tokens < plan.seq_len + 1:
        raise DataError(
            f"{where} holds only {tokens} tokens, less than one window of seq_len+1={plan.seq_len + 1}: "
            f"the corpus is too small for {plan.lanes} lanes at this sequence length; lower data.lanes or "
            f"training.seq_len, or add data"
        )


def to_sample(window: np.ndarray, real: int) -> dict[str, torch.Tensor]:
    """input = window[:-1]; labels = window[1:], -100 where the target is padding."""
    tokens = torch.from_numpy(np.ascontiguousarray(window, dtype=np.int64))
    labels = tokens[1:].clone()
    labels[max(real - 1, 0) :] = IGNORE_INDEX
    return {"input": tokens[:-1].clone(), "labels": labels}


class PackedDataset(IterableDataset):
    """Windows for one data-parallel rank, from position `counts` (windows drawn per lane so far).

    Worker slots: batch j of this rank comes from DataLoader worker j mod K, which serves slot
    (first_batch + j) mod K, so a resumed loader hands each batch to the slot that an uninterrupted one would.
    """

    def __init__(self, plan: Plan, counts: list[int], first_batch: int = 0, val_batches: int = 0):
        self.plan = plan
        self.counts = counts
        self.first_batch = first_batch
        self.val_batches = val_batches  # finite: batches every worker yields (padding included)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        num_slots, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        slot = (worker + self.first_batch) % num_slots
        owned = owned_lanes(self.plan, self.plan.dp_rank, slot, num_slots)
        counts = list(self.counts)
        streams = {lane: lane_stream(self.plan, lane, counts[lane]) for group in owned for lane in group}
        if self.plan.finite:
            yield from self._one_pass(streams, counts)
            return
        while True:
            lane = pick_lane(counts, owned, self.plan.weights, self.plan.seed)
            counts[lane] += 1
            yield to_sample(*next(streams[lane]))

    def _one_pass(
        self, streams: dict[int, Iterator[tuple[np.ndarray, int]]], counts: list[int]
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Every window of the owned lanes once, then fully masked windows up to val_batches batches,
        so that every rank yields the same number of batches."""
        emitted = 0
        live = sorted(streams)
        while live:
            lane = min(live, key=lambda lane: (counts[lane], lane))
            window = next(streams[lane], None)
            if window is None:
                live.remove(lane)
                continue
            counts[lane] += 1
            emitted += 1
            yield to_sample(*window)
        size = self.plan.seq_len + 1
        blank = np.full(size, self.plan.tokenizer.pad_id, dtype=np.int64)
        for _ in range(self.val_batches * self.plan.batch_size - emitted):
            yield to_sample(blank, 0)
