"""Size a run before it starts: trace one real training step at the real world size, without GPUs.

A fake process group of the run's world size (this process plays rank 0), a CPU device mesh and fake tensors
carry the project's own parallelize() and train_step() through one step: every op runs on shapes only. What
the trace sees:
- per-rank peak tensor memory by category (FSDP2's memory tracker): parameters, all-gathered parameters,
  gradients, optimizer state, activations, temporaries;
- every collective with its group size and bytes;
- host syncs (ops whose result the host must wait for: .item(), nonzero, ...);
- matmul FLOPs, attention FLOPs (from each call's shapes), and the bytes every other op reads and writes.
The optimizer is traced unfused: FSDP's memory tracker mislabels what the fused kernel touches. The unfused
step reads each parameter's step counter on the host, which the fused kernel a GPU runs does not, so host
syncs inside the optimizer step are not counted.
Two traces, with one and with two micro-batches, separate what each micro-batch costs from what the
optimizer step costs, so a step with any accumulation is predicted from them.

The step-time estimate, per rank, on a named GPU (`predict`): compute is the sum of
- matmuls at the card's sustained rate (GPU.sustained of the dense peak: 0.8 on an H100, measured);
- attention at the causal SDPA rate measured at its query length (H100_ATTENTION; compacted recursion steps
  run shorter, slower kernels), its FLOPs counted from each call's shapes, causal pairs only when causal;
- every other op's HBM traffic at HBM_EFFICIENCY of the datasheet bandwidth. Eager, each op reads its inputs
  and writes its outputs; with `compile = true` the blocks' elementwise ops fuse (a fused kernel reads what
  was made outside it once and writes what is used outside it once), and what a compiled block recomputes
  instead of saving is neither written nor read back (see _Traffic). The optimizer is the fused AdamW kernel.
Collectives run as rings, (n-1)/n of the bytes, at NVLink bandwidth within an 8-GPU node and InfiniBand
across nodes, overlapped with compute: a step takes max(compute, collectives). Kernel launches and host
time are not modeled. It is an estimate, not a bound: against the measured H100 steps it is within
ERROR_BAND (docs/BENCHMARKS.md, "Dry run against measured steps").
Memory: the traced allocated peak (less the saved activations compiled blocks recompute) and what the
device holds around it (`device_memory`: allocator slack, workspaces, NCCL buffers, CUDA context).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from mor_pretrain.config import JobConfig
from mor_pretrain.flops import causal_pairs, executed_flops_per_token
from mor_pretrain.models import MoRModel
from mor_pretrain.parallel import DTYPES, MESH_DIMS, mesh_shape, parallelize, unique_blocks

GiB = 2**30
GPU_NODE = 8  # GPUs per node behind NVLink; more ranks talk over InfiniBand


# Causal SDPA, forward + backward, by query length, on one H100 with torch 2.11 (flash, the backend that takes
# GQA; batch 16, 15/5 heads, head_dim 64: ../shared/DISTRIBUTED_FACTS.md). Short compacted steps waste the
# kernel: its rate falls with the length. Other cards scale this table by GPU.attention_scale.
H100_ATTENTION = ((682, 65e12), (1365, 118e12), (2048, 159e12))


@dataclass(frozen=True)
class GPU:
    """Datasheet figures (dense bf16 and tf32 peaks, HBM bandwidth and size, per-GPU NVLink and InfiniBand
    bandwidth, one direction) and what kernels sustain: `sustained`, the fraction of the matmul peak that
    large GEMMs reach; `attention_scale`, attention kernels' speed against an H100's (H100_ATTENTION)."""

    name: str
    bf16_flops: float
    tf32_flops: float
    hbm_bytes_per_s: float
    memory_bytes: float
    nvlink_bytes_per_s: float
    ib_bytes_per_s: float
    sustained: float = 0.8
    attention_scale: float = 1.0

    def attention_flops(self, query_len: int) -> float:
        """Causal SDPA FLOP/s at this query length: H100_ATTENTION interpolated, proportional to the length
        below its shortest row (a fixed cost per query block), flat above its longest."""
        rows = H100_ATTENTION
        if query_len <= rows[0][0]:
            rate = rows[0][1] * query_len / rows[0][0]
        elif query_len >= rows[-1][0]:
            rate = rows[-1][1]
        else:
            (t0, r0), (t1, r1) = next((a, b) for a, b in pairwise(rows) if a[0] <= query_len <= b[0])
            rate = r0 + (r1 - r0) * (query_len - t0) / (t1 - t0)
        return rate * self.attention_scale


# sustained: H100 measured (777-798 TFLOP/s of 989 on 8192^3 bf16 GEMMs); A100's 0.9 is the commonly reported
# figure and H200 shares H100's chip; B200 assumes H100's fraction. attention_scale: A100 from FlashAttention-2's
# published A100 rates (about 0.7 of what H100 runs with the same kernel); B200 unmeasured (2x, its matmul ratio
# at H100's efficiency would say 2.3). Only the H100 figures were measured; the rest are stated assumptions.
GPUS = {
    "A100": GPU("A100 SXM 80GB", 312e12, 156e12, 2.039e12, 80e9, 300e9, 25e9, 0.9, 0.7),
    "H100": GPU("H100 SXM", 989e12, 494.5e12, 3.35e12, 80e9, 450e9, 50e9, 0.8, 1.0),
    "H200": GPU("H200 SXM", 989e12, 494.5e12, 4.8e12, 141e9, 450e9, 50e9, 0.8, 1.0),
    "B200": GPU("B200", 2250e12, 1100e12, 8e12, 180e9, 900e9, 50e9, 0.8, 2.0),
}
HBM_EFFICIENCY = 0.85  # of the datasheet bandwidth that streaming elementwise kernels reach
ERROR_BAND = "+2% to +8% (3 H100 steps)"
MARGIN = 0.10  # of the card's memory kept free beyond the modeled reserve: the estimate's own error
# What the device holds beyond the allocated peak (see `device_memory`); measured on no GPU of ours yet.
ALLOCATOR_SLACK = 0.05  # the caching allocator's reserve over the allocated peak, with expandable segments
CUBLAS_WORKSPACE = 2 * 32 * 2**20  # cuBLAS / cuBLASLt workspaces on the compute stream
COMPILE_WORKSPACE = 256 * 2**20  # Triton autotuning and inductor's scratch
NCCL_BUFFERS = 256 * 2**20  # per communicator spanning several GPUs (ring channels' send/recv buffers)
CUDA_CONTEXT = 600 * 2**20  # the CUDA context and loaded kernels: outside torch's allocator

# Ops whose result the host must read before it can go on: a value (.item(), int(), float(), bool(),
# .tolist()), or a size that depends on the values (bincount sizes its output by the largest value).
HOST_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim", "bincount"}
_TOLIST_TAIL = "_tolist_tail"  # marks a tensor whose read a fake tensor's tolist() has already counted


def host_sync(func: Any, args: Any, kwargs: Any, out: Any, device: torch.device) -> str | None:
    """Which host sync `out = func(*args, **kwargs)` is (the host waits for the device) where the traced code
    computes on `device`, or None. The one classification of the dry run (a CPU trace) and of
    tests/test_syncs.py (fake CUDA tensors):
    - a read of a tensor on the device: an op of HOST_SYNC_OPS, or indexing with a boolean mask (a nonzero;
      not one mask set to a host scalar, `x[mask] = 0.0`, which index_put_ runs as masked_fill_). .tolist()
      is one read, though a fake tensor reads element by element (unbind, then .item() each): the elements
      after the first are not counted, so neither is a loop that reads a tensor's unbound elements;
    - a copy between host and device, unless non_blocking from pinned host memory (or to the host by `.to()`,
      which pins what it makes). On a CPU trace host and device are one: a tensor made from Python data
      (torch.tensor) counts as the copy it is on a GPU, unless it is a scalar (0-d), which may as well be a
      kernel's argument (the 0.0 of `x[mask] = 0.0`).
    """
    name = func._overloadpacket.__name__
    on_device = lambda t: t.device.type == device.type  # noqa: E731
    if name == "unbind":
        tail = getattr(args[0], _TOLIST_TAIL, False)
        for element in out if tail else out[1:]:
            setattr(element, _TOLIST_TAIL, True)
        return None
    if name in HOST_SYNC_OPS and on_device(args[0]) and not getattr(args[0], _TOLIST_TAIL, False):
        return name
    if name in ("index", "index_put", "index_put_") and on_device(args[0]):
        indices = [i for i in args[1] if i is not None]
        masked_fill = name != "index" and len(indices) == 1 and args[2].numel() == 1 and args[2].device.type == "cpu"
        if not masked_fill and any(i.dtype in (torch.bool, torch.uint8) for i in indices):
            return "boolean index"
    if name == "lift_fresh" and device.type == "cpu" and args[0].dim() > 0:
        return "host-to-device copy"
    if name in ("_to_copy", "copy_"):
        src, dst = (args[1], args[0].device) if name == "copy_" else (args[0], kwargs.get("device") or args[0].device)
        non_blocking = kwargs.get("non_blocking", False) or (name == "copy_" and len(args) > 2 and args[2])
        if src.device.type == "cpu" and torch.device(dst).type == device.type != "cpu":
            return None if non_blocking and src.is_pinned() else "host-to-device copy"
        if on_device(src) and device.type != "cpu" and torch.device(dst).type == "cpu":
            return None if non_blocking and (name == "_to_copy" or args[0].is_pinned()) else "device-to-host copy"
    return None


# Host syncs by model (ModelArgs.router_kind, kv_mode) and phase, each as (per unit, once), which
# tests/test_syncs.py counts on fake CUDA tensors (and the dry run counts a training step's alike):
# - train: per micro-batch, per optimizer step besides (train_step with nonfinite = "stop");
# - validate: per batch, per validate() call;
# - generate: per generated token after the first, per generate() call (one prompt, greedy);
# - serve: the same for one request through the serving engine (one slot, greedy).
# Generation and serving: tokens that run every recursion step, in the debug configs' layout (Nr = 3 with
# unique first and last blocks; vanilla without them). Expert-threshold reads one count per step of capacity
# below 1 (two of three), token choice one per forward.
_RECURSIVE = {"train": (0, 0), "validate": (2, 4), "generate": (25, 27), "serve": (23, 31)}
DOCUMENTED_SYNCS: dict[tuple[str, str], dict[str, tuple[int, int]]] = {
    ("vanilla", "recursion"): {"train": (0, 0), "validate": (2, 4), "generate": (11, 13), "serve": (13, 13)},
    ("recursive", "recursion"): _RECURSIVE,
    ("recursive", "share"): {**_RECURSIVE, "generate": (21, 23), "serve": (23, 27)},
    ("expert-topk", "recursion"): {**_RECURSIVE, "validate": (6, 5)},
    ("expert-topk", "share"): {**_RECURSIVE, "validate": (6, 5), "generate": (21, 23), "serve": (23, 27)},
    ("expert-threshold", "recursion"): {**_RECURSIVE, "train": (2, 0), "validate": (6, 5)},
    ("expert-random", "recursion"): {**_RECURSIVE, "validate": (6, 5)},
    ("token", "recursion"): {**_RECURSIVE, "train": (1, 0), "validate": (3, 4)},
}

# Ops that read only the rows they index: their traffic is what they write, twice.
PARTIAL_READ_OPS = {"nll_loss_forward", "gather", "index_select", "embedding"}
FREE_OPS = {
    "view",
    "_unsafe_view",
    "as_strided",
    "t",
    "transpose",
    "permute",
    "expand",
    "slice",
    "select",
    "detach",
    "unsqueeze",
    "squeeze",
    "alias",
    "reshape",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "lift_fresh",
    "set_",
}


@dataclass
class Census:
    """What the ops of a traced region did (per rank)."""

    matmul_flops: float = 0.0  # every matmul but attention's
    # Attention kernels' FLOPs, forward + backward (3x the forward's QK^T and AV; a recompute adds a
    # forward), by query length, which sets the kernels' rate. Causal calls count causal pairs, masked calls
    # every pair: the kernel computes them all.
    attention_flops: Counter = field(default_factory=Counter)
    eager_bytes: float = 0.0  # read + written by the other ops, each op a kernel of its own
    fused_bytes: float = 0.0  # the same with compiled blocks' elementwise ops fused (see _Traffic)
    collectives: Counter = field(default_factory=Counter)  # (op, group size) -> calls
    collective_bytes: Counter = field(default_factory=Counter)  # (op, group size) -> bytes of the full buffer
    host_syncs: Counter = field(default_factory=Counter)  # op -> calls

    def _values(self) -> list[Any]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def minus(self, other: Census) -> Census:
        return Census(*(a - b for a, b in zip(self._values(), other._values(), strict=True)))

    def plus(self, other: Census) -> Census:
        return Census(*(a + b for a, b in zip(self._values(), other._values(), strict=True)))

    def scaled(self, k: int) -> Census:
        values: list[Any] = [
            Counter({a: n * k for a, n in v.items()}) if isinstance(v, Counter) else v * k for v in self._values()
        ]
        return Census(*values)


def _leaves(xs: Any) -> Iterator[torch.Tensor]:
    if isinstance(xs, torch.Tensor):
        yield xs
    elif isinstance(xs, (list, tuple)):
        for x in xs:
            yield from _leaves(x)
    elif isinstance(xs, dict):
        for x in xs.values():
            yield from _leaves(x)


def _tensor_bytes(xs: Any) -> int:
    return sum(x.numel() * x.element_size() for x in _leaves(xs))


def _storage(t: torch.Tensor) -> int:
    """A tensor's memory, the same for all its views (the tensor itself where it has no plain storage)."""
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return id(t)


