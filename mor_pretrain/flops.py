"""FLOP accounting under two conventions.

- `paper_flops_per_token`: the convention behind the MoR paper's isoFLOP budgets (MOR_FACTS s7). Forward
  only, no embedding or head, K/V projections counted as d x d (GQA ignored), per applied layer:
  2 (4 d^2 + 3 d d_ffn) c_q + 2 T d c_q c_kv, with c_q the fraction of tokens running that layer.
  Use it to plan budgets comparable with the paper.
- `executed_flops_per_token`: what the hardware really runs, for MFU. Forward + backward (3x forward),
  real GQA shapes, causal attention pairs only, routers and LM head included, the static top-k sizes
  actually used, K/V projections skipped where KV sharing reuses them. Activation-checkpoint recompute
  is not counted. Token-choice and causal expert routing run every step at full length (masked), so
  they are counted at full length: that is what executes.
"""

from __future__ import annotations

from dataclasses import dataclass

from mor_pretrain.models.mor import ModelArgs


def _layer_caps(args: ModelArgs) -> list[tuple[float, float, bool]]:
    """(c_q, c_kv, computes_kv) for every applied layer, under the paper's fractional capacities."""
    out: list[tuple[float, float, bool]] = []
    edge = [(1.0, 1.0, True)] if args.middle else []
    out += edge
    for r, c in enumerate(args.step_capacities):
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


def _attn_pairs(n_q: int, n_k: int) -> float:
    """Causal (query, key) pairs when queries are a subset of the keys' positions (n_q <= n_k)."""
    if n_q == n_k:
        return n_q * (n_q + 1) / 2
    return n_q * (n_k + 1) / 2  # queries spread over the sequence see about half the keys each


def executed_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Forward + backward FLOPs per token actually executed by MoRModel.forward(routing="topk")."""
    d, f, t = args.d_model, args.d_ffn, seq_len
    hd, h, kvh = args.head_dim, args.n_heads, args.n_kv_heads
    q_o = 2 * d * h * hd
    kv = 2 * d * kvh * hd
    ffn = 3 * d * f

    def layer(n_q: int, n_k: int, computes_kv: bool) -> float:
        linear = 2 * n_q * (q_o + ffn) + (2 * n_k * kv if computes_kv else 0)
        attn = 2 * 2 * h * hd * _attn_pairs(n_q, n_k)  # QK^T and AV
        return linear + attn

    total = 0.0
    if args.middle:
        total += 2 * layer(t, t, True)
    masked = args.router == "token"
    ks = [t] * args.num_recursions if masked else args.tokens_per_step(t)
    out = {"expert": 1, "token": args.num_recursions}.get(args.router, 0)
    router_fwd = (2 * d * d + 2 * d * out) if args.router_arch == "mlp" else 2 * d * out
    n_cand = t
    for r, k in enumerate(ks):
        share = args.kv_mode == "share" and r > 0
        total += args.num_shared * layer(k, ks[0] if share else k, not share)
        if args.router == "expert":
            total += router_fwd * n_cand * (2 if args.aux_router else 1)
            n_cand = k
    if args.router == "token":
        total += router_fwd * t
    total += 2 * t * d * args.vocab_size  # LM head
    return 3 * total / t


@dataclass
class Budget:
    flops_per_token: float
    tokens: float
    steps: int


def budget(flops_per_token: float, total_flops: float, tokens_per_step: int, paper_rounding: bool = False) -> Budget:
    """Tokens and optimizer steps a FLOP budget buys; steps rounded down.

    paper_rounding reproduces the paper's published step counts (reverse-engineered): FLOPs per token
    rounded to 0.1 MFLOP, as printed in its tables, and steps rounded to the nearest integer.
    """
    if paper_rounding:
        flops_per_token = round(flops_per_token, -5)
    tokens = total_flops / flops_per_token
    steps = round(tokens / tokens_per_step) if paper_rounding else int(tokens // tokens_per_step)
    return Budget(flops_per_token, tokens, steps)
