"""Llama-style building blocks: RMSNorm, RoPE, grouped-query attention, SwiGLU and the pre-norm block.

Attention takes explicit token positions so that a compacted (gathered) sequence keeps the RoPE phases of
its original positions, and it can reuse keys/values computed elsewhere (recursive KV sharing) or read and
write a cache (CacheView): the one attention body that training, generation and serving share.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


def rope_table(head_dim: int, max_len: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """(max_len, head_dim) table holding cos in the first half and sin in the second (rotate-half RoPE)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); rope: (batch, 1, seq, head_dim) gathered at each token's position."""
    half = x.shape[-1] // 2
    cos, sin = rope[..., :half], rope[..., half:]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.type_as(x)


@dataclass
class CacheView:
    """A cached forward's keys and values: `write(k, v)` stores the new tokens' (None: they store nothing,
    as under KV sharing), `read()` returns what the queries attend to under the forward's mask. Cached
    generation and the serving engine each lay out their caches their own way behind one of these."""

    write: Callable[[torch.Tensor, torch.Tensor], None] | None
    read: Callable[[], tuple[torch.Tensor, torch.Tensor]]


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)

    def project_kv(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        k = self.wk(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        return apply_rope(k, rope), v

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: CacheView | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x: (batch, seq, dim). mask: boolean (batch, 1, seq, kv_seq), True = may attend; None = causal.

        kv: precomputed (keys, values), each (batch, kv_heads, kv_seq, head_dim); when given, this layer
        projects only queries. cache: the new keys/values go to the cache and the queries attend to what it
        holds (generation, serving). Returns the output and the keys/values it attended to.
        """
        b, t, _ = x.shape
        q = apply_rope(self.wq(x).view(b, t, -1, self.head_dim).transpose(1, 2), rope)
        if cache is not None:
            if cache.write is not None:
                cache.write(*self.project_kv(x, rope))
            kv = cache.read()
        elif kv is None:
            kv = self.project_kv(x, rope)
        k, v = kv
        # The default scale is 1/sqrt(head_dim); spelled out so bf16 and fp32 paths agree.
        scale = 1.0 / math.sqrt(self.head_dim)
        gqa = self.n_heads != self.n_kv_heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1)), kv

    def init_weights(self, std: float, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(lin.weight, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std, a=-3 * out_std, b=3 * out_std)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, std: float, out_std: float) -> None:
        for lin in (self.w1, self.w3):
            nn.init.trunc_normal_(lin.weight, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.w2.weight, std=out_std, a=-3 * out_std, b=3 * out_std)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + ffn(norm(.))."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, d_ffn: int, norm_eps: float):
        super().__init__()
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.attention = Attention(dim, n_heads, n_kv_heads, dim // n_heads)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.feed_forward = FeedForward(dim, d_ffn)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: CacheView | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a, kv = self.attention(self.attention_norm(x), rope, mask, kv, cache)
        h = x + a
        return h + self.feed_forward(self.ffn_norm(h)), kv

    def init_weights(self, std: float, out_std: float) -> None:
        self.attention_norm.init_weights()
        self.ffn_norm.init_weights()
        self.attention.init_weights(std, out_std)
        self.feed_forward.init_weights(std, out_std)