class _Traffic:
    """Bytes that ops other than matmuls and attention move through HBM, as kernels would.

    Outside a fused region each op is a kernel: it reads its inputs and writes its outputs. Inside one (a
    compiled block's forward or backward; the fused optimizer), consecutive ops form one kernel, cut by any
    matmul, attention or collective: it reads once what was made outside it, and writes what is used after
    it or written in place into a tensor made before it. What it makes and uses itself stays on chip. A
    compiled block recomputes in backward what it does not save (`recomputed`): such a tensor is neither
    written by the forward nor read by the backward (the tensors it is recomputed from are)."""

    def __init__(self, recomputed: set[int] | None = None) -> None:
        self.recomputed = recomputed if recomputed is not None else set()
        self.bytes = 0.0
        self.kernel = 0  # the open fused kernel (0: none)
        self.kernels = 0  # fused kernels opened so far
        self.region: object = None
        self.made: dict[int, tuple[int, int]] = {}  # storage -> (fused kernel that made it, bytes)
        self.read: set[int] = set()  # storages the open kernel has read
        self.written: set[int] = set()  # storages it wrote in place

    def _used_outside(self, key: int) -> None:
        # A fused kernel's result read by another kernel: it was written to memory once.
        written = self.made.pop(key, (0, 0))[1]
        self.bytes += 0 if key in self.recomputed else written

    def _made(self, key: int) -> None:
        self.made.pop(key, None)
        self.recomputed.discard(key)  # a new tensor in that memory

    def kernel_of_its_own(self, inputs: list[torch.Tensor], outputs: list[torch.Tensor], moves: bool) -> None:
        self.kernel = 0
        for t in inputs:
            self._used_outside(_storage(t))
        for t in outputs:
            self._made(_storage(t))
        if moves:
            self.bytes += _tensor_bytes(inputs) + _tensor_bytes(outputs)

    def partial_read(self, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        """A gather (loss, embedding): reads about what it writes, whatever the size of what it indexes."""
        self.kernel_of_its_own(inputs, outputs, False)
        self.bytes += 2 * _tensor_bytes(outputs)

    def fused(self, inputs: list[torch.Tensor], outputs: list[torch.Tensor], region: object) -> None:
        if not self.kernel or region != self.region:
            self.kernels += 1
            self.kernel, self.region = self.kernels, region
            self.read, self.written = set(), set()
        for t in inputs:
            key = _storage(t)
            by = self.made.get(key)
            if by is not None and by[0] == self.kernel:
                continue
            self._used_outside(key)
            if key not in self.read and key not in self.recomputed:
                self.read.add(key)
                self.bytes += _tensor_bytes(t)
        for t in outputs:
            key = _storage(t)
            if key in self.read:  # in place into a tensor made before this kernel: written back once
                if key not in self.written:
                    self.written.add(key)
                    self.bytes += _tensor_bytes(t)
            else:
                self._made(key)
                self.made[key] = (self.kernel, _tensor_bytes(t))


class _CensusMode(TorchDispatchMode):
    """Counts collectives, host syncs, matmul and attention FLOPs and the memory traffic of everything else.

    Attention is counted where it is called (F.scaled_dot_product_attention, from its shapes: the CPU trace
    runs other kernels than a GPU), and the ops inside it, forward and backward, are not counted again.
    `blocks` are the modules torch.compile would compile: their forward's ops, and the backward of the
    autograd nodes they made, are fused regions for `fused_bytes`."""

    def __init__(self, census: Census, optimizer: torch.optim.Optimizer, blocks: list[torch.nn.Module]):
        super().__init__()
        self.census = census
        self.in_optimizer = False
        optimizer.register_step_pre_hook(lambda *_: setattr(self, "in_optimizer", True))
        optimizer.register_step_post_hook(lambda *_: setattr(self, "in_optimizer", False))
        from torch.utils.flop_counter import flop_registry

        self.flop_registry = flop_registry
        self.blocks = blocks
        self.eager, self.fused = _Traffic(), _Traffic(recomputed=set())
        self.block_nodes: list[tuple[int, int]] = []  # autograd sequence numbers made in compiled forwards
        self.attention_nodes: list[tuple[int, int]] = []  # ... inside attention calls
        self.in_block = self.in_attention = 0
        self.hooks: list[Any] = []
        # Memory: a compiled block keeps for backward what its matmuls, attention and inputs made, and
        # recomputes its elementwise results from them. So each saved tensor that an elementwise op of the
        # running block made is replaced by the tensors it was computed from (`sources`).
        self.block_call = 0
        self.block_made: dict[int, tuple[int, int, dict[int, int]]] = {}  # storage -> (call, bytes, sources)
        self.recomputed: dict[int, int] = {}  # saved, and recomputed when compiled: storage -> bytes
        self.sources: dict[int, int] = {}  # what the compiled block keeps instead: storage -> bytes
        self.kept: set[int] = set()  # saved tensors that a compiled run saves too

    def __enter__(self) -> _CensusMode:
        def enter(*_: Any) -> None:
            self.in_block += 1
            self.block_call += 1
            self.block_start = torch._C._autograd._get_sequence_nr()

        def leave(*_: Any) -> None:
            self.in_block -= 1
            self.block_nodes.append((self.block_start, torch._C._autograd._get_sequence_nr()))

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = _storage(t)
            made = self.block_made.get(key)
            if self.in_block and made is not None and made[0] == self.block_call:
                self.recomputed[key] = made[1]
                self.fused.recomputed.add(key)
                self.sources.update(made[2])
            else:
                self.kept.add(key)
            return t

        for b in self.blocks:
            self.hooks += [b.register_forward_pre_hook(enter), b.register_forward_hook(leave)]
        self.saved = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.saved.__enter__()
        self.attention = _AttentionMode(self)
        self.attention.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self.attention.__exit__(*exc)
        self.saved.__exit__(*exc)
        for h in self.hooks:
            h.remove()

    @property
    def recomputed_bytes(self) -> int:
        """Bytes of saved activations that compiled blocks recompute instead of keeping."""
        added = sum(n for k, n in self.sources.items() if k not in self.kept and k not in self.recomputed)
        return sum(self.recomputed.values()) - added

    def _backward_region(self, ranges: list[tuple[int, int]]) -> int | None:
        """Which range made the autograd node now running backward, if any."""
        node: Any = torch._C._current_autograd_node()  # None outside backward (typed as never None)
        if node is None:
            return None
        seq = node._sequence_nr()
        return next((i for i, (a, b) in enumerate(ranges) if a <= seq < b), None)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        c = self.census
        if func.namespace in ("c10d", "_c10d_functional") and name != "wait_tensor":
            # FSDP calls c10d ops with the group boxed as an argument; DTensor (TP) calls functional
            # collectives with the group's name last.
            boxed = next((a for a in args if isinstance(a, torch.ScriptObject)), None)
            if boxed is not None:
                size = dist.ProcessGroup.unbox(boxed).size()
            else:
                size = _resolve_process_group(args[-1]).size()
            key = (name.rstrip("_"), int(size))
            c.collectives[key] += 1
            out = func(*args, **kwargs)
            # The gathered / reduced buffer: the largest tensor going in or coming out.
            c.collective_bytes[key] += max([_tensor_bytes(a) for a in args] + [_tensor_bytes(out)])
            for traffic in (self.eager, self.fused):
                traffic.kernel_of_its_own(list(_leaves((args, kwargs))), list(_leaves(out)), False)
            return out
        if name == "_local_scalar_dense":  # a fake tensor has no value: read it as finite, true, one
            dtype = args[0].dtype
            out = True if dtype == torch.bool else 1.0 if dtype.is_floating_point else 1
        else:
            out = func(*args, **kwargs)
        if (sync := host_sync(func, args, kwargs, out, torch.device("cpu"))) and not self.in_optimizer:
            c.host_syncs[sync] += 1
        if name in FREE_OPS or name == "_local_scalar_dense":
            return out
        inputs, outputs = list(_leaves((args, kwargs))), list(_leaves(out))
        elementwise = self.in_block and not self.in_attention and func._overloadpacket not in self.flop_registry
        sources: dict[int, int] = {}
        for t in inputs if elementwise else ():
            made = self.block_made.get(_storage(t))
            if made is not None and made[0] == self.block_call:
                sources.update(made[2])
            else:
                sources[_storage(t)] = _tensor_bytes(t)
        for t in outputs:
            if elementwise:
                self.block_made[_storage(t)] = (self.block_call, _tensor_bytes(t), sources)
            else:
                self.block_made.pop(_storage(t), None)
        if self.in_attention or self._backward_region(self.attention_nodes) is not None:
            # Inside attention: its kernel reads and writes what the other kernels see of it.
            for traffic in (self.eager, self.fused):
                traffic.kernel_of_its_own(inputs, outputs, False)
            return out
        if func._overloadpacket in self.flop_registry:
            c.matmul_flops += self.flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
            for traffic in (self.eager, self.fused):
                traffic.kernel_of_its_own(inputs, outputs, False)
            return out
        if not outputs:  # ops that return no tensor move nothing
            return out
        if name in PARTIAL_READ_OPS:
            self.eager.partial_read(inputs, outputs)
            self.fused.partial_read(inputs, outputs)
        elif self.in_optimizer:  # the fused AdamW kernel, compiled or not
            self.eager.fused(inputs, outputs, "optimizer")
            self.fused.fused(inputs, outputs, "optimizer")
        else:
            self.eager.kernel_of_its_own(inputs, outputs, True)
            block = -1 if self.in_block else self._backward_region(self.block_nodes)
            if block is None:
                self.fused.kernel_of_its_own(inputs, outputs, True)
            else:
                self.fused.fused(inputs, outputs, ("block", block))
        c.eager_bytes, c.fused_bytes = self.eager.bytes, self.fused.bytes
        return out


class _AttentionMode(TorchFunctionMode):
    """Counts each F.scaled_dot_product_attention call's FLOPs from its shapes into the census."""

    def __init__(self, census: _CensusMode):
        super().__init__()
        self.mode = census

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        batch, heads, tq, d_qk = q.shape
        tk, d_v = k.shape[-2], v.shape[-1]
        causal = kwargs.get("is_causal", False) and kwargs.get("attn_mask") is None
        pairs = causal_pairs(tq, tk) if causal else tq * tk
        forward = 2 * batch * heads * pairs * (d_qk + d_v)
        recompute = torch._C._current_autograd_node() is not None  # a checkpointed forward, in backward
        self.mode.census.attention_flops[tq] += forward if recompute else 3 * forward
        start = torch._C._autograd._get_sequence_nr()
        self.mode.in_attention += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.mode.in_attention -= 1
            self.mode.attention_nodes.append((start, torch._C._autograd._get_sequence_nr()))


@dataclass
class Memory:
    """Per-rank peak tensor memory by category, in bytes."""

    parameters: float
    gathered_parameters: float
    gradients: float
    optimizer: float
    activations: float
    temporaries: float

    @property
    def total(self) -> float:
        return sum(dataclasses.astuple(self))


@dataclass
class Estimate:
    config: str
    world: int
    mesh: tuple[int, int, int]
    micro_batch: int
    accumulation: int
    activation_checkpoint: str
    compiled: bool
    memory: Memory
    micro: Census  # one micro-batch's forward and backward
    fixed: Census  # the rest of a step: gradient norm, optimizer, scheduler
    tokens_per_step_per_rank: int
    model_flops_per_token: float  # executed, fwd + bwd, no recompute

    @property
    def step(self) -> Census:
        return self.fixed.plus(self.micro.scaled(self.accumulation))


@contextlib.contextmanager
def fake_world(world: int) -> Iterator[None]:
    """A fake process group of `world` ranks, this process rank 0, for the duration."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the dry run traces without a process group of its own; destroy it first")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _trace(
    cfg: JobConfig, world: int, compiled: bool, accumulate: bool = False
) -> tuple[Memory, Census, Census | None]:
    """Trace two one-micro-batch steps of one model (the first creates the optimizer state); return the
    second's peak memory (`compiled`: less the activations compiled blocks recompute) and census, and with
    `accumulate` the census of a third step over two micro-batches (FSDP's memory tracker follows one
    forward per step, so only the one-micro-batch step is tracked)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh

    from mor_pretrain.optim import build_lr_scheduler, build_optimizer
    from mor_pretrain.trainer import Parallel, train_step

    rep, shard, tp = mesh_shape(cfg.parallelism, world)
    mesh = init_device_mesh("cpu", (rep, shard, tp), mesh_dim_names=MESH_DIMS)
    with torch.device("meta"):
        model = MoRModel(cfg.model)
    parallelize(model, mesh, cfg.parallelism, DTYPES[cfg.training.dtype])  # TP needs real mesh coordinates
    blocks = unique_blocks(model)
    t = cfg.training
    census, two = Census(), Census() if accumulate else None
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        optimizer = build_optimizer(model, cfg.optimizer)  # unfused on the CPU: see the module doc
        scheduler = build_lr_scheduler(optimizer, cfg.optimizer, t.steps)
        par = Parallel(torch.device("cpu"), mesh, 0, rep * shard, tp)
        ids = torch.zeros(t.micro_batch_size, t.seq_len, dtype=torch.long)
        batch = {"input": ids, "labels": ids}
        with _CensusMode(Census(), optimizer, blocks):
            train_step(model, optimizer, scheduler, [batch], par, cfg)
        # Entered after the first step: the tracker takes the parameters and optimizer states as they stand
        # then, and following only the second step halves the trace's time.
        tracker = FSDPMemTracker(model, optimizer)
        with tracker, _CensusMode(census, optimizer, blocks) as mode:
            train_step(model, optimizer, scheduler, [batch], par, cfg)
        snapshot = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
        peak = {str(k).split(".")[-1]: float(v) for k, v in snapshot.items()}
        if two is not None:
            with _CensusMode(two, optimizer, blocks):
                train_step(model, optimizer, scheduler, [batch, batch], par, cfg)
    memory = Memory(
        parameters=peak.get("SHARDED_PARAM", 0) + peak.get("BUFFER", 0),
        gathered_parameters=peak.get("UNSHARDED_PARAM", 0) + peak.get("ALL_GATHER", 0),
        gradients=peak.get("SHARDED_GRAD", 0) + peak.get("UNSHARDED_GRAD", 0) + peak.get("REDUCE_SCATTER", 0),
        optimizer=peak.get("OPT", 0),
        activations=peak.get("ACT", 0) + peak.get("INP", 0) - (mode.recomputed_bytes if compiled else 0),
        temporaries=peak.get("TEMP", 0),
    )
    return memory, census, two


def estimate(cfg: JobConfig, world: int) -> Estimate:
    """Trace `cfg` at `world` ranks (eager: compile's effects are modeled) and return the estimate."""
    from mor_pretrain.trainer import grad_accumulation

    compiled = cfg.parallelism.compile
    cfg = dataclasses.replace(cfg, parallelism=dataclasses.replace(cfg.parallelism, compile=False))
    rep, shard, tp = mesh_shape(cfg.parallelism, world)
    accum = grad_accumulation(cfg, rep * shard)
    with fake_world(world):
        # A second micro-batch gives its cost apart from the optimizer step's.
        memory, one, two = _trace(cfg, world, compiled, accumulate=accum > 1)
        micro, fixed = one, Census()
        if two is not None:
            micro = two.minus(one)
            fixed = one.minus(micro)
            # Micro-batches before the last accumulate unsharded gradients in the reduce dtype (one
            # reduce-scatter per step), and the last one scatters them into sharded ones.
            with torch.device("meta"):
                numel = sum(p.numel() for p in MoRModel(cfg.model).parameters())
            reduce_bytes = torch.empty((), dtype=DTYPES[cfg.parallelism.reduce_dtype]).element_size()
            memory.gradients = max(memory.gradients, memory.parameters) + numel // tp * reduce_bytes
    t = cfg.training
    return Estimate(
        config=cfg.name,
        world=world,
        mesh=(rep, shard, tp),
        micro_batch=t.micro_batch_size,
        accumulation=accum,
        activation_checkpoint=cfg.parallelism.activation_checkpoint,
        compiled=compiled,
        memory=memory,
        micro=micro,
        fixed=fixed,
        tokens_per_step_per_rank=t.global_batch_size * t.seq_len // (rep * shard),
        model_flops_per_token=executed_flops_per_token(cfg.model, t.seq_len),
    )


AC_MODES: tuple[Literal["none", "selective", "full"], ...] = ("none", "selective", "full")  # least recompute first


@dataclass
class Setting:
    """A micro-batch and activation checkpointing that fit a card, with their estimated peak."""

    activation_checkpoint: str
    micro_batch_size: int
    peak_bytes: float


def fitting_settings(cfg: JobConfig, world: int, est: Estimate) -> dict[str, Setting | None]:
    """Per GPU the configured setting cannot hold: the least activation checkpointing, then the largest
    micro-batch that divides the rank's batch, that fits with MARGIN free (None if nothing does).

    One more trace per checkpointing mode (one micro-batch); activations and temporaries scale with the
    micro-batch, the rest does not."""
    short = [k for k, g in GPUS.items() if not fits(g, device_memory(est))]
    if not short:
        return {}
    per_rank = cfg.training.global_batch_size // (est.mesh[0] * est.mesh[1])
    sizes = [b for b in range(per_rank, 0, -1) if per_rank % b == 0]
    found: dict[str, Setting | None] = dict.fromkeys(short)
    for ac in AC_MODES:
        if ac == est.activation_checkpoint:
            memory = est.memory
        else:
            par = dataclasses.replace(cfg.parallelism, activation_checkpoint=ac, compile=False)
            with fake_world(world):
                memory, _, _ = _trace(dataclasses.replace(cfg, parallelism=par), world, est.compiled)
        scaled = memory.activations + memory.temporaries
        fixed = memory.total - scaled
        for key in [k for k, v in found.items() if v is None]:
            for b in sizes:
                peak = fixed + scaled * b / est.micro_batch
                if fits(GPUS[key], device_memory(est, peak)):
                    found[key] = Setting(ac, b, peak)
                    break
        if all(found.values()):
            break
    return found


@dataclass
class DeviceMemory:
    """What one GPU holds at the step's peak, in bytes: torch's allocated peak, what its caching allocator
    reserves around it (its slack, cuBLAS and compile workspaces, NCCL's buffers), and the CUDA context
    outside the allocator. `reserved + context` is what nvidia-smi shows."""

    allocated: float
    reserved: float
    context: float

    @property
    def device(self) -> float:
        return self.reserved + self.context


def device_memory(est: Estimate, allocated: float | None = None) -> DeviceMemory:
    """The device's view of `allocated` (default: the traced peak). The constants are stated beside
    ALLOCATOR_SLACK; communicators are the traced collectives' groups of more than one rank."""
    allocated = est.memory.total if allocated is None else allocated
    groups = {n for (_, n) in est.step.collectives if n > 1}
    reserved = allocated * (1 + ALLOCATOR_SLACK) + CUBLAS_WORKSPACE + NCCL_BUFFERS * len(groups)
    reserved += COMPILE_WORKSPACE if est.compiled else 0
    return DeviceMemory(allocated, reserved, CUDA_CONTEXT)


def fits(gpu: GPU, memory: DeviceMemory) -> bool:
    return memory.device <= gpu.memory_bytes * (1 - MARGIN)


@dataclass
class Prediction:
    gpu: GPU
    matmul_s: float
    attention_s: float
    memory_s: float  # other ops' HBM traffic
    collective_s: float
    memory: DeviceMemory
    fits: bool

    @property
    def compute_s(self) -> float:
        return self.matmul_s + self.attention_s + self.memory_s

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.collective_s)

    @property
    def reserved_bytes(self) -> float:
        return self.memory.reserved


