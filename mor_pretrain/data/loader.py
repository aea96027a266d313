"""build_dataloader: a StatefulDataLoader of packed windows whose state is the global position of the job.

The state is one count per lane (windows drawn from it so far), the number of batches each rank has taken,
and one Mark per lane: where that lane's reading resumes (dataset.py). Every rank takes the same number of
batches, and every worker's choice of lane is a function of the counts, so each rank replays the choices of
all ranks and workers to get the counts. Marks come with the batches of the rank that reads the lane; saving
gathers them from all ranks (one small all-reduce), so every rank holds the same state. A checkpoint can store
any rank's copy; a job resumed with another data-parallel degree, number of workers or micro batch size
continues every lane exactly where it stopped, re-reading at most one shuffle block per lane: no window is
skipped or drawn twice, and the cost of a resume does not grow with training progress.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from mor_pretrain.config import DataConfig
from mor_pretrain.data.dataset import MARK_FIELDS, PackedDataset, Plan, ValidationWindows, owned_lanes, pick_lane
from mor_pretrain.data.sources import DataError, Source, open_source, tokens_index
from mor_pretrain.data.tokenizer import Tokenizer, load_tokenizer
from mor_pretrain.distributed import host_group

STATE_VERSION = 2


class PackedLoader(StatefulDataLoader):
    """A StatefulDataLoader over a PackedDataset whose state_dict is global (identical on every rank)."""

    def __init__(self, dataset: PackedDataset, *, batch_size: int, num_workers: int):
        with warnings.catch_warnings():
            # torchdata 0.11 (its last release) calls torch.set_vital, which torch now deprecates: a warning on
            # every rank about a line of torchdata that no user can change.
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            super().__init__(
                dataset,
                batch_size=batch_size,
                num_workers=num_workers,
                prefetch_factor=4 if num_workers else None,
                pin_memory=torch.cuda.is_available(),  # copies to the GPU then need no host wait
            )
        plan = dataset.plan
        self._plan = plan
        self._slots = max(num_workers, 1)
        self._owned = [[owned_lanes(plan, r, s, self._slots) for s in range(self._slots)] for r in range(plan.dp_world)]
        self._counts = [0] * plan.num_lanes  # position at the last fold
        self._marks: list[list[int]] = [[] for _ in range(plan.num_lanes)]  # where each lane resumes
        self._batches = 0  # batches per rank taken up to the last fold
        self._pending = 0  # batches taken from the current iterator since the last fold

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._fold()
        ds = self.dataset
        assert isinstance(ds, PackedDataset)
        ds.counts, ds.marks, ds.first_batch = list(self._counts), [list(m) for m in self._marks], self._batches
        for batch in super().__iter__():
            for lane, *mark in batch.pop("position").tolist():
                self._marks[lane] = mark
            self._pending += 1
            yield batch

    def _fold(self) -> None:
        """Replay every rank's lane choices for the batches taken since the last fold."""
        plan = self._plan
        for j in range(self._batches, self._batches + self._pending):
            for rank in range(plan.dp_world):
                owned = self._owned[rank][j % self._slots]
                for _ in range(plan.batch_size):
                    self._counts[pick_lane(self._counts, owned, plan.weights, plan.seed)] += 1
        self._batches += self._pending
        self._pending = 0

    def _gathered_marks(self) -> list[list[int]]:
        """Every lane's Mark, from the rank that reads it; a collective when several ranks run.

        Without a process group a multi-rank loader knows its own lanes' marks only: its state resumes
        this rank, and a layout needing another rank's lane refuses it (load_state_dict)."""
        plan = self._plan
        if plan.dp_world == 1 or not (dist.is_available() and dist.is_initialized()):
            return [list(m) for m in self._marks]
        marks = torch.full((plan.num_lanes, len(MARK_FIELDS)), -1, dtype=torch.int64)
        for lane, mark in enumerate(self._marks):
            if mark and lane % plan.lanes % plan.dp_world == plan.dp_rank:
                marks[lane] = torch.tensor(mark)
        dist.all_reduce(marks, op=dist.ReduceOp.MAX, group=host_group())  # one owner per lane (TP peers agree)
        return [row if row[0] >= 0 else [] for row in marks.tolist()]

    def _identity(self) -> dict[str, Any]:
        plan = self._plan
        return {
            "lanes": plan.lanes,
            "seq_len": plan.seq_len,
            "seed": plan.seed,
            "shuffle_block": plan.shuffle_block,
            "sources": [s.fingerprint() for s in plan.sources],
        }

    def state_dict(self) -> dict[str, Any]:
        """The job's data position: windows drawn per lane, batches per rank and each lane's Mark (fields
        MARK_FIELDS), the same on every rank. Plain ints and lists, JSON-serializable."""
        self._fold()
        return {
            "version": STATE_VERSION,
            **self._identity(),
            "counts": list(self._counts),
            "batches": self._batches,
            "marks": self._gathered_marks(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a saved position; the data-parallel degree, workers and batch size may differ. The
        state comes from a checkpoint's per-rank JSON, which may have been edited: anything but the shape
        state_dict() writes is a DataError saying what was expected."""
        if not isinstance(state_dict, dict):
            raise DataError(
                f"dataloader state must be a JSON object (keys {', '.join(STATE_KEYS)}), got {_described(state_dict)}"
            )
        version = state_dict.get("version")
        if version != STATE_VERSION:
            raise DataError(
                f"dataloader state version {version!r}, expected {STATE_VERSION}"
                + (
                    " (version 1 states hold no read positions; restart the data from a fresh loader)"
                    if version == 1
                    else ""
                )
            )
        for key, now in self._identity().items():
            saved = state_dict.get(key)
            if saved != now:
                raise DataError(
                    f"dataloader state was saved with {key}={saved!r} but this job has {key}={now!r}; "
                    f"the saved position does not apply to this data"
                )
        counts, marks, batches = state_dict.get("counts"), state_dict.get("marks"), state_dict.get("batches")
        if not (isinstance(counts, list) and all(_is_count(c) for c in counts)):
            raise DataError(f"dataloader state 'counts' must be a list of integers >= 0, got {_described(counts)}")
        if not (isinstance(marks, list) and all(isinstance(m, list) and all(_is_int(x) for x in m) for m in marks)):
            raise DataError(f"dataloader state 'marks' must be a list of lists of integers, got {_described(marks)}")
        if not _is_count(batches):
            raise DataError(f"dataloader state 'batches' must be an integer >= 0, got {_described(batches)}")
        assert isinstance(batches, int)
        plan = self._plan
        if len(counts) != plan.num_lanes or len(marks) != plan.num_lanes:
            raise DataError(f"dataloader state holds {len(counts)} lanes, this job has {plan.num_lanes}")
        for lane in range(plan.num_lanes):
            mine = lane % plan.lanes % plan.dp_world == plan.dp_rank
            if mine and counts[lane] and len(marks[lane]) != len(MARK_FIELDS):
                raise DataError(
                    f"dataloader state has no read position for lane {lane} ({counts[lane]} windows drawn): it "
                    "was saved without a process group by a rank that does not read that lane"
                )
        self._counts, self._marks = list(counts), [list(m) for m in marks]  # copies: the caller keeps its state
        self._batches = batches
        self._pending = 0


# What PackedLoader.state_dict() writes, for the message that refuses anything else.
STATE_KEYS = ("version", "lanes", "seq_len", "seed", "shuffle_block", "sources", "counts", "batches", "marks")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_count(x: Any) -> bool:
    return _is_int(x) and x >= 0


def _described(value: Any) -> str:
    """A value of a damaged state for an error message: its JSON type and, shortened, the value."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _open_sources(specs: list[str], cfg: DataConfig, tokenizer: Tokenizer) -> list[Source]:
    sources = [open_source(s, cfg.format, cfg.text_field, cfg.doc_separator) for s in specs]
    for source in sources:
        if source.format == "tokens":
            vocab = tokens_index(source).get("vocab_size")
            if vocab != tokenizer.vocab_size:
                raise DataError(
                    f"pre-tokenized source {source.spec!r} was written with a {vocab}-token vocabulary but "
                    f"data.tokenizer has {tokenizer.vocab_size}"
                )
    return sources


def check_lanes(cfg: DataConfig, dp_world: int, workers: bool = True) -> None:
    """Every (rank, worker) reads lanes of its own: refuse fewer lanes than that (the dry run checks it too)."""
    slots = max(cfg.num_workers, 1) if workers else 1
    if cfg.lanes < dp_world * slots:
        raise DataError(
            f"data.lanes={cfg.lanes} is fewer than data-parallel ranks x workers = {dp_world} x {slots}; "
            f"every (rank, worker) needs a lane of its own: raise data.lanes"
        )


def build_dataloader(
    cfg: DataConfig,
    *,
    split: str,
    seq_len: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_world: int,
    seed: int,
    val_windows: int = 0,
) -> PackedLoader | DataLoader:
    """Batches {"input", "labels"} of shape (micro_batch_size, seq_len) for one data-parallel rank.

    split "train" repeats epochs forever (shuffled when data.shuffle). "val" is the validation set: the first
    `val_windows` windows of data.val_sources, dealt round the lanes (each lane's first windows, in packing
    order; a lane that runs out drops from the deal), the same set on every call and for every layout. Each
    rank reads only its share, in the main process, when iterated, and yields len(loader) batches, the same
    number on every rank (padding windows are fully masked with labels -100).
    """
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    if not 0 <= dp_rank < dp_world:
        raise DataError(f"dp_rank {dp_rank} is not in [0, dp_world={dp_world})")
    train = split == "train"
    check_lanes(cfg, dp_world, workers=train)
    if not train and val_windows < 1:
        raise DataError(f"split 'val' needs val_windows >= 1 (windows in the validation set), got {val_windows}")
    specs = cfg.sources if train else cfg.val_sources
    if not specs:
        raise DataError(f"data.{'sources' if train else 'val_sources'} is empty")
    tokenizer = load_tokenizer(cfg.tokenizer)
    sources = _open_sources(specs, cfg, tokenizer)
    weights = cfg.weights if train and cfg.weights else [1.0] * len(sources)
    plan = Plan(
        sources=sources,
        weights=[w / sum(weights) for w in weights],
        lanes=cfg.lanes,
        seq_len=seq_len,
        seed=seed,
        shuffle_block=cfg.shuffle_buffer if train and cfg.shuffle else 1,
        tokenizer=tokenizer,
        dp_rank=dp_rank,
        dp_world=dp_world,
        batch_size=micro_batch_size,
    )
    if not train:
        return DataLoader(
            ValidationWindows(plan, val_windows), batch_size=micro_batch_size, pin_memory=torch.cuda.is_available()
        )
    return PackedLoader(
        PackedDataset(plan, [0] * plan.num_lanes, [[] for _ in range(plan.num_lanes)]),
        batch_size=micro_batch_size,
        num_workers=cfg.num_workers,
    )
