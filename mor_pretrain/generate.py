"""Cached generation for every model kind: vanilla, recursive, MoR expert choice and token choice.

The inference path drives the model's submodules; the model module itself stays training code.

Caches (one `KVGroup` per set of layers that see the same tokens):
- first / last unique blocks: a standard cache;
- the recursion stack: one group per recursion step, holding the keys/values of its shared layers for
  ONLY the tokens that reached that step (recursion-wise caching). Tokens are stored compactly in arrival
  order with their original positions, so a query attends to the stored tokens at or before its position:
  exactly the key set of `MoRModel.forward(routing="causal")`;
- KV sharing: only step 0 is stored; deeper steps read it.

Routing follows the model's causal mode: expert choice continues at step r iff its score (from the aux
router when the model has one) is >= the threshold and the token ran step r-1; token choice runs the
depth its router (+ depth_bias) picks. `DepthControl` caps, forces or moves these decisions at test time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mor_pretrain.models import MoRModel
from mor_pretrain.models.layers import Block, CacheView
from mor_pretrain.models.mor import compact


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64  # tokens to generate per prompt at most
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set with probability >= top_p; 1 = all
    seed: int = 0  # sampling random stream
    eos_ids: list[int] = field(default_factory=list)  # a sampled eos ends its sequence (not emitted)
    stop_strings: list[str] = field(default_factory=list)  # end once the decoded output contains one

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(
                f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {self.temperature}, {self.top_k}, {self.top_p}"
            )


@dataclass
class DepthControl:
    max_depth: int = 0  # run at most this many recursion steps; 0 = no cap
    full_depth: bool = False  # every token runs every step (routers still give the gates)
    threshold: float | None = None  # expert choice: replaces model.args.causal_threshold

    def validate(self, model: MoRModel) -> None:
        a = model.args
        if not 0 <= self.max_depth <= a.num_recursions:
            raise ValueError(f"max_depth must be in [0, {a.num_recursions}], got {self.max_depth}")
        if self.full_depth and self.max_depth:
            raise ValueError("full_depth and max_depth contradict each other; give one")
        if self.threshold is not None:
            if not a.topk_routing:
                raise ValueError(
                    "threshold moves the fixed causal threshold of top-k-trained expert choice (expert-topk); "
                    f"this model's router is {a.router_kind}"
                )
            if not 0.0 < self.threshold < 1.0:
                raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")


@dataclass
class KVGroup:
    """Keys/values of layers that store the same tokens, compact in arrival order.

    k, v: per layer (batch, kv_heads, capacity, head_dim). pos: (batch, capacity) original position of
    each stored token. length: (batch,) tokens stored. Views of larger buffers work too (the engine).
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pos: torch.Tensor
    length: torch.Tensor

    @classmethod
    def empty(cls, model: MoRModel, n_layers: int, batch: int, capacity: int) -> KVGroup:
        a, w = model.args, model.tok_embeddings.weight
        shape = (batch, a.n_kv_heads, capacity, a.head_dim)
        return cls(
            [w.new_zeros(shape) for _ in range(n_layers)],
            [w.new_zeros(shape) for _ in range(n_layers)],
            torch.zeros(batch, capacity, dtype=torch.long, device=w.device),
            torch.zeros(batch, dtype=torch.long, device=w.device),
        )


@dataclass
class ModelCache:
    first: KVGroup | None  # the unique first block (middle sharing)
    steps: list[KVGroup]  # per recursion step (only step 0 with KV sharing); per repeat for sequence sharing
    last: KVGroup | None  # the unique last block
    seen: torch.Tensor  # (batch,) real tokens processed per row = the next token's position


def new_cache(model: MoRModel, batch: int, capacity: int) -> ModelCache:
    """Empty caches for `batch` rows of up to `capacity` tokens each."""
    a = model.args
    if capacity > a.max_seq_len:
        raise ValueError(f"cache capacity {capacity} exceeds model.max_seq_len={a.max_seq_len}")
    n_groups = 1 if a.kv_mode == "share" else a.num_recursions
    one = lambda: KVGroup.empty(model, 1, batch, capacity) if a.middle else None  # noqa: E731
    steps = [KVGroup.empty(model, a.num_shared, batch, capacity) for _ in range(n_groups)]
    seen = torch.zeros(batch, dtype=torch.long, device=model.tok_embeddings.weight.device)
    return ModelCache(one(), steps, one(), seen)


