"""Continuous depth-wise batching: the MoR paper's throughput engine.

A queue of requests feeds a fixed number of slots. Each slot has one token in flight, at its own recursion
step. One engine iteration applies the shared stack ONCE to every slot together, each row reading and
writing the cache of its own step, so tokens at different depths share one batch. Rows whose token exits
(router says stop, depth cap, or last step) go through the last block and the head; the sampled token
enters the first block and step 0 in the same iteration, and a finished sequence's slot is refilled from
the queue at once. Prompts are prefilled one request at a time with `generate.forward_cached` on a view of
the slot's caches.

Shapes: each layer's cache is one static buffer (slots, kv_heads, sum of step capacities + 1, head_dim)
holding every step's region end to end, and the stack pass always runs all slots (idle rows masked), so it
can be captured by torch.compile / CUDA graphs on a GPU. Each row gathers a fixed-width window at its
step's offset; boolean SDPA masks hide what is not its own. Rows that must not store (idle rows,
KV-sharing steps > 0) write into a scratch slot at the end that no mask shows. The exit pass (last block,
head, sampling, first block) runs on the exiting rows only.

Memory: `step_cache_fractions` sizes step r's region to a fraction of max_len (recursion-wise caching
needs only the tokens that reach a step). A token whose step cache is full exits before that step
(counted in stats["cache_full_exits"]); the default, full regions, never turns a token away.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mor_pretrain.generate import (
    DepthControl,
    Generation,
    KVGroup,
    ModelCache,
    SamplingConfig,
    _Stopper,
    forward_cached,
    lm_head,
    sample,
)
from mor_pretrain.models import MoRModel
from mor_pretrain.models.layers import Block, CacheView


@dataclass
class _Request:
    index: int
    prompt: list[int]
    stopper: _Stopper
    tokens: list[int]
    depths: list[int]
    finish: str = "length"


def _attend_rows(
    blk: Block,
    x: torch.Tensor,
    rope: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    rows: torch.Tensor,
    slot: torch.Tensor,
    window: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Block.forward for one token per row over this engine's cache layout. x: (n, 1, dim); the row's new K/V
    go to buf[rows, :, slot], then it attends to its cache window buf[rows, :, window[row]] under mask
    (n, 1, 1, width)."""

    def write(k: torch.Tensor, v: torch.Tensor) -> None:  # (n, kv_heads, 1, head_dim)
        k_buf[rows, :, slot] = k[:, :, 0]
        v_buf[rows, :, slot] = v[:, :, 0]

    def read() -> tuple[torch.Tensor, torch.Tensor]:  # (n, kv_heads, width, head_dim) copies
        return k_buf[rows[:, None], :, window].transpose(1, 2), v_buf[rows[:, None], :, window].transpose(1, 2)

    return blk(x, rope, mask, cache=CacheView(write, read))[0]


