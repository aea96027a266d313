"""The Mixture-of-Recursions model family: vanilla, fixed-depth recursive and MoR, from one module tree.

Read top-down: ModelArgs -> MoRModel (embedding, unique first/last blocks, recursion stack, head) ->
RecursionStack (the shared layers, the routers and the recursion loop) -> routers. The shared layers are
ONE module applied `num_recursions` times, never aliased copies, so parallel wrappers see each parameter
once. The model knows nothing of parallelism, data or training; it returns losses and routing statistics
and never logs.

Routing modes of `forward(..., routing=...)`:
- "topk": expert choice as trained in the paper: each step keeps its top-k tokens per sequence (static k).
  Top-k looks at the whole sequence, so this mode is NOT causal.
- "causal": expert choice decided per token: continue at step r iff score >= threshold and the token
  continued at step r-1. Used for evaluation and generation. Token-choice models route the same in both,
  and so do expert-threshold models (`expert_rule = "threshold"`), whose thresholds are learned per step.
Every mode runs each recursion step on the compacted tokens it routes (RecursionStack._routed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mor_pretrain.models.layers import Block, RMSNorm, rope_table

Sharing = Literal["cycle", "sequence", "middle_cycle", "middle_sequence"]
KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ModelArgs:
    vocab_size: int = 0  # embedding rows; 0 = the tokenizer's size padded to data.vocab_multiple
    d_model: int = 576  # hidden size
    n_layers: int = 30  # applied layers L, counting every recursion of the shared layers
    n_heads: int = 9  # query heads
    n_kv_heads: int = 3  # key/value heads (grouped-query attention)
    d_ffn: int = 1536  # SwiGLU hidden size
    max_seq_len: int = 2048  # longest sequence RoPE is tabulated for
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # share the token embedding with the LM head
    init_std: float = 0.02  # std of input projections and embeddings; outputs use std/sqrt(2 L)
    num_recursions: int = 1  # Nr; 1 = vanilla
    sharing: Sharing = "middle_cycle"  # how applied layers map onto unique layers (MOR_FACTS s2)
    router: Literal["none", "expert", "token"] = "none"  # none = vanilla / fixed-depth recursive
    router_arch: Literal["linear", "mlp"] = "linear"  # mlp = Linear(d,d) -> GELU -> Linear(d,out)
    router_alpha: float = 0.1  # gate scale: g = alpha * activation(logit)
    router_activation: Literal["sigmoid", "softmax"] = "sigmoid"  # token choice may use softmax
    capacities: list[float] = field(default_factory=list)  # expert choice, per step; empty = (Nr-r)/Nr
    aux_loss_coef: float = 1e-3  # expert choice BCE on router logits vs top-k selection
    z_loss_coef: float = 0.0  # router z-loss (paper final recipe: 0 for expert, 1e-5 for token)
    aux_router: bool = False  # expert choice: a second router on detached states, used for causal mode
    aux_router_coef: float = 1e-3  # its BCE; a side loss: trains the aux router only, outside the compared loss
    causal_threshold: float = 0.5  # expert choice causal mode: continue iff sigmoid(logit) >= this
    # Expert choice in training: "topk" keeps each step's top-k per sequence (sees future tokens);
    # "threshold" keeps the tokens whose score clears the step's learned threshold (Expert-Threshold
    # routing), the same rule in training, evaluation and generation: causal by construction. "random" is
    # the MoR authors' rand_router ablation: no router weights; each forward draws every score uniformly at
    # random, keeps the top k_r in training and gates by alpha x score, so routing without learned routing.
    expert_rule: Literal["topk", "threshold", "random"] = "topk"
    # Expert-threshold: each step's threshold moves this far per optimizer step towards the global batch's
    # mean per-sequence k-th largest score (a plain running mean over the first 1/rate updates).
    threshold_rate: float = 0.1
    # Fixed-depth recursive only: 0 = each recursion step is h <- f(h); c > 0 = MoR's update h + c * f(h)
    # with a constant gate c (the gate ablation of docs/RESULTS.md).
    recursion_gate: float = 0.0
    # Fixed-depth recursive only: eps > 0 = each recursion step is h + eps * (f(h) - h), the shared stack's
    # residual branch scaled by eps (the looped-transformer residual scaling; eps = 1/Nr); 0 = off.
    residual_scale: float = 0.0
    balancing: Literal["loss", "loss_free"] = "loss"  # token choice load balancing
    balance_loss_coef: float = 0.1  # token choice balancing loss coefficient
    bias_update_rate: float = 1e-3  # token choice loss-free bias step u
    kv_mode: Literal["recursion", "share"] = "recursion"  # recursion-wise KV or reuse step-0 K/V

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def middle(self) -> bool:
        return self.sharing.startswith("middle")

    @property
    def num_shared(self) -> int:
        """Unique layers inside the recursion stack (the paper's `base`)."""
        inner = self.n_layers - 2 if self.middle else self.n_layers
        return inner // self.num_recursions

    @property
    def topk_routing(self) -> bool:
        """Whether routing="topk" differs from "causal": expert choice trained with top-k (of learned or
        random scores)."""
        return self.router == "expert" and self.expert_rule in ("topk", "random")

    @property
    def router_kind(self) -> str:
        """The one name of the model's router and its rule: vanilla, recursive (router none), expert-<rule>
        (expert-topk, expert-threshold) or token. Everything that names the rule (estimate.DOCUMENTED_SYNCS,
        model cards, isoFLOP labels, generation errors) reads this, never router / expert_rule, so a new rule
        is named wherever the model is described."""
        if self.router == "none":
            return "recursive" if self.num_recursions > 1 else "vanilla"
        return f"expert-{self.expert_rule}" if self.router == "expert" else self.router

    @property
    def llama_equivalent(self) -> bool:
        """Whether the model is a plain Llama once its shared layers are unrolled."""
        share = self.kv_mode == "share" and self.num_recursions > 1
        return self.router == "none" and not share and self.recursion_gate == 0 and self.residual_scale == 0

    @property
    def step_capacities(self) -> list[float]:
        if self.router != "expert":
            return [1.0] * self.num_recursions
        if self.capacities:
            return list(self.capacities)
        n = self.num_recursions
        return [(n - r) / n for r in range(n)]

    def tokens_per_step(self, seq_len: int) -> list[int]:
        """Static top-k sizes per recursion step: k_r = max(1, floor(c_r * seq_len)), a product within 1e-6
        of an integer counting as that integer, so binary rounding never drops a token (0.58 x 100 is
        57.99999999999999 in floating point: 58, not 57). The default capacities (Nr - r) / Nr give
        2048, 1365, 682 at T = 2048, Nr = 3, as in the paper."""
        return [max(1, math.floor(c * seq_len + 1e-6)) for c in self.step_capacities]

    def layer_map(self) -> list[int]:
        """Unique-layer index used by each applied layer, numbering first=0, shared 1.., last=base+1."""
        L, nr, base = self.n_layers, self.num_recursions, self.num_shared
        if self.sharing == "cycle":
            return [i % base for i in range(L)]
        if self.sharing == "sequence":
            return [i // nr for i in range(L)]
        inner = range(1, L - 1)
        if self.sharing == "middle_cycle":
            mid = [(i - 1) % base + 1 for i in inner]
        else:
            mid = [(i - 1) // nr + 1 for i in inner]
        return [0, *mid, base + 1]

    def validate(self) -> None:
        def bad(key: str, msg: str) -> None:
            raise ValueError(f"model.{key}: {msg}")

        if self.vocab_size < 0:
            bad("vocab_size", f"must be >= 0 (0 = from the tokenizer), got {self.vocab_size}")
        for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ffn", "max_seq_len"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            bad("n_heads", f"{self.n_heads} does not divide d_model={self.d_model}")
        if self.n_heads % self.n_kv_heads:
            bad("n_kv_heads", f"{self.n_kv_heads} does not divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            bad("n_heads", f"head_dim={self.head_dim} must be even for RoPE")
        nr = self.num_recursions
        if nr < 1:
            bad("num_recursions", f"must be >= 1, got {nr}")
        inner = self.n_layers - 2 if self.middle else self.n_layers
        if inner < nr or inner % nr:
            what = "n_layers - 2" if self.middle else "n_layers"
            bad("n_layers", f"{what} = {inner} must be a positive multiple of num_recursions={nr}")
        if self.router != "none":
            if nr < 2:
                bad("router", f"routing needs num_recursions >= 2, got {nr}")
            if self.sharing not in ("cycle", "middle_cycle"):
                bad(
                    "sharing",
                    f"routing runs over passes through the shared stack; use cycle or middle_cycle, not {self.sharing}",
                )
        if self.kv_mode == "share" and (nr < 2 or self.sharing not in ("cycle", "middle_cycle")):
            bad("kv_mode", "KV sharing needs num_recursions >= 2 and cycle or middle_cycle sharing")
        if self.capacities:
            if self.router != "expert":
                bad("capacities", "only expert-choice routing uses capacities")
            if len(self.capacities) != nr:
                bad("capacities", f"needs {nr} values (one per recursion), got {len(self.capacities)}")
            if any(not 0.0 < c <= 1.0 for c in self.capacities):
                bad("capacities", f"each must be in (0, 1], got {self.capacities}")
            if any(b > a for a, b in zip(self.capacities, self.capacities[1:], strict=False)):
                bad("capacities", f"must be non-increasing, got {self.capacities}")
        if self.expert_rule != "topk" and self.router != "expert":
            bad("expert_rule", f"only expert-choice routing has a rule, this model's router is {self.router!r}")
        if self.expert_rule != "topk" and self.aux_router:
            bad("aux_router", f"expert-{self.expert_rule} routing decides on its own scores: no aux router")
        if not 0.0 < self.threshold_rate <= 1.0:
            bad("threshold_rate", f"must be in (0, 1], got {self.threshold_rate}")
        if self.recursion_gate:
            if self.router != "none" or nr < 2 or self.sharing not in ("cycle", "middle_cycle"):
                bad("recursion_gate", "a constant gate is for fixed-depth recursion: router none, cycle sharing")
            if not math.isfinite(self.recursion_gate) or self.recursion_gate < 0:
                bad("recursion_gate", f"must be a finite number >= 0, got {self.recursion_gate}")
        if self.residual_scale:
            if self.router != "none" or nr < 2 or self.sharing not in ("cycle", "middle_cycle"):
                bad("residual_scale", "residual scaling is for fixed-depth recursion: router none, cycle sharing")
            if self.recursion_gate:
                bad("residual_scale", "a model has one update rule: recursion_gate or residual_scale, not both")
            if not 0.0 < self.residual_scale <= 1.0:
                bad("residual_scale", f"must be in (0, 1] (0 = off), got {self.residual_scale}")
        if self.router == "expert" and self.router_activation != "sigmoid":
            bad("router_activation", "expert choice uses sigmoid scores")
        if not 0.0 < self.causal_threshold < 1.0:
            bad("causal_threshold", f"must be in (0, 1), got {self.causal_threshold}")
        # Values that train garbage without an error: NaN from the first step (rope_theta, norm_eps), no
        # signal (init_std), a gate that flips the update's sign (router_alpha), losses that reward imbalance.
        positive = ("rope_theta", "norm_eps", "init_std", "router_alpha")
        non_negative = ("aux_loss_coef", "z_loss_coef", "aux_router_coef", "balance_loss_coef", "bias_update_rate")
        for key in positive:
            if not math.isfinite(getattr(self, key)) or getattr(self, key) <= 0:
                bad(key, f"must be a finite number > 0, got {getattr(self, key)}")
        for key in non_negative:
            if not math.isfinite(getattr(self, key)) or getattr(self, key) < 0:
                bad(key, f"must be a finite number >= 0, got {getattr(self, key)}")


# Every ModelArgs field is in exactly one of these two tuples (tests/test_checkpoint.py checks it), so a new
# field cannot be forgotten. STRUCTURAL: fields that change what the weights mean, i.e. the function a
# checkpoint's tensors compute (shapes, which modules exist, how layers are shared and routed, the gate, the
# rule, the capacities, the KV mode, RoPE's base, the norm epsilon): checkpoint.STRUCTURAL_KEYS refuses a
# resume under another value.
STRUCTURAL_FIELDS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "d_ffn",
    "rope_theta",
    "norm_eps",
    "tie_embeddings",
    "num_recursions",
    "sharing",
    "router",
    "router_arch",
    "router_alpha",
    "router_activation",
    "capacities",
    "aux_router",
    "expert_rule",
    "recursion_gate",
    "residual_scale",
    "kv_mode",
)
# Fields that change training or test-time behaviour only, never what a saved tensor means, so a resume may
# change them: loss coefficients and update rates (aux_loss_coef, z_loss_coef, aux_router_coef,
# balance_loss_coef, bias_update_rate, threshold_rate: how the next steps train), balancing (whether the
# token-choice bias moves and the loss is added; the saved bias steers selection either way), init_std (used
# only before step 0), max_seq_len (the longest sequence accepted: RoPE's value at a position does not depend
# on it) and causal_threshold (top-k expert choice's test-time decision threshold, which generation's
# --threshold moves too; top-k training never reads it).
NON_STRUCTURAL_FIELDS = (
    "max_seq_len",
    "init_std",
    "aux_loss_coef",
    "z_loss_coef",
    "aux_router_coef",
    "causal_threshold",
    "threshold_rate",
    "balancing",
    "balance_loss_coef",
    "bias_update_rate",
)


# Training without logits to return: when a micro-batch's logits exceed this many elements, the LM head and
# cross-entropy run on slices of this many elements, each recomputed in backward. Only one slice's logits
# (and their fp32 log-softmax) are ever alive instead of the whole micro-batch's: 12 GiB of a 1.7B rank's
# peak at 16 x 2048 tokens. The recompute costs one more head matmul, so small micro-batches stay unsliced.
LOGITS_CHUNK_ELEMENTS = 2**26


def chunked_lm_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over the non-ignored labels of h (tokens, dim) through the head `weight`, in
    slices of LOGITS_CHUNK_ELEMENTS logits; equal to the unsliced loss up to float summation order."""
    rows = max(1, LOGITS_CHUNK_ELEMENTS // weight.shape[0])
    total = None
    for i in range(0, h.shape[0], rows):
        part = checkpoint(_summed_ce, h[i : i + rows], weight, labels[i : i + rows], ignore_index, use_reentrant=False)
        total = part if total is None else total + part
    assert total is not None
    return total / (labels != ignore_index).sum()


def _summed_ce(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


@dataclass
class ModelOutput:
    loss: torch.Tensor | None  # what to backpropagate: lm_loss + every aux and side loss (already weighted)
    lm_loss: torch.Tensor | None  # mean cross-entropy over non-ignored labels
    logits: torch.Tensor | None  # (batch, seq, vocab)
    aux_losses: dict[str, torch.Tensor]  # weighted auxiliary terms of the objective, by name
    # Weighted losses that train side modules only (the auxiliary router, on detached states): never part
    # of a total compared across configs.
    side_losses: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]  # detached routing statistics, by name
    # Detached sums over this batch's sequences that the trainer sums over the global batch: token choice's
    # load (tc_load) and expert-threshold's k-th scores for update_routing, the depths run for the FLOP count.
    router_sums: dict[str, torch.Tensor]
    depth: torch.Tensor | None  # (batch, seq) recursion steps each token ran; None without routing


class Router(nn.Module):
    """Scores tokens: Linear(d, out) or a two-layer MLP."""

    def __init__(self, dim: int, out: int, arch: str):
        super().__init__()
        if arch == "mlp":
            self.net: nn.Module = nn.Sequential(
                nn.Linear(dim, dim, bias=False), nn.GELU(), nn.Linear(dim, out, bias=False)
            )
        else:
            self.net = nn.Linear(dim, out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).float()

    def init_weights(self, std: float) -> None:
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std, a=-3 * std, b=3 * std)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of x (batch, seq, dim) at idx (batch, n), keeping idx order."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


BUCKETS = 16  # compacted lengths are whole sixteenths of the sequence: at most 16 shapes per length


def bucket_size(n: int, seq_len: int) -> int:
    """Compacted length of a recursion step whose busiest sequence runs n tokens: n rounded up to a whole
    sixteenth of seq_len (at least one), so a compiled model sees a bounded set of shapes."""
    unit = -(-seq_len // BUCKETS)
    return min(seq_len, max(1, -(-n // unit)) * unit)


def compact(sel: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, n) positions holding each sequence's selected tokens in their original order, then
    unselected ones as padding, and (batch, n) which of them are selected. Padding after the selected
    tokens keeps plain causal attention over the compacted rows exact for every selected query."""
    idx = (~sel).to(torch.uint8).sort(dim=1, stable=True).indices[:, :n]
    return idx, sel.gather(1, idx)


@dataclass
class _ExpertLog:
    """Expert choice in training: the router losses and statistics gathered over the steps."""

    bce: list[torch.Tensor] = field(default_factory=list)
    aux_bce: list[torch.Tensor] = field(default_factory=list)
    z: list[torch.Tensor] = field(default_factory=list)
    acc: list[torch.Tensor] = field(default_factory=list)
    s_sel: list[torch.Tensor] = field(default_factory=list)
    s_uns: list[torch.Tensor] = field(default_factory=list)
    dead: list[torch.Tensor] = field(default_factory=list)
    agree: list[torch.Tensor] = field(default_factory=list)
    kth: list[torch.Tensor] = field(default_factory=list)  # expert-threshold: summed per-sequence k-th scores


def _masked_mean(x: torch.Tensor, keep: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """The sum of x where keep over `count` (default: how many are kept; 0 / 0 = NaN). A masked mean, not
    boolean indexing: indexing has a data-dependent shape and syncs the host."""
    return (x * keep).sum() / (keep.sum() if count is None else count)


Losses = dict[str, torch.Tensor]
# h, aux losses, side losses, stats, router sums, depth
StackOut = tuple[torch.Tensor, Losses, Losses, Losses, Losses, torch.Tensor | None]


class RecursionStack(nn.Module):
    """The shared layers, their routers and the recursion loop: one module, applied Nr times."""

    depth_bias: torch.Tensor
    expert_threshold: torch.Tensor | None
    threshold_updates: torch.Tensor | None

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.layers = nn.ModuleList(
            Block(args.d_model, args.n_heads, args.n_kv_heads, args.d_ffn, args.norm_eps)
            for _ in range(args.num_shared)
        )
        nr = args.num_recursions
        self.routers = nn.ModuleList()
        self.aux_routers = nn.ModuleList()
        if args.router == "expert" and args.expert_rule != "random":
            self.routers.extend(Router(args.d_model, 1, args.router_arch) for _ in range(nr))
            if args.aux_router:
                self.aux_routers.extend(Router(args.d_model, 1, args.router_arch) for _ in range(nr))
        elif args.router == "token":
            self.routers.append(Router(args.d_model, nr, args.router_arch))
        # Loss-free balancing bias: selection only, never trained; updated after each optimizer step.
        self.register_buffer("depth_bias", torch.zeros(nr if args.router == "token" else 0))
        # Expert-threshold routing: each step's threshold and how many updates it has had. Registered only
        # for that rule, so other models' checkpoints keep their keys.
        learned = args.router == "expert" and args.expert_rule == "threshold"
        self.register_buffer("expert_threshold", torch.full((nr,), 0.5) if learned else None)
        self.register_buffer("threshold_updates", torch.zeros(()) if learned else None)

    def init_weights(self, std: float, out_std: float) -> None:
        for layer in self.layers:
            assert isinstance(layer, Block)
            layer.init_weights(std, out_std)
        for r in [*self.routers, *self.aux_routers]:
            assert isinstance(r, Router)
            r.init_weights(std)
        self.depth_bias.zero_()
        if self.expert_threshold is not None and self.threshold_updates is not None:
            self.expert_threshold.fill_(0.5)
            self.threshold_updates.zero_()

    def apply_once(
        self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None, kvs: list[KV] | None = None
    ) -> tuple[torch.Tensor, list[KV]]:
        """One recursion step: every shared layer once. kvs: per-layer K/V to reuse (KV sharing)."""
        out_kvs = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, rope, mask, None if kvs is None else kvs[i])
            out_kvs.append(kv)
        return x, out_kvs

    @property
    def gated(self) -> bool:
        """Whether a recursion step's update has a gate (MoR's x + g * f): routed or recursion_gate > 0."""
        return self.args.router != "none" or self.args.recursion_gate > 0

    def router_state(self) -> dict[str, torch.Tensor]:
        """Router state that update_routing moves, for logging: expert-threshold's per-step thresholds."""
        return {} if self.expert_threshold is None else {"threshold": self.expert_threshold}

    def update(self, x: torch.Tensor, f: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """A recursion step's new state from its input x and the shared layers' output f: MoR's x + g * f
        with a gate (g multiplies the whole output, residual included, as in the MoR authors' code), else
        x + eps * (f - x) with residual scaling (eps multiplies the residual branch only), else f."""
        if gate is not None:
            return x + gate.to(x.dtype) * f
        eps = self.args.residual_scale
        return x + eps * (f - x) if eps else f

    # The routing rules, written once: training (_routed), cached generation and the serving engine call them.
    # Generation and the engine call only causal_entry and causal_step, which hide the router kind.

    def causal_entry(
        self, h: torch.Tensor, full_depth: bool = False
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What a router decides as a token h (..., dim) enters the stack: token choice's target (steps to
        run) and gate; (None, None) for the kinds that decide step by step. full_depth: run every step."""
        if self.args.router != "token":
            return None, None
        _, _, choice, gate = self.token_depth(h)
        return (torch.full_like(choice, self.args.num_recursions) if full_depth else choice + 1), gate

    def causal_step(
        self,
        h: torch.Tensor,
        step: int | torch.Tensor,
        target: torch.Tensor | None,
        gate: torch.Tensor | None,
        threshold: float | None = None,
        full_depth: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Whether each token h (..., dim) runs recursion step `step` (an int, or one step per token),
        decided causally, and the gate of its update (None: no gate). target, gate: causal_entry's.
        threshold replaces expert choice's fixed causal threshold; full_depth runs every step."""
        a = self.args
        if a.router == "token":
            assert target is not None
            return target > step, gate
        if a.router == "expert":
            logits = self.expert_logits(h, step)
            go = torch.ones_like(logits, dtype=torch.bool)
            if not full_depth:
                go = self.causal_continue(self.decision_scores(h, step, logits), step, threshold)
            return go, self.expert_gate(logits)
        go = torch.ones(h.shape[:-1], dtype=torch.bool, device=h.device)
        return go, h.new_full((*h.shape[:-1], 1), a.recursion_gate) if a.recursion_gate else None

    def token_depth(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token choice from the one router on the stack input h (..., dim): (logits, scores, chosen depth
        index, gate). The loss-free balancing bias steers the pick only; the gate is alpha x the picked
        depth's score, (..., 1)."""
        a = self.args
        logits = self.routers[0](h)
        probs = logits.softmax(-1) if a.router_activation == "softmax" else logits.sigmoid()
        choice = (probs.detach() + self.depth_bias).argmax(-1)
        return logits, probs, choice, a.router_alpha * probs.gather(-1, choice.unsqueeze(-1))

    def expert_logits(self, h: torch.Tensor, step: int | torch.Tensor, aux: bool = False) -> torch.Tensor:
        """Expert choice: router logits (...) of recursion step `step` for the tokens h (..., dim); `step` is
        an int, or a tensor (...) of one step per token (the serving engine's rows). aux: the auxiliary
        router's."""
        if self.args.expert_rule == "random":  # fresh uniform scores, as logits: sigmoid(logit(u)) = u
            shape = h.shape[:-1] if isinstance(step, int) else step.shape
            return torch.logit(torch.rand(shape, device=h.device))
        routers = self.aux_routers if aux else self.routers
        if isinstance(step, int):
            return routers[step](h).squeeze(-1)
        return torch.cat([r(h) for r in routers], -1).gather(-1, step.unsqueeze(-1)).squeeze(-1)

    def expert_gate(self, logits: torch.Tensor) -> torch.Tensor:
        """The weight of a recursion step's output, alpha x sigmoid(router logit), (..., 1)."""
        return self.args.router_alpha * torch.sigmoid(logits).unsqueeze(-1)

    def decision_scores(self, h: torch.Tensor, step: int | torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """What causal expert choice decides on: the auxiliary router's score when there is one (trained to
        predict top-k selection, on detached inputs), else the router's own (from its `logits`)."""
        return torch.sigmoid(self.expert_logits(h.detach(), step, aux=True) if len(self.aux_routers) else logits)

    def causal_continue(
        self, scores: torch.Tensor, step: int | torch.Tensor, threshold: float | None = None
    ) -> torch.Tensor:
        """Causal expert choice: a token continues into `step` when its decision score clears the threshold
        (unless given: the step's learned one for expert-threshold routing; for random scores the quantile
        that passes the step's share of the previous step's tokens; else model.causal_threshold), or when
        the step has capacity 1."""
        a = self.args
        # Capacities never increase (validate), so the steps of capacity 1 come first: comparing `step` with
        # their count decides an int step on the host and a tensor of steps on the device, with no copy.
        full = step < sum(c >= 1.0 for c in a.step_capacities)
        if threshold is not None:
            return (scores >= threshold) | full
        if self.expert_threshold is not None:
            return (scores >= self.expert_threshold[step]) | full
        if a.expert_rule == "random":
            caps = [1.0, *a.step_capacities]
            cuts = [1.0 - c / prev for prev, c in zip(caps, caps[1:], strict=False)]
            # A tensor of steps picks its cuts by comparison with Python numbers: no host-to-device copy.
            cut = cuts[step] if isinstance(step, int) else sum((step == r) * c for r, c in enumerate(cuts))
            return (scores >= cut) | full
        return (scores >= a.causal_threshold) | full

    def forward(self, h: torch.Tensor, rope: torch.Tensor, routing: str) -> StackOut:
        """h: (batch, seq, dim); rope: (max_len, head_dim). Returns h, aux losses, side losses, stats, depth."""
        if self.args.router == "none":
            return self._dense(h, rope), {}, {}, {}, {}, None
        return self._routed(h, rope, routing)

    def _dense(self, h: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        t = h.shape[1]
        r = rope[:t][None, None]
        nr = self.args.num_recursions
        if self.args.sharing in ("sequence", "middle_sequence"):
            for layer in self.layers:
                for _ in range(nr):
                    h, _ = layer(h, r)
            return h
        kvs0 = None
        gate = h.new_full((1,), self.args.recursion_gate) if self.args.recursion_gate else None
        for step in range(nr):
            share = self.args.kv_mode == "share" and step > 0
            f, kvs = self.apply_once(h, r, None, kvs0 if share else None)
            h = self.update(h, f, gate)
            if step == 0:
                kvs0 = kvs
        return h

    def _routed(self, h: torch.Tensor, rope: torch.Tensor, routing: str) -> StackOut:
        """MoR's recursion. Each step picks the tokens that continue (the routing kind's rule), gathers
        them into a compacted batch at their original RoPE positions, runs the shared layers once and
        scatters h + g * f(h) back to those tokens; the others pass through unchanged.

        A step's compacted length is exact for expert top-k (static k). For per-token decisions it is the
        busiest sequence's count rounded up by `bucket_size`: one host sync per forward for token choice
        (all depths are known up front), one per thresholded step for causal and expert-threshold routing,
        and no other (estimate.DOCUMENTED_SYNCS, checked by tests/test_syncs.py).
        """
        a = self.args
        b, t, _ = h.shape
        aux: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        sums: dict[str, torch.Tensor] = {}
        log = _ExpertLog()
        busiest: list[int] = []
        if a.router == "token":
            choice, tc_gate = self._token_choice(h, aux, stats)
            sums["tc_load"] = stats["tc_load"]
            steps = torch.arange(a.num_recursions, device=h.device)
            busiest = (choice.unsqueeze(-1) >= steps).sum(1).amax(0).tolist()
        active = torch.ones(b, t, dtype=torch.bool, device=h.device)
        depth = torch.zeros(b, t, dtype=torch.long, device=h.device)
        full_pos = torch.arange(t, device=h.device).expand(b, t)
        n: int | None = None  # compacted length; None = every token, no gather
        kvs0: list[KV] | None = None
        pos0, valid0 = full_pos, None
        moments = []
        for step in range(a.num_recursions):
            if a.router == "token":
                sel, gate = choice >= step, tc_gate
                n = None if step == 0 else bucket_size(busiest[step], t)  # every token runs step 0
            else:
                sel, gate, n = self._expert_pick(step, h, active, routing, n, log)
            moments.append(self._gate_moments(sel, gate))
            idx, valid = (None, None) if n is None else compact(sel, n)
            x, pos = (h, full_pos) if idx is None else (_gather(h, idx), idx)
            share = a.kv_mode == "share" and step > 0
            mask = None
            if share and (idx is not None or valid0 is not None):
                # Queries are a subset of the step-0 keys: each sees the real keys at or before it.
                # Padding queries see every key, so no row is empty (NaN) even though it is discarded.
                allowed = pos0[:, None, :] <= pos[:, :, None]
                if valid0 is not None:
                    allowed = allowed & valid0[:, None, :]
                if valid is not None:
                    allowed = allowed | ~valid[:, :, None]
                mask = allowed.unsqueeze(1)
            step_rope = rope[:t][None, None] if idx is None else rope[pos].unsqueeze(1)
            f, kvs = self.apply_once(x, step_rope, mask, kvs0 if share else None)
            if step == 0:
                kvs0, pos0, valid0 = kvs, pos, valid
            upd = self.update(x, f, gate if idx is None else _gather(gate, idx))
            if valid is not None:
                upd = torch.where(valid.unsqueeze(-1), upd, x)
            h = upd if idx is None else h.scatter(1, idx.unsqueeze(-1).expand_as(upd), upd)
            depth = depth + sel.long()
            active = sel
        side: dict[str, torch.Tensor] = {}
        if log.bce:
            aux["router_bce"] = a.aux_loss_coef * sum(log.bce, h.new_zeros((), dtype=torch.float32))
            if a.z_loss_coef:
                aux["router_z"] = a.z_loss_coef * sum(log.z, h.new_zeros((), dtype=torch.float32))
            if log.aux_bce:
                side["aux_router_bce"] = a.aux_router_coef * sum(log.aux_bce, h.new_zeros((), dtype=torch.float32))
            stats["sampling_acc"] = torch.stack(log.acc).mean()
            stats["score_selected"] = torch.stack(log.s_sel).mean()
            stats["score_unselected"] = torch.stack(log.s_uns).nanmean()
            stats["dead_token_ratio"] = torch.stack(log.dead[1:] or log.dead).mean()
        if log.agree:
            stats["topk_agreement"] = torch.stack(log.agree).mean()
        if log.kth:
            sums["threshold_sums"] = torch.stack(log.kth)
        sums["gate_moments"] = torch.stack(moments)
        if not a.topk_routing or routing != "topk":  # top-k's depths are its capacities: nothing to report
            stats.update(self._depth_stats(depth))
            sums["depth_counts"] = stats["tokens_per_depth"]  # what the trainer's FLOP counter charges
        return h, aux, side, stats, sums, depth

    def _token_choice(
        self, h: torch.Tensor, aux: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token choice: one router on the stack input picks each token's depth. Returns the chosen depth
        index (batch, seq) and the gate (batch, seq, 1); adds the balancing terms and the load."""
        a = self.args
        nr = a.num_recursions
        logits, probs, choice, gate = self.token_depth(h)  # logits, probs: (batch, seq, Nr)
        load = F.one_hot(choice, nr).float().flatten(0, 1).sum(0)  # tokens per depth
        if a.balancing == "loss":
            # Sigmoid scores are normalized over the depths for this term (as DeepSeek-V3 does): raw
            # sigmoids only ever get pushed down by it, shrinking every gate instead of moving tokens.
            share = probs if a.router_activation == "softmax" else probs / probs.sum(-1, keepdim=True)
            aux["balance"] = a.balance_loss_coef * (share.flatten(0, 1).mean(0) * load / load.sum() * nr).sum()
        if a.z_loss_coef:
            aux["router_z"] = a.z_loss_coef * torch.logsumexp(logits, -1).square().mean()
        stats["tc_load"] = load.detach()
        stats["maxvio"] = (load.max() / load.mean() - 1).detach()
        return choice, gate

    def _expert_pick(
        self, step: int, h: torch.Tensor, active: torch.Tensor, routing: str, n: int | None, log: _ExpertLog
    ) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """Expert choice at one step: which tokens continue, their gate and the compacted length.

        "topk": the top k_r of the step's candidates (the tokens active so far) per sequence; logs the
        router BCE against that choice. "causal": continue iff the score clears the threshold (steps
        with capacity 1 keep every active token); `n` is the previous step's length. Expert-threshold
        models route causally in both modes; in "topk" (training) they log the BCE against top-k and
        the per-sequence k-th score that their thresholds follow.
        """
        a = self.args
        b, t = h.shape[:2]
        ks = [t, *a.tokens_per_step(t)]
        k = ks[step + 1]
        # The step's nominal candidates, selected and left out: the counts of top-k, by which the router's
        # losses and statistics are averaged, so that they do not depend on how a batch is split.
        counts = b * ks[step], b * k, b * (ks[step] - k)
        full = a.step_capacities[step] >= 1.0
        logits = self.expert_logits(h, step)  # (batch, seq)
        scores = torch.sigmoid(logits)
        gate = self.expert_gate(logits)
        if a.expert_rule == "threshold":
            sel = active & self.causal_continue(scores, step)
            if routing == "topk":
                top_sel = self._top_k(logits, active, k)
                self._log_router(log, logits, scores, active, top_sel, sel, sel, counts)
                kth = scores.detach().masked_fill(~active, 0.0).topk(k, dim=1).values[:, -1]
                log.kth.append(kth.sum() * (not full))
            return sel, gate, n if full else bucket_size(int(sel.sum(1).max()), t)
        if routing == "causal":
            if full:
                return active, gate, n
            score = self.decision_scores(h, step, logits)
            sel = active & self.causal_continue(score, step)
            with torch.no_grad():
                top = score.masked_fill(~active, -1.0).topk(k, dim=1).indices
                topk_sel = torch.zeros_like(active).scatter(1, top, True) & active
                log.agree.append(_masked_mean((sel == topk_sel).float(), active))
            return sel, gate, bucket_size(int(sel.sum(1).max()), t)
        sel = self._top_k(logits, active, k)
        if len(self.routers):  # random scores train nothing: no router loss, no router statistics
            self._log_router(log, logits, scores, active, sel, sel, scores >= 0.5, counts)
        if len(self.aux_routers):
            aux_logits = self.aux_routers[step](h.detach()).squeeze(-1)
            bce = F.binary_cross_entropy_with_logits(aux_logits, sel.float(), reduction="none")
            log.aux_bce.append(_masked_mean(bce, active))
        return sel, gate, None if k >= t else k

    def _gate_moments(self, sel: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Sums over the tokens `sel` that run a step of their gates (batch, seq, 1): (tokens, c x tokens,
        sum of g - c, sum of (g - c)^2), about c = alpha / 2, the middle of a gate's range, so that the
        spread, often a thousandth of the mean, survives float32. Summed over the global batch they give the
        gate's mean and sd however the batch was split (trainer.gate_stats)."""
        c = self.args.router_alpha / 2
        n = sel.sum().float()
        d = (gate.detach().squeeze(-1).float() - c) * sel
        return torch.stack([n, c * n, d.sum(), d.square().sum()])

    @staticmethod
    def _top_k(logits: torch.Tensor, active: torch.Tensor, k: int) -> torch.Tensor:
        """The k highest-scoring active tokens of each sequence (all active ones when there are no more)."""
        if k >= logits.shape[1]:
            return active
        top = logits.masked_fill(~active, float("-inf")).topk(k, dim=1, sorted=False).indices
        return torch.zeros_like(active).scatter(1, top, True) & active

    @staticmethod
    def _log_router(
        log: _ExpertLog,
        logits: torch.Tensor,
        scores: torch.Tensor,
        active: torch.Tensor,
        target: torch.Tensor,
        sel: torch.Tensor,
        decided: torch.Tensor,
        counts: tuple[int, int, int],
    ) -> None:
        """The router's BCE against the top-k `target` and z-loss over the active tokens, and statistics:
        how often `decided` agrees with the target, the mean scores of the selected `sel` and the rest.
        Each is a sum over the nominal `counts` (candidates, selected, left out): exact means for top-k,
        per nominal token for expert-threshold, whose realized counts vary by micro-batch."""
        cand, n_sel, n_uns = counts
        bce = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
        log.bce.append(_masked_mean(bce, active, cand))
        log.z.append(_masked_mean(logits.square(), active, cand))
        with torch.no_grad():
            log.acc.append(_masked_mean((decided == target).float(), active, cand))
            log.s_sel.append(_masked_mean(scores, sel, n_sel))
            log.s_uns.append(_masked_mean(scores, active & ~sel, n_uns))  # 0 / 0 = NaN when all candidates stay
            log.dead.append(_masked_mean((scores < 1e-2).float(), active, cand))

    def _depth_stats(self, depth: torch.Tensor) -> dict[str, torch.Tensor]:
        counts = F.one_hot(depth.flatten(), self.args.num_recursions + 1).sum(0)
        return {"tokens_per_depth": counts.detach(), "mean_depth": depth.float().mean().detach()}

    @torch.no_grad()
    def update_depth_bias(self, load: torch.Tensor) -> None:
        """Loss-free balancing: push selection towards under-loaded depths. Call after optimizer.step()
        with the load summed over the global batch, so every rank applies the same update."""
        if self.args.router == "token" and self.args.balancing == "loss_free":
            self.depth_bias += self.args.bias_update_rate * torch.sign(load.mean() - load)

    @torch.no_grad()
    def update_thresholds(self, target: torch.Tensor) -> None:
        """Expert-threshold routing: move each step's threshold towards `target` (Nr,), the global batch's
        mean per-sequence k-th largest score, i.e. the threshold that would have passed each step's
        capacity. Call after optimizer.step(); every rank applies the same update, on the device."""
        if self.expert_threshold is None or self.threshold_updates is None:
            return
        self.threshold_updates += 1
        rate = self.threshold_updates.reciprocal().clamp(min=self.args.threshold_rate)
        self.expert_threshold += rate * (target.to(self.expert_threshold) - self.expert_threshold)


class MoRModel(nn.Module):
    rope: torch.Tensor

    def __init__(self, args: ModelArgs):
        super().__init__()
        args.validate()
        if args.vocab_size < 1:
            raise ValueError("model.vocab_size is 0: resolve it from the tokenizer before building the model")
        self.args = args
        block = lambda: Block(args.d_model, args.n_heads, args.n_kv_heads, args.d_ffn, args.norm_eps)  # noqa: E731
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.d_model)
        self.first = block() if args.middle else None
        self.stack = RecursionStack(args)
        self.last = block() if args.middle else None
        self.norm = RMSNorm(args.d_model, args.norm_eps)
        self.output = None if args.tie_embeddings else nn.Linear(args.d_model, args.vocab_size, bias=False)
        self.register_buffer("rope", rope_table(args.head_dim, args.max_seq_len, args.rope_theta), persistent=False)

    def init_weights(self) -> None:
        """Initialize every parameter and buffer (after `to_empty` from the meta device).

        Embeddings and input projections: truncated normal, std = init_std. Output projections of
        attention and FFN (wo, w2): std = init_std / sqrt(2 * n_layers), n_layers counting every
        application, so the residual stream's variance does not grow with depth. Untied head: d^-0.5.
        """
        a = self.args
        std, out_std = a.init_std, a.init_std / math.sqrt(2 * a.n_layers)
        self.rope.copy_(rope_table(a.head_dim, a.max_seq_len, a.rope_theta, device=self.rope.device))
        nn.init.trunc_normal_(self.tok_embeddings.weight, std=std, a=-3 * std, b=3 * std)
        for blk in (self.first, self.last):
            if blk is not None:
                blk.init_weights(std, out_std)
        self.stack.init_weights(std, out_std)
        self.norm.init_weights()
        if self.output is not None:
            hs = a.d_model**-0.5
            nn.init.trunc_normal_(self.output.weight, std=hs, a=-3 * hs, b=3 * hs)

    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        routing: Literal["topk", "causal"] = "topk",
        return_logits: bool = True,
        ignore_index: int = -100,
    ) -> ModelOutput:
        """tokens, labels: (batch, seq) int64. labels equal to ignore_index are not scored."""
        if routing not in ("topk", "causal"):
            raise ValueError(f"routing must be 'topk' or 'causal', got {routing!r}")
        t = tokens.shape[1]
        if t > self.args.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds max_seq_len={self.args.max_seq_len}")
        h = self.tok_embeddings(tokens)
        r = self.rope[:t][None, None]
        if self.first is not None:
            h, _ = self.first(h, r)
        h, aux, side, stats, sums, depth = self.stack(h, self.rope, routing)
        if self.last is not None:
            h, _ = self.last(h, r)
        h = self.norm(h)
        weight = self.head_weight()
        big = tokens.numel() * weight.shape[0] > LOGITS_CHUNK_ELEMENTS
        logits = None if labels is not None and big and not return_logits else F.linear(h, weight)
        lm_loss = loss = None
        if labels is not None:
            if logits is None:
                lm_loss = chunked_lm_loss(h.flatten(0, 1), weight, labels.flatten(), ignore_index)
            else:
                lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=ignore_index)
            loss = lm_loss + sum([*aux.values(), *side.values()]) if aux or side else lm_loss
        return ModelOutput(loss, lm_loss, logits if return_logits else None, aux, side, stats, sums, depth)

    def update_routing(self, sums: dict[str, torch.Tensor], sequences: int) -> None:
        """After an optimizer step, the router state that gradients do not train, from the global batch's
        `router_sums` over `sequences` sequences: token choice's loss-free bias from its load (tc_load),
        expert-threshold's thresholds from the per-sequence k-th scores (threshold_sums)."""
        if "tc_load" in sums:
            self.stack.update_depth_bias(sums["tc_load"])
        if "threshold_sums" in sums:
            self.stack.update_thresholds(sums["threshold_sums"] / sequences)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Unique parameters (each shared tensor counted once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.tok_embeddings.weight.numel()
            if self.output is not None:
                n -= self.output.weight.numel()
        return n
