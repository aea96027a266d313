"""Size a run before it starts: trace one real training step at the real world size, without GPUs.

A fake process group of the run's world size (this process plays rank 0), a CPU device mesh and fake tensors
carry the project's own parallelize() and train_step() through one step: every op runs on shapes only. What
the trace sees:
- per-rank peak tensor memory by category (FSDP2's memory tracker): parameters, all-gathered parameters,
  gradients, optimizer state, activations, temporaries;
- every collective with its group size and bytes;
- host syncs (ops whose result the host must wait for: .item(), nonzero, ...);
- matmul FLOPs, and the bytes every other op reads and writes.
The optimizer is traced unfused: FSDP's memory tracker mislabels what the fused kernel touches. The unfused
step reads each parameter's step counter on the host, which the fused kernel a GPU runs does not, so host
syncs inside the optimizer step are not counted.
Two traces, with one and with two micro-batches, separate what each micro-batch costs from what the
optimizer step costs, so a step with any accumulation is predicted from them.

Predicted step time, per rank, on a named GPU (the roofline, stated): matmuls at the card's dense peak,
every other op at its HBM bandwidth (each op reads and writes its tensors once: eager, no fusion), and
collectives as ring transfers, (n-1)/n of the bytes, at NVLink bandwidth within an 8-GPU node and InfiniBand
across nodes. FSDP overlaps collectives with compute, so a step takes max(compute, collectives). Real runs
reach a fraction of these peaks: read the time as a lower bound and the MFU as an upper one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.utils._python_dispatch import TorchDispatchMode

from mor_pretrain.config import JobConfig
from mor_pretrain.flops import executed_flops_per_token
from mor_pretrain.models import MoRModel
from mor_pretrain.parallel import DTYPES, MESH_DIMS, mesh_shape, parallelize

GiB = 2**30
GPU_NODE = 8  # GPUs per node behind NVLink; more ranks talk over InfiniBand


@dataclass(frozen=True)
class GPU:
    """Datasheet figures: dense bf16 and tf32 peaks, HBM bandwidth and size, per-GPU NVLink and InfiniBand
    bandwidth (one direction)."""

    name: str
    bf16_flops: float
    tf32_flops: float
    hbm_bytes_per_s: float
    memory_bytes: float
    nvlink_bytes_per_s: float
    ib_bytes_per_s: float


GPUS = {
    "A100": GPU("A100 SXM 80GB", 312e12, 156e12, 2.039e12, 80e9, 300e9, 25e9),
    "H100": GPU("H100 SXM", 989e12, 494.5e12, 3.35e12, 80e9, 450e9, 50e9),
    "H200": GPU("H200 SXM", 989e12, 494.5e12, 4.8e12, 141e9, 450e9, 50e9),
    "B200": GPU("B200", 2250e12, 1100e12, 8e12, 180e9, 900e9, 50e9),
}
MARGIN = 0.10  # of the card's memory kept free: allocator fragmentation, CUDA context, NCCL buffers

# Ops whose output the host must read before it can go on.
HOST_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim", "item"}
MATMUL_OPS = {
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_efficient_attention_backward",
    "_flash_attention_backward",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
}
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

    matmul_flops: float = 0.0
    other_bytes: float = 0.0  # read + written by non-matmul ops
    collectives: Counter = field(default_factory=Counter)  # (op, group size) -> calls
    collective_bytes: Counter = field(default_factory=Counter)  # (op, group size) -> bytes of the full buffer
    host_syncs: Counter = field(default_factory=Counter)  # op -> calls

    def minus(self, other: Census) -> Census:
        return Census(
            self.matmul_flops - other.matmul_flops,
            self.other_bytes - other.other_bytes,
            self.collectives - other.collectives,
            self.collective_bytes - other.collective_bytes,
            self.host_syncs - other.host_syncs,
        )

    def scaled(self, k: int) -> Census:
        return Census(
            self.matmul_flops * k,
            self.other_bytes * k,
            Counter({a: n * k for a, n in self.collectives.items()}),
            Counter({a: n * k for a, n in self.collective_bytes.items()}),
            Counter({a: n * k for a, n in self.host_syncs.items()}),
        )

    def plus(self, other: Census) -> Census:
        return Census(
            self.matmul_flops + other.matmul_flops,
            self.other_bytes + other.other_bytes,
            self.collectives + other.collectives,
            self.collective_bytes + other.collective_bytes,
            self.host_syncs + other.host_syncs,
        )


def _tensor_bytes(xs: Any) -> int:
    leaves = xs if isinstance(xs, (list, tuple)) else [xs]
    total = 0
    for x in leaves:
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, (list, tuple)):
            total += _tensor_bytes(x)
    return total


class _CensusMode(TorchDispatchMode):
    """Counts collectives, host syncs, matmul FLOPs and the memory traffic of everything else."""

    def __init__(self, census: Census, optimizer: torch.optim.Optimizer):
        super().__init__()
        self.census = census
        self.in_optimizer = False
        optimizer.register_step_pre_hook(lambda *_: setattr(self, "in_optimizer", True))
        optimizer.register_step_post_hook(lambda *_: setattr(self, "in_optimizer", False))
        from torch.utils.flop_counter import flop_registry

        self.flop_registry = flop_registry

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
            return out
        if name in HOST_SYNC_OPS and not self.in_optimizer:
            c.host_syncs[name] += 1
        if name == "_local_scalar_dense":  # a fake tensor has no value: read it as finite, true, one
            dtype = args[0].dtype
            return True if dtype == torch.bool else 1.0 if dtype.is_floating_point else 1
        out = func(*args, **kwargs)
        if func._overloadpacket in self.flop_registry:
            c.matmul_flops += self.flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        elif name not in FREE_OPS and name not in MATMUL_OPS and (written := _tensor_bytes(out)):
            c.other_bytes += _tensor_bytes(list(args)) + written  # ops that return no tensor move nothing
        return out


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


def _trace(cfg: JobConfig, world: int, micro_batches: int) -> tuple[Memory, Census]:
    """Trace two steps over `micro_batches` micro-batches (the first creates the optimizer state); return the
    second's peak memory (tracked with one micro-batch only: FSDP's tracker follows one forward per step)
    and census."""
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
    t = cfg.training
    census = Census()
    peak: dict[str, float] = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        optimizer = build_optimizer(model, cfg.optimizer)  # unfused on the CPU: see the module doc
        scheduler = build_lr_scheduler(optimizer, cfg.optimizer, t.steps)
        par = Parallel(torch.device("cpu"), mesh, 0, rep * shard, tp)
        ids = torch.zeros(t.micro_batch_size, t.seq_len, dtype=torch.long)
        batches = [{"input": ids, "labels": ids}] * micro_batches
        tracker = FSDPMemTracker(model, optimizer) if micro_batches == 1 else contextlib.nullcontext()
        with tracker:
            with _CensusMode(Census(), optimizer):  # the first step creates the optimizer state
                train_step(model, optimizer, scheduler, batches, par, cfg)
            if isinstance(tracker, FSDPMemTracker):
                tracker.reset_mod_stats()
            with _CensusMode(census, optimizer):
                train_step(model, optimizer, scheduler, batches, par, cfg)
        if isinstance(tracker, FSDPMemTracker):
            snapshot = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
            peak = {str(k).split(".")[-1]: float(v) for k, v in snapshot.items()}
    memory = Memory(
        parameters=peak.get("SHARDED_PARAM", 0) + peak.get("BUFFER", 0),
        gathered_parameters=peak.get("UNSHARDED_PARAM", 0) + peak.get("ALL_GATHER", 0),
        gradients=peak.get("SHARDED_GRAD", 0) + peak.get("UNSHARDED_GRAD", 0) + peak.get("REDUCE_SCATTER", 0),
        optimizer=peak.get("OPT", 0),
        activations=peak.get("ACT", 0) + peak.get("INP", 0),
        temporaries=peak.get("TEMP", 0),
    )
    return memory, census


def estimate(cfg: JobConfig, world: int) -> Estimate:
    """Trace `cfg` at `world` ranks (compile off: the trace is eager) and return the estimate."""
    from mor_pretrain.trainer import grad_accumulation

    cfg = dataclasses.replace(cfg, parallelism=dataclasses.replace(cfg.parallelism, compile=False))
    rep, shard, tp = mesh_shape(cfg.parallelism, world)
    accum = grad_accumulation(cfg, rep * shard)
    with fake_world(world):
        memory, one = _trace(cfg, world, 1)
        micro, fixed = one, Census()
        if accum > 1:  # a second micro-batch gives its cost apart from the optimizer step's
            _, two = _trace(cfg, world, 2)
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
    short = [k for k, g in GPUS.items() if est.memory.total > g.memory_bytes * (1 - MARGIN)]
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
                memory, _ = _trace(dataclasses.replace(cfg, parallelism=par), world, 1)
        scaled = memory.activations + memory.temporaries
        fixed = memory.total - scaled
        for key in [k for k, v in found.items() if v is None]:
            limit = GPUS[key].memory_bytes * (1 - MARGIN)
            for b in sizes:
                peak = fixed + scaled * b / est.micro_batch
                if peak <= limit:
                    found[key] = Setting(ac, b, peak)
                    break
        if all(found.values()):
            break
    return found


def estimate_apart(cfg: JobConfig, world: int) -> Estimate:
    """estimate() in a fresh process, for a caller that has run a real process group before (a benchmark):
    state that torch keeps from that group's meshes would leak into the trace."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(estimate, (cfg, world))