@dataclass
class _Writes:
    """Where the active tokens of a chunk go: row, chunk index and cache slot of each."""

    rows: torch.Tensor
    cols: torch.Tensor
    slots: torch.Tensor


def key_mask(group: KVGroup, qpos: torch.Tensor, active: torch.Tensor, span: int) -> torch.Tensor:
    """(batch, 1, T, span) mask: stored slot j is visible to query t iff j < length and pos[j] <= qpos[t].
    Inactive queries see every slot: their outputs are discarded, and this keeps them finite."""
    slot = torch.arange(span, device=qpos.device)
    stored = slot[None, :] < group.length[:, None]  # (batch, span)
    causal = group.pos[:, None, :span] <= qpos[:, :, None]  # (batch, T, span)
    return ((stored[:, None, :] & causal) | ~active[:, :, None]).unsqueeze(1)


def _reserve(group: KVGroup, active: torch.Tensor, qpos: torch.Tensor) -> _Writes:
    """Give the active tokens of a chunk the next free slots, in order, and record their positions."""
    slots = group.length[:, None] + active.long().cumsum(1) - 1
    rows, cols = active.nonzero(as_tuple=True)
    writes = _Writes(rows, cols, slots[rows, cols])
    if writes.slots.numel() and int(writes.slots.max()) >= group.pos.shape[1]:
        raise ValueError(f"KV cache full: capacity {group.pos.shape[1]} tokens")
    group.pos[rows, writes.slots] = qpos[rows, cols]
    group.length += active.sum(1)
    return writes


def cached_block(
    blk: Block,
    x: torch.Tensor,
    rope: torch.Tensor,
    mask: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    writes: _Writes | None,
) -> torch.Tensor:
    """Block.forward over this layout of cached keys: store the new tokens' K/V (unless `writes` is None, e.g.
    a KV-sharing step reading step 0), then attend to the first mask.shape[-1] slots. x: (batch, T, dim)."""

    def write(k: torch.Tensor, v: torch.Tensor) -> None:
        assert writes is not None
        k_cache[writes.rows, :, writes.slots] = k[writes.rows, :, writes.cols]
        v_cache[writes.rows, :, writes.slots] = v[writes.rows, :, writes.cols]

    span = mask.shape[-1]
    view = CacheView(None if writes is None else write, lambda: (k_cache[:, :, :span], v_cache[:, :, :span]))
    return blk(x, rope, mask, cache=view)[0]


def _run_group(
    blocks: Sequence[Block],
    group: KVGroup,
    x: torch.Tensor,
    rope: torch.Tensor,
    qpos: torch.Tensor,
    active: torch.Tensor,
    write: bool = True,
) -> torch.Tensor:
    writes = _reserve(group, active, qpos) if write else None
    mask = key_mask(group, qpos, active, max(1, int(group.length.max())))
    for i, blk in enumerate(blocks):
        x = cached_block(blk, x, rope, mask, group.k[i], group.v[i], writes)
    return x


