"""Parallelism for MoRModel: the device mesh and the parallelize plan, kept out of the model.

`parallelize` applies, in this order: tensor parallel -> activation checkpointing -> torch.compile -> FSDP2.
Each step is one small `apply_*` function. The model stays single-device code; everything here works on
its module tree (tok_embeddings, first, stack.layers, stack.routers, last, norm, output).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleOutput,
    RowwiseParallel,
    parallelize_module,
)
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from mor_pretrain.config import ConfigError, ParallelismConfig
from mor_pretrain.models import ModelArgs, MoRModel

MESH_DIMS = ("dp_replicate", "dp_shard", "tp")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def mesh_shape(cfg: ParallelismConfig, world_size: int) -> tuple[int, int, int]:
    """(dp_replicate, dp_shard, tp) for this world size; dp_shard = -1 takes what is left."""
    rep, shard, tp = cfg.dp_replicate, cfg.dp_shard, cfg.tp
    if shard == -1:
        if world_size % (rep * tp):
            raise ConfigError(
                f"world size {world_size} is not divisible by parallelism.dp_replicate x parallelism.tp = {rep * tp}"
            )
        shard = world_size // (rep * tp)
    if rep * shard * tp != world_size:
        raise ConfigError(
            f"parallelism.dp_replicate x dp_shard x tp = {rep} x {shard} x {tp} = {rep * shard * tp} "
            f"does not equal the world size {world_size}"
        )
    return rep, shard, tp


def build_mesh(cfg: ParallelismConfig, device_type: str) -> DeviceMesh:
    """A 3-D mesh (dp_replicate, dp_shard, tp) over the initialized default process group. A CPU mesh has
    gloo groups of its own, whatever the default group's backend (see mor_pretrain.distributed)."""
    shape = mesh_shape(cfg, dist.get_world_size())
    override: dict[int | str, Any] | None = {dim: "gloo" for dim in MESH_DIMS} if device_type == "cpu" else None
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS, backend_override=override)


def dp_coordinates(mesh: DeviceMesh) -> tuple[int, int]:
    """(dp_rank, dp_world): this rank's data shard. Ranks that differ only in tp read the same data."""
    rep, shard = mesh["dp_replicate"], mesh["dp_shard"]
    return rep.get_local_rank() * shard.size() + shard.get_local_rank(), rep.size() * shard.size()


def parallelize(model: MoRModel, mesh: DeviceMesh, cfg: ParallelismConfig, compute_dtype: torch.dtype) -> MoRModel:
    """Apply TP, activation checkpointing, compile and FSDP2 to `model` in place (build it on meta first)."""
    if mesh["tp"].size() > 1:
        apply_tp(model, mesh["tp"])
    if cfg.activation_checkpoint != "none":
        apply_ac(model, cfg.activation_checkpoint)
    if cfg.compile:
        apply_compile(model)
    apply_fsdp(model, mesh, compute_dtype, DTYPES[cfg.reduce_dtype], reshards(model, cfg, compute_dtype))
    return model


RESHARD_ABOVE_BYTES = 2 * 2**30  # gathered parameters (compute dtype) above which "auto" reshards


def reshards(model: MoRModel, cfg: ParallelismConfig, compute_dtype: torch.dtype) -> bool:
    """Whether FSDP frees gathered parameters after forward: the config's choice, or by model size. Kept
    gathered, a unit's parameters cost their full size per rank from forward to backward; resharded, the
    backward gathers them again."""
    if cfg.reshard_after_forward != "auto":
        return cfg.reshard_after_forward == "always"
    gathered = sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=compute_dtype).element_size()
    return gathered > RESHARD_ABOVE_BYTES


def unique_blocks(model: MoRModel) -> list[nn.Module]:
    """Every Block module: the unique first/last blocks and the stack's shared layers."""
    edge = [b for b in (model.first, model.last) if b is not None]
    return [*edge, *model.stack.layers]


def check_tp(a: ModelArgs, n: int) -> None:
    """Tensor parallel over n ranks splits heads, KV heads, the FFN and the vocabulary n ways."""
    if a.n_heads % n or a.n_kv_heads % n or a.d_ffn % n or a.vocab_size % n:
        raise ConfigError(
            f"parallelism.tp={n} must divide model.n_heads ({a.n_heads}), n_kv_heads ({a.n_kv_heads}), "
            f"d_ffn ({a.d_ffn}) and vocab_size ({a.vocab_size})"
        )