@dataclass
class Prediction:
    gpu: GPU
    compute_s: float
    collective_s: float
    fits: bool
    free_bytes: float

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.collective_s)


def link_bandwidth(gpu: GPU, group: int, world: int) -> float:
    """A group's ring runs at NVLink speed when it fits in a node, else at InfiniBand speed."""
    return gpu.nvlink_bytes_per_s if min(group, world) <= GPU_NODE else gpu.ib_bytes_per_s


def predict(est: Estimate, gpu: GPU, dtype: str) -> Prediction:
    step = est.step
    compute = step.matmul_flops / peak_flops(gpu, dtype) + step.other_bytes / gpu.hbm_bytes_per_s
    comm = 0.0
    for (op, n), nbytes in step.collective_bytes.items():
        if n > 1:
            factor = 2 if op.startswith("allreduce") else 1  # all-reduce = reduce-scatter + all-gather
            comm += factor * nbytes * (n - 1) / n / link_bandwidth(gpu, n, est.world)
    limit = gpu.memory_bytes * (1 - MARGIN)
    return Prediction(gpu, compute, comm, est.memory.total <= limit, limit - est.memory.total)


def peak_flops(gpu: GPU, dtype: str) -> float:
    return gpu.bf16_flops if dtype == "bfloat16" else gpu.tf32_flops