class _Buffers:
    """Static caches of `n_layers` layers for every slot: one region per group (recursion step) of
    capacities[g] tokens, end to end, then one scratch slot."""

    def __init__(self, model: MoRModel, n_layers: int, slots: int, capacities: list[int]):
        a, w = model.args, model.tok_embeddings.weight
        self.capacities = capacities
        self.offsets = [sum(capacities[:g]) for g in range(len(capacities))]
        self.scratch = sum(capacities)
        shape = (slots, a.n_kv_heads, self.scratch + 1, a.head_dim)
        self.k = [w.new_zeros(shape) for _ in range(n_layers)]
        self.v = [w.new_zeros(shape) for _ in range(n_layers)]
        self.pos = torch.zeros(slots, self.scratch + 1, dtype=torch.long, device=w.device)
        self.length = torch.zeros(len(capacities), slots, dtype=torch.long, device=w.device)
        self.capacity = torch.tensor(capacities, device=w.device)
        self.offset = torch.tensor(self.offsets, device=w.device)
        self.span = torch.arange(max(capacities), device=w.device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def view(self, group: int, slot: int) -> KVGroup:
        """One slot's region of one step as a KVGroup; writes through it land in these buffers."""
        s, r = slice(slot, slot + 1), slice(self.offsets[group], self.offsets[group] + self.capacities[group])
        return KVGroup(
            [k[s, :, r] for k in self.k], [v[s, :, r] for v in self.v], self.pos[s, r], self.length[group, s]
        )

    def room(self, group: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.length[group, rows] < self.capacity[group]

    def prepare(
        self, group: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, store: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reserve the next slot of each storing row's region (others get the scratch slot); returns
        (slot, window, mask): where to write, which slots each row reads, which of those it may see."""
        length = self.length[group, rows]
        slot = torch.where(store, self.offset[group] + length, self.scratch)
        self.pos[rows, slot] = pos
        length = length + store.long()
        self.length[group, rows] = length
        window = (self.offset[group][:, None] + self.span).clamp(max=self.scratch)
        return slot, window, (self.span[None, :] < length[:, None])[:, None, None, :]


class DepthBatchEngine:
    """Serve many requests through `slots` rows with continuous depth-wise batching."""

    def __init__(
        self,
        model: MoRModel,
        slots: int,
        max_len: int,
        sampling: SamplingConfig | None = None,
        ctl: DepthControl | None = None,
        decode: Callable[[list[int]], str] | None = None,
        step_cache_fractions: list[float] | None = None,
    ):
        """step_cache_fractions: per recursion step, its cache length as a fraction of max_len (default all
        1: exact). Smaller regions save memory; a token finding its step's region full exits early. With
        KV sharing only step 0 stores, so only the first value is used."""
        a = model.args
        if a.sharing not in ("cycle", "middle_cycle"):
            raise ValueError(
                f"depth-wise batching applies the shared stack per step; sharing {a.sharing!r} has no steps"
            )
        if max_len > a.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds model.max_seq_len={a.max_seq_len}")
        self.model, self.slots, self.max_len = model, slots, max_len
        self.sampling, self.ctl, self.decode = sampling or SamplingConfig(), ctl or DepthControl(), decode
        self.sampling.validate()
        self.ctl.validate(model)
        dev = model.tok_embeddings.weight.device
        # Greedy decoding draws nothing: no generator (a CUDA one needs the driver, which a fake-tensor trace lacks).
        greedy = self.sampling.temperature == 0
        self.generator = None if greedy else torch.Generator(device=dev).manual_seed(self.sampling.seed)
        self.layers = [blk for blk in model.stack.layers if isinstance(blk, Block)]
        fractions = step_cache_fractions or [1.0] * a.num_recursions
        if len(fractions) != a.num_recursions or not all(0.0 < f <= 1.0 for f in fractions):
            raise ValueError(f"step_cache_fractions needs {a.num_recursions} values in (0, 1], got {fractions}")
        groups = 1 if a.kv_mode == "share" else a.num_recursions
        caps = [max(1, math.ceil(f * max_len)) for f in fractions[:groups]]
        self.stack_kv = _Buffers(model, a.num_shared, slots, caps)
        self.first_kv = _Buffers(model, 1, slots, [max_len]) if model.first is not None else None
        self.last_kv = _Buffers(model, 1, slots, [max_len]) if model.last is not None else None
        # Per slot: the in-flight token's hidden state, its next step, that step's gate, its position.
        self.h = model.tok_embeddings.weight.new_zeros(slots, a.d_model)
        self.step = torch.zeros(slots, dtype=torch.long, device=dev)
        self.gate = torch.zeros(slots, 1, dtype=torch.float32, device=dev) if model.stack.gated else None
        self.target = torch.zeros(slots, dtype=torch.long, device=dev)  # token choice: chosen depth
        self.pos = torch.zeros(slots, dtype=torch.long, device=dev)
        self.live = torch.zeros(slots, dtype=torch.bool, device=dev)
        self.owner: list[_Request | None] = [None] * slots
        self.queue: deque[_Request] = deque()
        self.done: list[_Request] = []
        self.submitted = 0
        self.stats = {"stack_passes": 0, "stack_rows": 0, "tokens": 0, "cache_full_exits": 0}

    def submit(self, prompt: list[int], max_new_tokens: int | None = None) -> int:
        """Queue a request; returns its index in the `run()` result."""
        if not prompt or len(prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens: need 1 to {self.max_len - 1} (max_len={self.max_len})")
        cfg = self.sampling
        if max_new_tokens is not None:
            cfg = dataclasses.replace(cfg, max_new_tokens=max_new_tokens)
            cfg.validate()
        index, self.submitted = self.submitted, self.submitted + 1
        self.queue.append(_Request(index, list(prompt), _Stopper(cfg, self.max_len, self.decode), [], []))
        return index

    @torch.no_grad()
    def run(self) -> Generation:
        """Serve every queued request; results in submission order."""
        while self.queue or self.live.any():
            self.iterate()
        reqs = sorted(self.done, key=lambda r: r.index)
        self.done = []
        return Generation([r.tokens for r in reqs], [r.depths for r in reqs], [r.finish for r in reqs])

    @torch.no_grad()
    def iterate(self) -> None:
        """Admit queued requests into free slots, apply the shared stack once, handle exits, and refill
        the slots they freed at once."""
        self._admit()
        if not bool(self.live.any()):
            return
        self._stack_pass()
        self.step += self.live.long()
        go = self._continues(self.h, self.step)
        exits = (self.live & ~go).nonzero().flatten()
        self.live &= go
        self._exit(exits)
        self._admit()

    def _admit(self) -> None:
        for s in range(self.slots):
            while self.owner[s] is None and self.queue:
                req = self.queue.popleft()
                self.owner[s] = req
                tok, depth = self._prefill(s, req.prompt)
                self._emit(torch.tensor([s]), tok[None], depth[None])

    def _prefill(self, s: int, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.model.args
        view = lambda buf: buf.view(0, s) if buf is not None else None  # noqa: E731
        groups = range(1 if a.kv_mode == "share" else a.num_recursions)
        cache = ModelCache(
            view(self.first_kv),
            [self.stack_kv.view(g, s) for g in groups],
            view(self.last_kv),
            torch.zeros(1, dtype=torch.long, device=self.h.device),
        )
        tokens = torch.tensor([prompt], device=self.h.device)
        h, depth = forward_cached(self.model, cache, tokens, ctl=self.ctl)
        self.pos[s] = len(prompt)
        return sample(lm_head(self.model, h[:, -1]), self.sampling, self.generator)[0], depth[0, -1]

    def _stack_pass(self) -> None:
        """One application of the shared stack to every slot, each at its own step (static shapes)."""
        a = self.model.args
        rows = torch.arange(self.slots, device=self.h.device)
        share = a.kv_mode == "share"
        group = torch.zeros_like(self.step) if share else self.step.clamp(max=a.num_recursions - 1)
        store = self.live & (self.step == 0) if share else self.live
        slot, window, mask = self.stack_kv.prepare(group, rows, self.pos, store)
        mask = mask | ~self.live[:, None, None, None]  # idle rows see everything: finite, discarded
        rope = self.model.rope[self.pos][:, None, None, :]
        x = self.h.unsqueeze(1)
        for i, blk in enumerate(self.layers):
            x = _attend_rows(blk, x, rope, self.stack_kv.k[i], self.stack_kv.v[i], rows, slot, window, mask)
        f = x.squeeze(1)
        upd = self.model.stack.update(self.h, f, self.gate)
        self.h = torch.where(self.live[:, None], upd, self.h)
        self.stats["stack_passes"] += 1
        self.stats["stack_rows"] += int(self.live.sum())

    def _continues(self, h: torch.Tensor, step: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Whether each row runs `step` next: the routing decision, if that step's cache has room."""
        rows = torch.arange(self.slots, device=h.device) if rows is None else rows
        go = self._routes(h, step, rows)
        share = self.model.args.kv_mode == "share"
        group = torch.zeros_like(step) if share else step.clamp(max=len(self.stack_kv.capacities) - 1)
        room = self.stack_kv.room(group, rows) | (share & (step > 0))  # sharing steps store nothing
        self.stats["cache_full_exits"] += int((go & ~room).sum())  # only occupied slots can be full
        return go & room

    def _routes(self, h: torch.Tensor, step: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The causal routing decision for `step` (sets that step's gate for expert choice)."""
        a, ctl = self.model.args, self.ctl
        r = step.clamp(max=a.num_recursions - 1)
        gate = None if self.gate is None else self.gate[rows]
        go, gate = self.model.stack.causal_step(h, r, self.target[rows], gate, ctl.threshold, ctl.full_depth)
        if gate is not None and self.gate is not None:
            self.gate[rows] = gate
        return go & (step < (ctl.max_depth or a.num_recursions))

    def _exit(self, rows: torch.Tensor) -> None:
        """Finish the exiting rows' tokens: last block, head, sampling; then start their next tokens."""
        if rows.numel() == 0:
            return
        x = self.h[rows].unsqueeze(1)
        if self.last_kv is not None and self.model.last is not None:
            x = self._unique_block(self.model.last, self.last_kv, x, rows)
        tokens = sample(lm_head(self.model, self.model.norm(x[:, 0])), self.sampling, self.generator)
        self.pos[rows] += 1  # the sampled token takes the next position
        self._emit(rows, tokens, self.step[rows])

    def _unique_block(self, blk: Block, kv: _Buffers, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros_like(rows)
        slot, window, mask = kv.prepare(zero, rows, self.pos[rows], torch.ones_like(rows, dtype=torch.bool))
        rope = self.model.rope[self.pos[rows]][:, None, None, :]
        return _attend_rows(blk, x, rope, kv.k[0], kv.v[0], rows, slot, window, mask)

    def _emit(self, rows: torch.Tensor, tokens: torch.Tensor, depths: torch.Tensor) -> None:
        """Record each row's sampled token; free finished slots, feed the others' tokens back in."""
        keep = []
        for s, tok, d in zip(rows.tolist(), tokens.tolist(), depths.tolist(), strict=True):
            req = self.owner[s]
            assert req is not None
            reason = req.stopper.check(tok, req.tokens, int(self.pos[s]))
            if len(req.tokens) > len(req.depths):
                req.depths.append(d)
                self.stats["tokens"] += 1
            if reason is None:
                keep.append((s, tok))
                continue
            req.finish = reason
            self.done.append(req)
            self._free(s)
        if keep:
            self._enter(*(torch.tensor(c, device=self.h.device) for c in zip(*keep, strict=True)))

    def _free(self, s: int) -> None:
        self.owner[s] = None
        self.live[s] = False
        for kv in (self.stack_kv, self.first_kv, self.last_kv):
            if kv is not None:
                kv.length[:, s] = 0

    def _enter(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Embed new tokens, run the first block, and route them into step 0 (or straight out)."""
        stack = self.model.stack
        x = self.model.tok_embeddings(tokens).unsqueeze(1)
        if self.first_kv is not None and self.model.first is not None:
            x = self._unique_block(self.model.first, self.first_kv, x, rows)
        h = x[:, 0]
        self.h[rows] = h
        self.step[rows] = 0
        target, gate = stack.causal_entry(h, self.ctl.full_depth)
        if target is not None:
            self.target[rows] = target
        if gate is not None and self.gate is not None:
            self.gate[rows] = gate
        go = self._continues(h, self.step[rows], rows)
        self.live[rows] = go
        self._exit(rows[~go])  # a token that skips every step goes straight to the head
