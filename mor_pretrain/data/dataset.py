"""Packed windows from lanes: the global data order that makes loading sharded, resumable and reshardable.

Each source is cut into `lanes` disjoint parts (sources.py). A lane is an endless stream of windows of
seq_len+1 tokens: its documents, each followed by eos, packed back to back; the last window of a pass over the
lane is padded (labels -100 there), so every pass ("epoch") holds the same windows, shuffled within blocks of
`shuffle_block` windows by a seed drawn from (seed, lane, epoch, block).

Lanes are dealt to (rank, worker) slots, so each one reads and tokenizes a disjoint part. A worker emits windows
from its own lanes: a seeded draw picks a source by weight, then it takes the lane of that source it has drawn
fewest windows from. Every choice depends only on how many windows each lane has given, so the position of the
whole job is one count per lane, the same on every rank; any rank can compute it for all ranks (loader.py).

Where a lane's reading resumes is its Mark: the count, epoch and index of its current shuffle block and the
position of that block's first window in the source (document position and token offset inside the document).
A resumed lane seeks there and re-reads one block at most, however far training got.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mor_pretrain.data.sources import DataError, Skips, Source, check_readable, iter_docs, iter_token_docs
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


Start = tuple[int, int, int]  # (file index, document unit, token offset inside the document + its eos)
Window = tuple[np.ndarray, int, Start]  # (seq_len+1 tokens, real tokens, where the window starts)
MARK_FIELDS = ("count", "epoch", "block", "file", "unit", "token")  # a Mark, as saved in the loader state


def _doc_tokens(plan: Plan, source: Source, part: int, skips: Skips, start: Start | None) -> Iterator[tuple]:
    at = None if start is None else start[:2]
    if source.format == "tokens":
        yield from iter_token_docs(source, part, plan.lanes, at)
    else:
        for index, unit, text in iter_docs(source, part, plan.lanes, skips, at):
            yield index, unit, np.asarray(plan.tokenizer.encode(text), dtype=np.int64)


def pass_windows(plan: Plan, lane: int, start: Start | None = None) -> Iterator[Window]:
    """A pass over a lane, from its beginning or from the window that starts at `start`: windows of
    seq_len+1 tokens packed from the documents, each followed by eos; only the last is padded."""
    source, part = plan.sources[lane // plan.lanes], lane % plan.lanes
    size = plan.seq_len + 1
    eos = np.array([plan.tokenizer.eos_id], dtype=np.int64)
    skips = Skips()
    pending, pending_start = np.empty(0, dtype=np.int64), (0, 0, 0)
    for index, unit, doc in _doc_tokens(plan, source, part, skips, start):
        skip = 0
        if start is not None:  # the first document: its tokens before the window start were drawn already
            skip, start = start[2], None
        tokens = np.concatenate([pending, doc, eos])[skip:]
        lead = len(pending)  # tokens before this document's first one; window i > 0 starts inside it
        full = len(tokens) // size
        for i in range(full):
            at = pending_start if i == 0 and lead > 0 else (index, unit, skip + i * size - lead)
            yield tokens[i * size : (i + 1) * size], size, at
        if full or not len(pending):
            pending_start = (index, unit, skip + full * size - lead)
        pending = tokens[full * size :]
    if skips.counts:
        log.warning("data source %r, lane %d: skipped %s in one pass", source.spec, part, skips.summary())
    if len(pending):
        pad = np.full(size - len(pending), plan.tokenizer.pad_id, dtype=np.int64)
        yield np.concatenate([pending, pad]), len(pending), pending_start


def _block_order(plan: Plan, lane: int, epoch: int, block: int, n: int) -> list[int]:
    if plan.shuffle_block <= 1:
        return list(range(n))
    return np.random.default_rng([plan.seed, lane, epoch, block]).permutation(n).tolist()


def lane_stream(plan: Plan, lane: int, count: int, mark: list[int]) -> Iterator[tuple[np.ndarray, int, list[int]]]:
    """The windows of a lane after the first `count`, each with the Mark of its block.

    `mark` is the Mark of the block holding the lane's last drawn window ([] when none was drawn): the stream
    seeks to that block's first window, re-reads the block and skips what was drawn of it.
    """
    if mark:
        base, epoch, block, *at = mark
        start: Start | None = (at[0], at[1], at[2])
    elif count:
        raise DataError(f"lane {lane}: {count} windows drawn but no read position saved for it")
    else:
        base, epoch, block, start = 0, 0, 0, None
    skip = count - base
    while True:
        whole_pass = start is None  # read from its beginning, so its size can be checked
        windows, n, tokens = pass_windows(plan, lane, start), 0, 0
        while block_windows := list(islice(windows, plan.shuffle_block)):
            if skip > len(block_windows):
                raise DataError(
                    f"lane {lane}: the saved position ({count} windows drawn, block {block} of epoch {epoch} "
                    f"from window {base}) lies beyond that block; the data changed since it was saved"
                )
            m = [base, epoch, block, *block_windows[0][2]]
            for j in _block_order(plan, lane, epoch, block, len(block_windows))[skip:]:
                yield block_windows[j][0], block_windows[j][1], m
            skip = 0
            base, block = base + len(block_windows), block + 1
            n, tokens = n + len(block_windows), tokens + sum(w[1] for w in block_windows)
        if whole_pass:
            _check_pass(plan, lane, n, tokens)
        epoch, block, start = epoch + 1, 0, None


def _check_pass(plan: Plan, lane: int, windows: int, tokens: int) -> None:
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
    """Training windows for one data-parallel rank, endlessly, from position `counts` (windows drawn per lane
    so far) and `marks` (where each lane's reading resumes).

    Worker slots: batch j of this rank comes from DataLoader worker j mod K, which serves slot
    (first_batch + j) mod K, so a resumed loader hands each batch to the slot that an uninterrupted one would.
    Each sample carries "position": its lane and the Mark of its block, for the loader's state.
    """

    def __init__(self, plan: Plan, counts: list[int], marks: list[list[int]], first_batch: int = 0):
        self.plan = plan
        self.counts = counts
        self.marks = marks
        self.first_batch = first_batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        num_slots, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        slot = (worker + self.first_batch) % num_slots
        owned = owned_lanes(self.plan, self.plan.dp_rank, slot, num_slots)
        counts = list(self.counts)
        streams = {
            lane: lane_stream(self.plan, lane, counts[lane], self.marks[lane]) for group in owned for lane in group
        }
        while True:
            lane = pick_lane(counts, owned, self.plan.weights, self.plan.seed)
            counts[lane] += 1
            window, real, mark = next(streams[lane])
            yield to_sample(window, real) | {"position": torch.tensor([lane, *mark], dtype=torch.int64)}


def val_quota(plan: Plan, windows: int) -> list[int]:
    """Validation windows per lane, dealt one at a time round the lanes until `windows` are dealt; a lane
    that runs out drops from the deal, so short lanes (a split of few, long documents leaves some lanes empty)
    cost no windows while the split holds enough. With no short lane this is the even spread, the first
    lanes taking the remainder. Reads the dealt windows once (every rank deals the same set)."""
    streams = {lane: pass_windows(plan, lane) for lane in range(plan.num_lanes)}
    quota, dealt = [0] * plan.num_lanes, 0
    while streams and dealt < windows:
        for lane in list(streams):
            if dealt == windows:
                break
            if next(streams[lane], None) is None:
                del streams[lane]
                continue
            quota[lane] += 1
            dealt += 1
    return quota


def val_rank_lanes(plan: Plan, rank: int) -> list[int]:
    """The lanes whose validation windows a rank evaluates (those it reads in training)."""
    return [lane for lane in range(plan.num_lanes) if lane % plan.lanes % plan.dp_world == rank]


class ValidationWindows(IterableDataset):
    """The validation set: the first val_quota windows of every lane, in packing order, read on demand.

    The set depends only on the data, lanes, seq_len and `windows`, never on the layout: rank r evaluates
    the lanes it reads in training, and every rank yields the same number of samples (the fullest rank's
    count), padded with fully masked windows. Building it reads nothing; the first use deals the set once,
    and each iteration then reads only the windows it yields.
    """

    def __init__(self, plan: Plan, windows: int):
        self.plan = plan
        self.windows = windows
        self._quota: list[int] | None = None

    @property
    def quota(self) -> list[int]:
        if self._quota is None:  # dealt on first use, so building the loader reads nothing
            self._quota = val_quota(self.plan, self.windows)
            if sum(self._quota) < self.windows:
                log.warning(
                    "the validation split holds %d windows of the %d asked for; the rest is padding",
                    sum(self._quota),
                    self.windows,
                )
        return self._quota

    @property
    def samples(self) -> int:
        """Samples each rank yields: the fullest rank's share, rounded up to whole batches."""
        most = max(sum(self.quota[lane] for lane in val_rank_lanes(self.plan, r)) for r in range(self.plan.dp_world))
        return math.ceil(most / self.plan.batch_size) * self.plan.batch_size

    def __len__(self) -> int:
        return self.samples

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        emitted = 0
        for lane in val_rank_lanes(self.plan, self.plan.dp_rank):
            for window, real, _ in islice(pass_windows(self.plan, lane), self.quota[lane]):
                emitted += 1
                yield to_sample(window, real)
        blank = np.full(self.plan.seq_len + 1, self.plan.tokenizer.pad_id, dtype=np.int64)
        for _ in range(self.samples - emitted):
            yield to_sample(blank, 0)
