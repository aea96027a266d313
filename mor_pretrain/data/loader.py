"""build_dataloader: a StatefulDataLoader of packed windows whose state is the global position of the job.

The state is one count per lane (windows drawn from it so far) plus the number of batches each rank has taken.
Every rank takes the same number of batches, and every worker's choice of lane is a function of the counts
(dataset.py), so each rank replays the choices of all ranks and all workers and holds the same state. A
checkpoint can store any rank's copy; a job resumed with another data-parallel degree, number of workers or
micro batch size continues every lane exactly where it stopped: no window is skipped or drawn twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from mor_pretrain.config import DataConfig
from mor_pretrain.data.dataset import PackedDataset, Plan, owned_lanes, pass_windows, pick_lane
from mor_pretrain.data.sources import DataError, Source, open_source, tokens_index
from mor_pretrain.data.tokenizer import Tokenizer, load_tokenizer

STATE_VERSION = 1


class PackedLoader(StatefulDataLoader):
    """A StatefulDataLoader over a PackedDataset whose state_dict is global (identical on every rank)."""

    def __init__(self, dataset: PackedDataset, *, batch_size: int, num_workers: int):
        super().__init__(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            prefetch_factor=4 if num_workers else None,
        )
        plan = dataset.plan
        self._plan = plan
        self._slots = max(num_workers, 1)
        self._owned = [[owned_lanes(plan, r, s, self._slots) for s in range(self._slots)] for r in range(plan.dp_world)]
        self._counts = [0] * plan.num_lanes  # position at the last fold
        self._batches = 0  # batches per rank taken up to the last fold
        self._pending = 0  # batches taken from the current iterator since the last fold

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._plan.finite:  # validation: every iterator is one fresh pass
            yield from super().__iter__()
            return
        self._fold()
        ds = self.dataset
        assert isinstance(ds, PackedDataset)
        ds.counts, ds.first_batch = list(self._counts), self._batches
        for batch in super().__iter__():
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
        """The job's data position: windows drawn per lane and batches per rank (same on every rank)."""
        self._fold()
        return {"version": STATE_VERSION, **self._identity(), "counts": list(self._counts), "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a saved position; the data-parallel degree, workers and batch size may differ."""
        if state_dict.get("version") != STATE_VERSION:
            raise DataError(f"dataloader state version {state_dict.get('version')!r}, expected {STATE_VERSION}")
        for key, now in self._identity().items():
            saved = state_dict.get(key)
            if saved != now:
                raise DataError(
                    f"dataloader state was saved with {key}={saved!r} but this job has {key}={now!r}; "
                    f"the saved position does not apply to this data"
                )
        self._counts = [int(c) for c in state_dict["counts"]]
        self._batches = int(state_dict["batches"])
        self._pending = 0


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


def build_dataloader(
    cfg: DataConfig,
    *,
    split: str,
    seq_len: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_world: int,
    seed: int,
) -> PackedLoader:
    """Batches {"input", "labels"} of shape (micro_batch_size, seq_len) for one data-parallel rank.

    split "train" repeats epochs forever (shuffled when data.shuffle); "val" is one pass over
    data.val_sources in order, with the same number of batches on every rank (padding windows are fully
    masked with labels -100).
    """
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    if not 0 <= dp_rank < dp_world:
        raise DataError(f"dp_rank {dp_rank} is not in [0, dp_world={dp_world})")
    slots = max(cfg.num_workers, 1)
    if cfg.lanes < dp_world * slots:
        raise DataError(
            f"data.lanes={cfg.lanes} is fewer than data-parallel ranks x workers = {dp_world} x {slots}; "
            f"every (rank, worker) needs a lane of its own: raise data.lanes"
        )
    train = split == "train"
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
        finite=not train,
    )
    val_batches = _count_val_batches(plan, slots) if not train else 0
    return PackedLoader(
        PackedDataset(plan, [0] * plan.num_lanes, 0, val_batches),
        batch_size=micro_batch_size,
        num_workers=cfg.num_workers,
    )


def _count_val_batches(plan: Plan, slots: int) -> int:
    """Batches every (rank, worker) yields in one validation pass: enough for the fullest one."""
    windows, tokens = [], 0
    for lane in range(plan.num_lanes):
        sizes = [real for _, real in pass_windows(plan, lane)]
        windows.append(len(sizes))
        tokens += sum(sizes)
    if tokens < plan.dp_world * (plan.seq_len + 1):
        raise DataError(
            f"validation data {[s.spec for s in plan.sources]} holds {tokens} tokens, less than one window of "
            f"seq_len+1={plan.seq_len + 1} per rank ({plan.dp_world} ranks)"
        )
    per_slot = [
        sum(windows[lane] for group in owned_lanes(plan, r, s, slots) for lane in group)
        for r in range(plan.dp_world)
        for s in range(slots)
    ]
    return max(math.ceil(n / plan.batch_size) for n in per_slot)