def _pack(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Entries idx (batch, n) along dim 1 of t (batch, T, ...)."""
    return t.gather(1, idx.view(*idx.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:]))


def _stack(
    model: MoRModel,
    cache: ModelCache,
    h: torch.Tensor,
    rope: torch.Tensor,
    qpos: torch.Tensor,
    valid: torch.Tensor,
    ctl: DepthControl,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recursion stack over a chunk, with the decisions of MoRModel.forward(routing="causal")."""
    a, stack = model.args, model.stack
    layers = [blk for blk in stack.layers if isinstance(blk, Block)]
    nr = a.num_recursions
    steps = ctl.max_depth or nr
    depth = torch.zeros_like(qpos)
    if a.sharing in ("sequence", "middle_sequence"):
        # Each shared layer repeats before the next one; every repeat has its own cache.
        writes = [_reserve(cache.steps[r], valid, qpos) for r in range(steps)]
        mask = key_mask(cache.steps[0], qpos, valid, max(1, int(cache.steps[0].length.max())))
        for i, blk in enumerate(layers):
            for r in range(steps):
                h = cached_block(blk, h, rope, mask, cache.steps[r].k[i], cache.steps[r].v[i], writes[r])
        return h, depth + steps * valid.long()
    target, gate = stack.causal_entry(h, ctl.full_depth)
    active = valid
    for step in range(steps):
        go, gate = stack.causal_step(h, step, target, gate, ctl.threshold, ctl.full_depth)
        sel = active & go
        share = a.kv_mode == "share" and step > 0
        group = cache.steps[0 if share else step]
        if not share:
            # A step cache shorter than the sequence (the engine's step_cache_fractions) turns tokens
            # away once full: they exit before this step.
            room = group.pos.shape[1] - group.length
            sel = sel & (sel.long().cumsum(1) <= room[:, None])
        n = int(sel.sum(1).max())  # the busiest row's tokens: one host sync per step
        if n == 0:
            break  # decisions are hierarchical: nobody goes deeper
        # Pack each row's selected tokens to the front, so a step costs its selected tokens only.
        idx, sel_c = compact(sel, n)  # (batch, n) selected first, in order
        x = _pack(h, idx)
        rope_c = _pack(rope.transpose(1, 2), idx).transpose(1, 2)
        f = _run_group(layers, group, x, rope_c, _pack(qpos, idx), sel_c, write=not share)
        upd = stack.update(x, f, None if gate is None else _pack(gate, idx))
        x = torch.where(sel_c.unsqueeze(-1), upd, x)
        h = h.scatter(1, idx.unsqueeze(-1).expand_as(x), x)
        depth = depth + sel.long()
        active = sel
    return h, depth


@torch.no_grad()
def forward_cached(
    model: MoRModel,
    cache: ModelCache,
    tokens: torch.Tensor,
    valid: torch.Tensor | None = None,
    ctl: DepthControl | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a chunk of new tokens against the caches and store their keys/values.

    tokens, valid: (batch, T); valid marks real tokens (padding anywhere: left, right or a finished row),
    which take the next positions of their row in order. Returns the normed hidden states (batch, T, dim)
    (pass them to `lm_head`) and the recursion steps each token ran (batch, T).
    """
    ctl = ctl or DepthControl()
    if valid is None:
        valid = torch.ones_like(tokens, dtype=torch.bool)
    qpos = cache.seen[:, None] + valid.long().cumsum(1) - 1
    if int(qpos.max()) >= model.args.max_seq_len:
        raise ValueError(f"position {int(qpos.max())} exceeds model.max_seq_len={model.args.max_seq_len}")
    qpos = qpos.clamp(min=0)  # padding before a row's first token; its rope is never used
    rope = model.rope[qpos].unsqueeze(1)  # (batch, 1, T, head_dim) at each token's own position
    h = model.tok_embeddings(tokens)
    if model.first is not None and cache.first is not None:
        h = _run_group([model.first], cache.first, h, rope, qpos, valid)
    h, depth = _stack(model, cache, h, rope, qpos, valid, ctl)
    if model.last is not None and cache.last is not None:
        h = _run_group([model.last], cache.last, h, rope, qpos, valid)
    cache.seen += valid.sum(1)
    return model.norm(h), depth


def lm_head(model: MoRModel, h: torch.Tensor) -> torch.Tensor:
    """Logits (..., vocab) in fp32 from normed hidden states."""
    return F.linear(h, model.head_weight()).float()


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (batch,) from logits (batch, vocab): greedy at temperature 0, else top-k / top-p."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= cfg.top_p  # mass before this token already suffices
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt (eos not included)
    depths: list[list[int]]  # per generated token: recursion steps run at the position that chose it
    finish: list[str]  # "eos", "stop" (a stop string) or "length"

    def depth_histogram(self, num_recursions: int) -> list[int]:
        """Generated tokens per depth 0..num_recursions."""
        counts = [0] * (num_recursions + 1)
        for row in self.depths:
            for d in row:
                counts[d] += 1
        return counts


class _Stopper:
    """Per-row stop bookkeeping shared by `generate` and the batching engine."""

    def __init__(self, cfg: SamplingConfig, max_len: int, decode: Callable[[list[int]], str] | None):
        if cfg.stop_strings and decode is None:
            raise ValueError("stop_strings need a decode function (the tokenizer's)")
        self.cfg, self.max_len, self.decode = cfg, max_len, decode

    def check(self, token: int, out: list[int], next_pos: int) -> str | None:
        """Append `token` to `out` unless it is eos; return the finish reason, or None to go on.
        next_pos: the position `token` would take as the next input."""
        if token in self.cfg.eos_ids:
            return "eos"
        out.append(token)
        if self.cfg.stop_strings:
            assert self.decode is not None
            text = self.decode(out)
            if any(s in text for s in self.cfg.stop_strings):
                return "stop"
        if len(out) >= self.cfg.max_new_tokens or next_pos >= self.max_len:
            return "length"
        return None


def trim_stop(text: str, stop_strings: Sequence[str]) -> str:
    """Text before the first stop string it contains."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


def pad_prompts(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (batch, T) tokens and their validity mask."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    t = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), t, dtype=torch.long, device=device)
    valid = torch.zeros(len(prompts), t, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(list(p), dtype=torch.long)
        valid[i, : len(p)] = True
    return tokens, valid


def _last_valid(h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rows of h (batch, T, dim) at each row's last valid index."""
    idx = (valid.long() * torch.arange(valid.shape[1], device=valid.device)).argmax(1)
    return h[torch.arange(h.shape[0], device=h.device), idx]


@torch.no_grad()
def generate(
    model: MoRModel,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig | None = None,
    ctl: DepthControl | None = None,
    decode: Callable[[list[int]], str] | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> Generation:
    """Generate continuations of a batch of prompts (any lengths) with cached decoding.

    decode: token ids -> text, needed for stop strings. on_token(row, token) streams each emitted token.
    """
    cfg, ctl = cfg or SamplingConfig(), ctl or DepthControl()
    cfg.validate()
    ctl.validate(model)
    device = model.tok_embeddings.weight.device
    tokens, valid = pad_prompts(prompts, device)
    max_len = min(model.args.max_seq_len, tokens.shape[1] + cfg.max_new_tokens)
    if tokens.shape[1] >= max_len:
        raise ValueError(f"prompt of {tokens.shape[1]} tokens leaves no room below max_seq_len={max_len}")
    stopper = _Stopper(cfg, max_len, decode)
    # Greedy decoding draws nothing: no generator (a CUDA one needs the driver, which a fake-tensor trace lacks).
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.temperature else None
    cache = new_cache(model, len(prompts), max_len)
    out = Generation([[] for _ in prompts], [[] for _ in prompts], ["length"] * len(prompts))
    h, depth = forward_cached(model, cache, tokens, valid, ctl)
    logits = lm_head(model, _last_valid(h, valid))
    step_depth = _last_valid(depth.unsqueeze(-1), valid).squeeze(-1)
    live = torch.ones(len(prompts), dtype=torch.bool, device=device)
    while True:
        nxt = sample(logits, cfg, gen)
        for i in live.nonzero().flatten().tolist():
            tok = int(nxt[i])
            reason = stopper.check(tok, out.tokens[i], int(cache.seen[i]))
            if len(out.tokens[i]) > len(out.depths[i]):
                out.depths[i].append(int(step_depth[i]))
                if on_token is not None:
                    on_token(i, tok)
            if reason is not None:
                out.finish[i] = reason
                live[i] = False
        if not bool(live.any()):
            return out
        h, depth = forward_cached(model, cache, nxt.unsqueeze(1), live.unsqueeze(1), ctl)
        logits, step_depth = lm_head(model, h[:, 0]), depth[:, 0]