def link_bandwidth(gpu: GPU, group: int, world: int) -> float:
    """A group's ring runs at NVLink speed when it fits in a node, else at InfiniBand speed."""
    return gpu.nvlink_bytes_per_s if min(group, world) <= GPU_NODE else gpu.ib_bytes_per_s


def predict(est: Estimate, gpu: GPU, dtype: str) -> Prediction:
    """The step-time model (see the module doc): its three compute terms run one after another, and
    collectives overlap them."""
    step = est.step
    matmul = step.matmul_flops / (peak_flops(gpu, dtype) * gpu.sustained)
    attention = sum(f / gpu.attention_flops(t) for t, f in step.attention_flops.items())
    if dtype != "bfloat16":  # measured in bf16; other dtypes run the matmul units at their own peak ratio
        attention *= gpu.bf16_flops / peak_flops(gpu, dtype)
    traffic = step.fused_bytes if est.compiled else step.eager_bytes
    comm = 0.0
    for (op, n), nbytes in step.collective_bytes.items():
        if n > 1:
            factor = 2 if op.startswith("allreduce") else 1  # all-reduce = reduce-scatter + all-gather
            comm += factor * nbytes * (n - 1) / n / link_bandwidth(gpu, n, est.world)
    memory = device_memory(est)
    return Prediction(
        gpu, matmul, attention, traffic / (gpu.hbm_bytes_per_s * HBM_EFFICIENCY), comm, memory, fits(gpu, memory)
    )


