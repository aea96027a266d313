"""FLOP accounting under two conventions, stated in full in docs/FLOPS.md.

- `paper_flops_per_token`: the convention behind the MoR paper's isoFLOP budgets (MOR_FACTS s7). Forward
  only, no embedding or head, K/V projections counted as d x d (GQA ignored), per applied layer:
  2 (4 d^2 + 3 d d_ffn) c_q + 2 T d c_q c_kv, with c_q the fraction of tokens running that layer: the
  expert capacities, and for token choice the perfectly balanced fractions (Nr - r) / Nr the paper assumes.
  Use it to plan budgets comparable with the paper; `budget` turns a budget into steps with the paper's
  rounding.
- `executed_flops` / `executed_flops_per_token`: useful model FLOPs for MFU. Forward + backward, real GQA
  shapes, every matmul with a weight on the rows each recursion step routes (top-k sizes for expert
  choice; for token choice and expert-threshold the depths tokens actually ran, when given), attention over causal
  (query, key) pairs only, routers and LM head included, embedding free. Padding of compacted steps and
  activation-checkpoint recompute are not useful work and are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mor_pretrain.models.mor import ModelArgs


def paper_capacities(args: ModelArgs) -> list[float]:
    """Fraction of tokens running each recursion step under the paper's convention."""
    n = args.num_recursions
    if args.router == "token":
        return [(n - r) / n for r in range(n)]  # perfectly balanced token choice
    return args.step_capacities


def _layer_caps(args: ModelArgs) -> list[tuple[float, float, bool]]:
    """(c_q, c_kv, computes_kv) for every applied layer, under the paper's fractional capacities."""
    out: list[tuple[float, float, bool]] = []
    edge = [(1.0, 1.0, True)] if args.middle else []
    out += edge
    for r, c in enumerate(paper_capacities(args)):
        share = args.kv_mode == "share" and r > 0
        out += [(c, 1.0 if share else c, not share)] * args.num_shared
    return out + edge


def paper_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    d, f, t = args.d_model, args.d_ffn, seq_len
    total = 0.0
    for c_q, c_kv, computes_kv in _layer_caps(args):
        proj = 4 * d * d if computes_kv else 2 * d * d
        total += 2 * (proj + 3 * d * f) * c_q + 2 * t * d * c_q * c_kv
    return total


def causal_pairs(n_q: float, n_k: float) -> float:
    """Causal (query, key) pairs when n_q queries are a subset of n_k key positions: n (n + 1) / 2 for a
    step's own tokens; queries spread over the sequence see about half the keys each otherwise."""
    if n_q == n_k:
        return n_q * (n_q + 1) / 2
    return n_q * (n_k + 1) / 2


@dataclass
class FlopCount:
    """Executed FLOPs per token (forward + backward), split the way a profiler sees them."""

    linear: float  # matmuls with a weight: projections, FFN, routers, LM head
    attention: float  # QK^T and AV over causal pairs

    @property
    def total(self) -> float:
        return self.linear + self.attention


def routed_rows(args: ModelArgs, seq_len: int, depth_counts: Sequence[float] | None = None) -> list[float]:
    """Mean tokens per sequence that run each recursion step. depth_counts: how many tokens ran d steps,
    d = 0..Nr (the model's tokens_per_depth), for routers that decide per token (token choice,
    expert-threshold); without it, top-k's sizes or the paper's capacities."""
    t, n = seq_len, args.num_recursions
    if depth_counts is not None and args.router != "none":
        total = sum(depth_counts)
        if len(depth_counts) != n + 1 or total <= 0 or min(depth_counts) < 0:
            raise ValueError(
                f"depth_counts needs {n + 1} non-negative counts with a positive sum, got {list(depth_counts)}"
            )
        return [t * sum(depth_counts[r + 1 :]) / total for r in range(n)]
    if args.router == "expert":
        return [float(k) for k in args.tokens_per_step(t)]
    return [t * c for c in paper_capacities(args)]


def executed_flops(args: ModelArgs, seq_len: int, depth_counts: Sequence[float] | None = None) -> FlopCount:
    """Useful FLOPs per token of MoRModel.forward(routing="topk") + backward (docs/FLOPS.md)."""
    d, f, t = args.d_model, args.d_ffn, seq_len
    hd, h, kvh = args.head_dim, args.n_heads, args.n_kv_heads
    per_row = 2 * (2 * d * h * hd + 3 * d * f)  # q, o, FFN
    kv_row = 2 * 2 * d * kvh * hd
    pair = 2 * 2 * h * hd  # QK^T and AV
    linear = attn = 0.0  # forward FLOPs of one sequence
    if args.middle:
        linear += 2 * t * (per_row + kv_row)
        attn += 2 * pair * causal_pairs(t, t)
    rows = routed_rows(args, t, depth_counts)
    for r, n in enumerate(rows):
        share = args.kv_mode == "share" and r > 0
        linear += args.num_shared * n * (per_row + (0 if share else kv_row))
        attn += args.num_shared * pair * causal_pairs(n, rows[0] if share else n)
    out = {"expert": 1, "token": args.num_recursions}.get(args.router, 0)
    mlp = args.router_arch == "mlp"
    n_routers = {"expert": args.num_recursions, "token": 1}.get(args.router, 0) * (args.expert_rule != "random")
    linear += n_routers * 2 * t * (d * d * mlp + d * out)  # every router scores every position
    linear += 2 * t * d * args.vocab_size  # LM head
    # Backward = 2 x forward, except the auxiliary routers: their input is detached, so their first
    # layer computes weight gradients only (backward = forward, + the second layer's input grad for mlp).
    aux_fwd = 2 * t * (d * d * mlp + d * out)
    aux = args.num_recursions * (2 * aux_fwd + 2 * t * d * out * mlp) if args.aux_router else 0
    return FlopCount(linear=(3 * linear + aux) / t, attention=3 * attn / t)


def executed_flops_per_token(args: ModelArgs, seq_len: int, depth_counts: Sequence[float] | None = None) -> float:
    """Useful FLOPs per token, forward + backward; see `executed_flops`."""
    return executed_flops(args, seq_len, depth_counts).total


@dataclass
class Budget:
    flops_per_token: float
    tokens: float
    steps: int


def budget(flops_per_token: float, total_flops: float, tokens_per_step: int) -> Budget:
    """Tokens and optimizer steps a FLOP budget buys, with the one rounding rule of the project, the
    paper's (it reproduces every published step count): FLOPs per token rounded to 0.1 MFLOP, as its
    tables print them, then steps rounded to the nearest integer."""
    flops_per_token = round(flops_per_token, -5)
    tokens = total_flops / flops_per_token
    return Budget(flops_per_token, tokens, round(tokens / tokens_per_step))