def apply_tp(model: MoRModel, tp_mesh: DeviceMesh) -> None:
    """Megatron-style TP: q/k/v and w1/w3 colwise, o and w2 rowwise, vocab-sharded embedding and head.

    Sequence parallel is not used: expert-choice routing gathers and scatters tokens along the sequence,
    which needs the whole sequence on every rank. So activations between blocks, the norms and the routers
    stay replicated over TP, and every TP rank computes the same scores and the same top-k (rowwise
    outputs are all-reduced, so the stack's inputs are bitwise equal across TP ranks).
    """
    check_tp(model.args, tp_mesh.size())
    block_plan = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }
    for block in unique_blocks(model):
        parallelize_module(block, tp_mesh, block_plan)
    # The head is F.linear(norm(h), weight) inside MoRModel.forward: its weight is sharded over the vocab
    # (Shard(0)), and the final norm hands out a replicated DTensor so the logits come out vocab-sharded
    # for loss_parallel(). An untied head's Linear is never called as a module, so only its weight moves.
    root_plan: dict[str, Any] = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
        "norm": PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=Replicate(), use_local_output=False
        ),
    }
    if model.output is not None:
        root_plan["output"] = ColwiseParallel()
    parallelize_module(model, tp_mesh, root_plan)


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Keep the outputs of matmuls and attention (expensive); recompute norms, RoPE, SiLU (cheap)."""
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _checkpoint_forward(module: nn.Module, context_fn: Callable[[], Any] | None) -> None:
    """Recompute `module`'s forward in backward. The forward is replaced on the instance rather than
    wrapping the module, so module types and parameter names (state dicts, init_weights) do not change."""
    forward = module.forward
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if context_fn is not None:
        kwargs["context_fn"] = context_fn

    def checkpointed(*args: Any, **kw: Any) -> Any:
        return checkpoint(forward, *args, **kwargs, **kw)

    module.forward = checkpointed


def apply_ac(model: MoRModel, mode: str) -> None:
    """Checkpoint every block application: each call of a shared layer (Nr per forward) is its own region.

    Routers, the top-k, the gather/scatter and the auxiliary losses run outside the checkpointed regions,
    so routing decisions are made once and the aux losses keep their graph (the MoR authors' checkpointing
    lost both).
    """
    if mode not in ("full", "selective"):
        raise ConfigError(f"parallelism.activation_checkpoint must be none, full or selective, got {mode!r}")
    context_fn = partial(create_selective_checkpoint_contexts, _selective_policy) if mode == "selective" else None
    for block in unique_blocks(model):
        _checkpoint_forward(block, context_fn)


def apply_compile(model: MoRModel) -> None:
    """Regional compile: each block on its own (before fully_shard: FSDP hooks break whole-model graphs).
    The shared layers see a few sequence lengths (one per recursion step); dynamo marks that dim dynamic
    after the first change, so compiles stop after the first steps."""
    for block in unique_blocks(model):
        block.compile(fullgraph=True)


def apply_fsdp(
    model: MoRModel, mesh: DeviceMesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype, reshard: bool
) -> None:
    """FSDP2 units: first, last, the whole recursion stack, an untied embedding, then the root.

    The recursion stack (shared layers + routers + the recursion loop) is ONE unit on purpose: FSDP
    all-gathers a unit's parameters when the unit's forward starts. Wrapping a shared layer itself would
    gather (and reshard) it once per application, Nr times each way per step; wrapping the module that
    runs the loop gathers the shared weights once per forward and once per backward, whatever Nr is.
    A tied embedding is also the head's weight, used in the root's forward, so it stays in the root unit.
    """
    dp_mesh = mesh["dp_replicate", "dp_shard"] if mesh["dp_replicate"].size() > 1 else mesh["dp_shard"]
    # No input casts: the activations come out of bf16 weights in bf16 anyway, and the one float input
    # that is not an activation, the RoPE table, must stay fp32 (rotations at bf16 lose position accuracy).
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    shard = partial(fully_shard, mesh=dp_mesh, mp_policy=policy)
    # The first and last blocks also return their K/V for caches and KV sharing; V is a view of its
    # projection. FSDP2 warns about view outputs because an in-place write would skip its hook; the model
    # never writes activations in place, and the FSDP tests compare gradients with the unsharded model.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPBlock\) returned a view tensor")
    for block in (model.first, model.stack, model.last):
        if block is not None:
            shard(block, reshard_after_forward=reshard)
    if model.output is not None:
        shard(model.tok_embeddings, reshard_after_forward=reshard)
    # The root's parameters (norm, head) are needed again right at the start of backward.
    shard(model, reshard_after_forward=False)