def peak_flops(gpu: GPU, dtype: str) -> float:
    return gpu.bf16_flops if dtype == "bfloat16" else gpu.tf32_flops


def report(est: Estimate, dtype: str) -> str:
    """The dry run's printout."""
    rep, shard, tp = est.mesh
    m = est.memory
    lines = [
        f"traced one training step at {est.world} ranks (dp_replicate {rep} x dp_shard {shard} x tp {tp}), "
        f"micro-batch {est.micro_batch} x accumulation {est.accumulation}, activation checkpointing "
        f"{est.activation_checkpoint!r}, {'compiled blocks (modeled)' if est.compiled else 'eager'}",
        "allocated peak per rank:",
    ]
    for name, value in dataclasses.asdict(m).items():
        lines.append(f"  {name.replace('_', ' '):20s} {value / GiB:8.2f} GiB")
    lines.append(f"  {'total':20s} {m.total / GiB:8.2f} GiB")
    dev = device_memory(est)
    lines.append(
        f"on the device: {dev.reserved / GiB:.2f} GiB reserved by torch (allocator slack, cuBLAS, compile, NCCL) "
        f"+ {dev.context / GiB:.2f} GiB CUDA context = {dev.device / GiB:.2f} GiB"
    )
    step = est.step
    lines.append("collectives per step per rank (group size: calls, bytes):")
    for (op, n), calls in sorted(step.collectives.items()):
        lines.append(f"  {op:28s} n={n:<5d} {calls:5d} calls {step.collective_bytes[(op, n)] / GiB:9.3f} GiB")
    syncs = ", ".join(f"{k} x{v}" for k, v in sorted(step.host_syncs.items())) or "none"
    lines.append(f"host syncs per step: {syncs}")
    traffic = step.fused_bytes if est.compiled else step.eager_bytes
    lines.append(
        f"per rank per step: {step.matmul_flops / 1e12:.2f} TFLOP in matmuls, "
        f"{sum(step.attention_flops.values()) / 1e12:.2f} in attention (recompute included), "
        f"{traffic / 1e9:.1f} GB moved by other ops"
    )
    lines.append(
        f"estimated step (error band: {ERROR_BAND}), per GPU:\n"
        f"{'GPU':16s} {'fits (10% free)':>18s} {'step ms':>9s} {'matmul':>8s} {'attn':>8s} {'memory':>8s} "
        f"{'comm':>8s} {'tok/s/GPU':>10s} {'MFU':>6s}"
    )
    tokens = est.tokens_per_step_per_rank / est.mesh[2]  # per GPU: TP ranks share their tokens
    for gpu in GPUS.values():
        p = predict(est, gpu, dtype)
        mfu = tokens * est.model_flops_per_token / p.step_s / peak_flops(gpu, dtype)
        left = (gpu.memory_bytes * (1 - MARGIN) - p.memory.device) / GiB
        fit = f"yes ({left:.0f} GiB left)" if p.fits else f"NO ({-left:.0f} GiB over)"
        lines.append(
            f"{gpu.name:16s} {fit:>18s} {1e3 * p.step_s:9.1f} {1e3 * p.matmul_s:8.1f} {1e3 * p.attention_s:8.1f} "
            f"{1e3 * p.memory_s:8.1f} {1e3 * p.collective_s:8.1f} {tokens / p.step_s:10,.0f} {100 * mfu:5.1f}%"
        )
    return "\n".join(lines)


def fit_report(found: dict[str, Setting | None]) -> str:
    """What to set where the configured micro-batch and checkpointing do not fit."""
    lines = []
    for key, setting in found.items():
        if setting is None:
            lines.append(f"{GPUS[key].name}: nothing fits, even full checkpointing at micro-batch 1: add ranks or TP")
        else:
            lines.append(
                f"{GPUS[key].name}: fits with --parallelism.activation_checkpoint={setting.activation_checkpoint} "
                f"--training.micro_batch_size={setting.micro_batch_size} ({setting.peak_bytes / GiB:.1f} GiB)"
            )
    return "\n".join(lines)
