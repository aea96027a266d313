"""AdamW with weight-decay groups, gradient clipping that is exact under FSDP2/TP, and LR schedules."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from mor_pretrain.config import OptimizerConfig


def param_groups(model: nn.Module, decay_all: bool) -> list[dict]:
    """Two AdamW groups: matrices decay; norms, biases and embeddings do not (unless decay_all).

    A tied head shares the embedding's tensor, so it is not decayed either; an untied head is a matrix.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if decay_all or (p.ndim >= 2 and id(p) not in embeddings):
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over `model`'s parameters; the fused kernel on GPU."""
    on_gpu = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, cfg.decay_norms_and_embeddings),
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=on_gpu,
    )


def lr_factor(step: int, total: int, cfg: OptimizerConfig) -> float:
    """LR multiplier for optimizer step `step` (0-based) of `total`.

    Linear warmup reaching 1 at the end of warmup; then wsd: flat, and a linear decay over the last
    decay_fraction of the steps reaching min_lr_ratio at the final step; cosine: half a cosine from 1 to
    min_lr_ratio over the steps after warmup; constant: flat.
    """
    warmup = round(cfg.warmup_fraction * total)
    if step < warmup:
        return (step + 1) / warmup
    lo = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(total - warmup, 1)
        progress = min((step - warmup + 1) / span, 1.0)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
    decay = round(cfg.decay_fraction * total)
    start = total - decay
    if step < start or decay == 0:
        return 1.0
    progress = min((step - start + 1) / decay, 1.0)
    return 1.0 - (1.0 - lo) * progress


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, total_steps: int) -> LambdaLR:
    """A LambdaLR following `lr_factor`; call .step() once after each optimizer step."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))


@torch.no_grad()
def grad_norm(params: Iterable[nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients, exact for any mix of plain, FSDP and TP (DTensor) gradients.

    Each DTensor gradient contributes its local sum of squares, summed over the mesh dims where it is
    sharded and counted once where it is replicated. Grads are grouped by those process groups so there is
    one all-reduce per group, not per tensor.
    """
    buckets: dict[tuple, torch.Tensor] = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        groups: tuple = ()
        if isinstance(g, DTensor):
            if any(pl.is_partial() for pl in g.placements):
                raise RuntimeError("grad_norm: a gradient is still Partial; reduce it before clipping")
            # every other placement is a shard (Shard, or _StridedShard under FSDP + TP)
            groups = tuple(g.device_mesh.get_group(i) for i, pl in enumerate(g.placements) if not pl.is_replicate())
            g = g.to_local()
        sq = g.float().square().sum()
        buckets[groups] = buckets[groups] + sq if groups in buckets else sq
    if not buckets:
        raise RuntimeError("grad_norm: no parameter has a gradient")
    total = None
    for groups, sq in buckets.items():
        for group in groups:
            dist.all_reduce(sq, group=group)
        total = sq if total is None else total + sq
    assert total is not None
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale gradients so their global norm is at most `max_norm` (0 = measure only); returns the norm
    before clipping. Stays on device: no host sync."""
    norm = grad_norm(params)
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            if p.grad is not None:
                g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                g.mul_(scale.to(g.dtype))
    return norm