def report(est: Estimate, dtype: str) -> str:
    """The dry run's printout."""
    rep, shard, tp = est.mesh
    m = est.memory
    lines = [
        f"traced one training step at {est.world} ranks (dp_replicate {rep} x dp_shard {shard} x tp {tp}), "
        f"micro-batch {est.micro_batch} x accumulation {est.accumulation}, activation checkpointing "
        f"{est.activation_checkpoint!r}, eager",
        "peak tensor memory per rank:",
    ]
    for name, value in dataclasses.asdict(m).items():
        lines.append(f"  {name.replace('_', ' '):20s} {value / GiB:8.2f} GiB")
    lines.append(f"  {'total':20s} {m.total / GiB:8.2f} GiB")
    step = est.step
    lines.append("collectives per step per rank (group size: calls, bytes):")
    for (op, n), calls in sorted(step.collectives.items()):
        lines.append(f"  {op:28s} n={n:<5d} {calls:5d} calls {step.collective_bytes[(op, n)] / GiB:9.3f} GiB")
    syncs = ", ".join(f"{k} x{v}" for k, v in sorted(step.host_syncs.items())) or "none"
    lines.append(f"host syncs per step: {syncs}")
    lines.append(
        f"per rank per step: {step.matmul_flops / 1e12:.2f} TFLOP in matmuls (recompute included), "
        f"{step.other_bytes / 1e9:.1f} GB moved by other ops"
    )
    lines.append(
        f"{'GPU':16s} {'fits (10% free)':>18s} {'step ms':>9s} {'compute':>9s} {'comm':>9s} "
        f"{'tok/s/GPU':>10s} {'MFU':>6s}"
    )
    tokens = est.tokens_per_step_per_rank / est.mesh[2]  # per GPU: TP ranks share their tokens
    for gpu in GPUS.values():
        p = predict(est, gpu, dtype)
        mfu = tokens * est.model_flops_per_token / p.step_s / peak_flops(gpu, dtype)
        fit = f"yes ({p.free_bytes / GiB:.0f} GiB left)" if p.fits else f"NO ({-p.free_bytes / GiB:.0f} GiB over)"
        lines.append(
            f"{gpu.name:16s} {fit:>18s} {1e3 * p.step_s:9.1f} {1e3 * p.compute_s:9.1f} {1e3 * p.collective_s:9.1f} "
            f"{tokens / p.step_s:10,.0f} {100 * mfu:5.1f}%"
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
