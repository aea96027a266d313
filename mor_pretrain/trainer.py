"""The training loop: `train(cfg)` sets up, loops, validates, logs and exports. Details live in the helpers.

Loss normalization: the model returns per-micro-batch means. Each micro-batch's LM loss is weighted by its
share of the global batch's scored tokens and each auxiliary loss by its share of the global batch's
sequences, times the data-parallel size (FSDP averages gradients over data-parallel ranks). So the same
global batch gives the same gradients however it is split over micro-batches, accumulation and ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication
from torch.distributed.tensor.parallel import loss_parallel

from mor_pretrain.checkpoint import (
    Checkpointer,
    ModelState,
    OptimizerState,
    SchedulerState,
    all_finite,
    config_differences,
    saved_config,
)
from mor_pretrain.config import (
    MFU,
    STEP_TIME,
    TOKENS_PER_S,
    TRAIN_LOSS,
    VAL_LOSS,
    ConfigError,
    JobConfig,
    config_to_dict,
    dump_toml,
)
from mor_pretrain.data import DataError, build_dataloader, load_tokenizer
from mor_pretrain.data.tokenizer import padded_vocab_size
from mor_pretrain.distributed import (
    CheckpointError,
    PreemptionWatcher,
    RunLock,
    barrier,
    device_group,
    host_group,
    init_distributed,
)
from mor_pretrain.flops import executed_flops_per_token, paper_flops_per_token
from mor_pretrain.folders import complete_steps, export_problem, save_exported, step_dir
from mor_pretrain.metrics import (
    MetricLogger,
    count_fractions,
    device_name,
    memory_stats,
    peak_flops,
    reduce_scalars,
)
from mor_pretrain.models import MoRModel
from mor_pretrain.optim import build_lr_scheduler, build_optimizer, clip_grad_norm
from mor_pretrain.parallel import DTYPES, build_mesh, dp_coordinates, parallelize

logger = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class TrainState:
    """Progress counters saved with checkpoints. tokens_seen counts positions trained on (global)."""

    step: int = 0
    tokens_seen: int = 0
    flops_paper: float = 0.0
    flops_executed: float = 0.0
    skipped_steps: int = 0  # updates dropped for a non-finite grad norm (training.nonfinite = "skip")
    wandb_run_id: str = ""  # the W&B run this training logs to (metrics.backends has "wandb")

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            if f.name in sd:  # counters added later default to zero
                setattr(self, f.name, type(getattr(self, f.name))(sd[f.name]))


@dataclass
class Parallel:
    """Where this rank sits: its device, the mesh and its data shard."""

    device: torch.device
    mesh: DeviceMesh
    dp_rank: int
    dp_world: int
    tp: int

    @property
    def rank(self) -> int:
        return dist.get_rank()

    def all_reduce(self, t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        """A reduced copy of `t` over every rank, on this rank's device (whatever device `t` was on)."""
        t = t.to(self.device, copy=True)
        dist.all_reduce(t, op=op, group=device_group(self.device))
        return t

    def dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a per-rank quantity over data-parallel ranks. TP ranks hold the same data, so the world sum
        counts it tp times."""
        return self.all_reduce(t) / self.tp


@dataclass
class StepLosses:
    """Detached, on-device sums for one optimizer step; all are this rank's share of global means."""

    lm: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    scored_tokens: torch.Tensor | None = None  # global count of labels != IGNORE
    rank_lm: torch.Tensor | None = None  # this rank's mean LM loss over its own scored tokens
    # The model's router_sums, summed over micro-batches, then over ranks by train_step.
    router: dict[str, torch.Tensor] = field(default_factory=dict)
    router_state: dict[str, torch.Tensor] = field(default_factory=dict)  # the model's, after the update


def configure_determinism(device: torch.device) -> None:
    """training.deterministic: deterministic kernels only. cuBLAS needs CUBLAS_WORKSPACE_CONFIG set before
    its first matmul, or the first one raises; a value other than its two deterministic ones is refused."""
    if device.type == "cuda":
        value = os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if value not in (":4096:8", ":16:8"):
            raise ConfigError(
                f"training.deterministic needs CUBLAS_WORKSPACE_CONFIG=:4096:8 (or :16:8); it is {value!r}"
            )
        logger.warning("training.deterministic on CUDA: slower kernels (no cuDNN attention, deterministic cuBLAS)")
    torch.use_deterministic_algorithms(True)


def build_model(cfg: JobConfig, mesh: DeviceMesh, device: torch.device) -> MoRModel:
    """Build on meta, parallelize, allocate on the device, then load the seeded initialization.

    Random init applied to sharded DTensors is not layout-invariant on CPU (each shard draws the same
    numbers), so every rank initializes the full model on its device from the same seed and keeps its
    shards: the same seed gives the same weights on any mesh of a device type, and a distributed run starts
    exactly where a single-process one does (the CPU and CUDA generators draw different numbers). The full
    fp32 copy is freed, and on a GPU its cached blocks returned and the peak statistics reset, once the
    shards hold their values: the logged peaks are the training step's, not the build's.
    """
    with torch.device("meta"):
        model = MoRModel(cfg.model)
    parallelize(model, mesh, cfg.parallelism, DTYPES[cfg.training.dtype])
    model.to_empty(device=device)
    # DTensor warns that its random ops are not layout-invariant on a CPU mesh: the sharded init below only
    # fills the RoPE buffers, and every parameter is then copied from the seeded reference.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
        model.init_weights()
    torch.manual_seed(cfg.training.seed)
    with torch.device(device):  # on a GPU: milliseconds, where one CPU thread took minutes at 1.7B
        reference = MoRModel(cfg.model)
        reference.init_weights()
    set_model_state_dict(model, reference.state_dict(), options=StateDictOptions(full_state_dict=True))
    del reference
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return model


def size_vocabulary(cfg: JobConfig) -> None:
    """Size the embedding from the tokenizer when model.vocab_size is 0; refuse one that some token ids
    would index past (that fails only later, deep inside the forward)."""
    pieces = load_tokenizer(cfg.data.tokenizer).vocab_size
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = padded_vocab_size(pieces, cfg.data.vocab_multiple)
    elif cfg.model.vocab_size < pieces:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's {pieces} pieces "
            f"(data.tokenizer = {cfg.data.tokenizer!r}); set model.vocab_size = 0 to size it from the tokenizer"
        )


def grad_accumulation(cfg: JobConfig, dp_world: int) -> int:
    t = cfg.training
    per_step = t.micro_batch_size * dp_world
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"training.global_batch_size ({t.global_batch_size}) must be a multiple of training.micro_batch_size "
            f"x data-parallel ranks ({t.micro_batch_size} x {dp_world} = {per_step})"
        )
    return t.global_batch_size // per_step


def forward_context(tp: int) -> contextlib.AbstractContextManager:
    """Under TP the logits are vocab-sharded DTensors: cross-entropy runs as loss_parallel, and the model's
    own sum of the DTensor LM loss and its plain auxiliary losses treats the plain ones as replicated."""
    if tp == 1:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(loss_parallel())
    stack.enter_context(implicit_replication())
    return stack


def backward_context(tp: int) -> contextlib.AbstractContextManager:
    return loss_parallel() if tp > 1 else contextlib.nullcontext()


def plain(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor's value as a plain tensor (differentiable); plain tensors pass through."""
    return t.to_local() if isinstance(t, DTensor) else t


def forward_backward(
    model: MoRModel, batches: list[dict[str, torch.Tensor]], par: Parallel, global_batch: int
) -> StepLosses:
    """Forward and backward over this rank's micro-batches, every loss normalized per global batch."""
    # Every copy is asynchronous (pinned loader memory) and the label counts are taken on the device: the
    # host never waits for the device here.
    moved = [
        (b["input"].to(par.device, non_blocking=True), b["labels"].to(par.device, non_blocking=True)) for b in batches
    ]
    counts = [(labels != IGNORE).sum() for _, labels in moved]
    local = torch.stack(counts).sum().float()
    scored = par.dp_sum(local).clamp(min=1)
    out_sums = StepLosses(lm=torch.zeros((), device=par.device), scored_tokens=scored)
    # Gradients accumulate unsharded (in FSDP's reduce dtype) and are reduce-scattered once per step, not
    # once per micro-batch. Parameters still reshard after each backward: at 1.7B, holding them gathered
    # across micro-batches would take 3.4 GB better spent on the micro-batch.
    for i, ((inp, labels), n) in enumerate(zip(moved, counts, strict=True)):
        if isinstance(model, FSDPModule) and len(moved) > 1:
            model.set_requires_gradient_sync(i == len(moved) - 1)
        tok_share = n / scored
        seq_share = inp.shape[0] / global_batch
        with forward_context(par.tp):
            out = model(inp, labels, return_logits=False)
        assert out.lm_loss is not None
        # Combine plain tensors only: a DTensor gradient must not flow into the plain aux-loss graph.
        lm = plain(out.lm_loss)
        loss = lm * (tok_share * par.dp_world)
        for a in [*out.aux_losses.values(), *out.side_losses.values()]:
            loss = loss + a * (seq_share * par.dp_world)
        with backward_context(par.tp):
            loss.backward()
        # Side losses (the auxiliary router's BCE) are logged as routing stats, outside train/loss.
        stats = {**out.stats, **{k: v.detach() for k, v in out.side_losses.items()}}
        accumulate(out_sums, lm.detach() * tok_share, out.aux_losses, stats, seq_share)
        for k, v in out.router_sums.items():
            out_sums.router[k] = out_sums.router[k] + v if k in out_sums.router else v
    out_sums.rank_lm = out_sums.lm * scored / local.clamp(min=1)
    return out_sums


def accumulate(
    sums: StepLosses, lm: torch.Tensor, aux: dict[str, torch.Tensor], stats: dict[str, torch.Tensor], share: float
) -> None:
    sums.lm = sums.lm + lm
    for k, v in aux.items():
        sums.aux[k] = sums.aux.get(k, 0) + v.detach() * share
    for k, v in stats.items():
        sums.stats[k] = sums.stats.get(k, 0) + v.float() * (1 if v.ndim else share)


def train_step(
    model: MoRModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: list[dict[str, torch.Tensor]],
    par: Parallel,
    cfg: JobConfig,
) -> tuple[StepLosses, torch.Tensor, bool]:
    """One optimizer step over this rank's micro-batches. Returns the losses, the pre-clip grad norm and
    whether the update was skipped (nonfinite = "skip" checks the norm every step: one host sync)."""
    losses = forward_backward(model, micro_batches, par, cfg.training.global_batch_size)
    # The global batch's router sums: token choice's load (its bias), expert-threshold's k-th scores (its
    # thresholds), the depths run (the FLOP count).
    losses.router = {k: par.dp_sum(v.float()) for k, v in losses.router.items()}
    grad_norm = clip_grad_norm([p for p in model.parameters() if p.grad is not None], cfg.optimizer.grad_clip)
    skipped = cfg.training.nonfinite == "skip" and not torch.isfinite(grad_norm).item()
    if skipped:
        logger.warning("non-finite grad norm %s: update skipped", grad_norm.item())
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if not skipped:
        model.update_routing(losses.router, cfg.training.global_batch_size)
    losses.router_state = {k: v.clone() for k, v in model.stack.router_state().items()}
    return losses, grad_norm, skipped


VAL_MODES = ("causal", "topk")


@torch.no_grad()
def validate(model: MoRModel, loader: Any, n_batches: int, par: Parallel) -> dict[str, float]:
    """Mean LM loss over the first n_batches micro-batches of the val split (the same on every call), in
    both routing modes: val/loss_causal routes each token on its own past (what a deployed model gets, and
    comparable with a vanilla run); val/loss_topk is expert choice's training-time top-k, which sees the
    whole sequence (the paper's protocol, optimistic). Models without expert choice route the same either
    way: one pass, logged under both names. Ranks run the same number of forwards (the smallest count
    among them) so FSDP collectives match."""
    batches = list(islice(iter(loader), n_batches))
    n = par.all_reduce(torch.tensor(len(batches)), op=dist.ReduceOp.MIN)
    if n.item() == 0:
        raise DataError("validation: the val split gave no batch on some rank; check data.val_sources")
    expert = model.args.router == "expert"
    modes = VAL_MODES if model.args.topk_routing else VAL_MODES[:1]
    totals = torch.zeros(len(modes), device=par.device)
    count = torch.zeros((), device=par.device)
    depths = torch.zeros(model.args.num_recursions + 1, device=par.device)  # scored tokens per causal depth
    for batch in batches[: int(n.item())]:
        inp, labels = batch["input"].to(par.device), batch["labels"].to(par.device)
        scored = (labels != IGNORE).sum()
        for i, mode in enumerate(modes):
            with forward_context(par.tp):
                out = model(inp, labels, routing=mode, return_logits=False)
            assert out.lm_loss is not None
            # A fully masked padding window (a short val split) has a 0/0 mean: it adds nothing.
            totals[i] += torch.where(scored > 0, plain(out.lm_loss).float() * scored, 0.0)
            if expert and mode == "causal" and out.depth is not None:
                depths += torch.bincount(out.depth[labels != IGNORE], minlength=depths.numel()).float()
        count += scored
    losses = (par.dp_sum(totals) / par.dp_sum(count).clamp(min=1)).tolist()
    by_mode = dict(zip(modes, losses, strict=True))
    out_values: dict[str, float] = {}
    for mode in VAL_MODES:
        loss = by_mode.get(mode, losses[0])
        out_values[VAL_LOSS[mode]] = loss
        out_values[f"val/ppl_{mode}"] = math.exp(min(loss, 50.0))
    if expert:  # where causal routing sends tokens (training's top-k depths are its capacities)
        total = par.dp_sum(depths)
        share = (total / total.sum().clamp(min=1)).tolist()
        out_values["val/causal_mean_depth"] = sum(d * v for d, v in enumerate(share))
        out_values.update({f"val/causal_depth/{d}": v for d, v in enumerate(share)})
    return out_values


@dataclass
class LogWindow:
    """What the current log interval has accumulated on device, and when it started."""

    start: float = field(default_factory=time.perf_counter)
    scored_tokens: torch.Tensor | None = None
    positions: int = 0
    steps: int = 0
    data_s: float = 0.0  # host time spent waiting for the train loader

    def add(self, scored: torch.Tensor | None, positions: int) -> None:
        assert scored is not None
        self.scored_tokens = scored if self.scored_tokens is None else self.scored_tokens + scored
        self.positions += positions
        self.steps += 1


def gate_stats(router: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mean and standard deviation of each recursion step's gate over the tokens that ran it, from the
    global batch's summed moments (the model's router sum gate_moments), so they are the same however the
    batch was split; empty for models without a per-token gate."""
    if "gate_moments" not in router:
        return {}
    tokens, center, shifted, squares = router["gate_moments"].unbind(-1)
    n = tokens.clamp(min=1)
    mean = (center + shifted) / n
    std = (squares / n - (shifted / n).square()).clamp(min=0).sqrt()
    return {f"routing/gate_{name}/{i}": x for name, v in (("mean", mean), ("std", std)) for i, x in enumerate(v)}


def log_step(
    losses: StepLosses,
    grad_norm: torch.Tensor,
    lr: float,
    window: LogWindow,
    state: TrainState,
    flops_per_position: float,
    peak: float | None,
    par: Parallel,
) -> dict[str, float]:
    """Reduce the step's metrics (one collective, one host sync) and return them as TensorBoard tags.

    Losses and scalar routing statistics are each rank's share of the global batch's mean, count vectors
    (tokens per depth, token-choice load) its counts: summed over data-parallel ranks they give the global
    batch's value, however it was split over ranks and micro-batches. Per-rank figures (time, memory, the
    max loss) take the worst rank.
    """
    aux_total = sum(losses.aux.values(), torch.zeros((), device=par.device))
    ones = torch.ones((), device=par.device)
    elapsed = time.perf_counter() - window.start
    assert window.scored_tokens is not None and losses.rank_lm is not None
    stats = {k: v for k, v in losses.stats.items() if k != "maxvio"}  # per micro-batch; the global one below
    shares = {
        "train/lm_loss": losses.lm,
        TRAIN_LOSS: losses.lm + aux_total,
        **{f"train/aux/{k}": v for k, v in losses.aux.items()},
        **{f"routing/{k}": v for k, v in stats.items() if v.ndim == 0},
        **{f"count/{k}/{i}": x for k, v in stats.items() if v.ndim for i, x in enumerate(v)},
    }
    maxed = {
        **gate_stats(losses.router),
        "train/grad_norm": grad_norm,  # the same on every rank, as is the global token count
        "window/scored_tokens": window.scored_tokens,
        "train/lm_loss_max_rank": losses.rank_lm,
        "window/data_s": ones * window.data_s,
        **{f"mem/{k}": ones * v for k, v in memory_stats(par.device).items()},
        **{f"routing/{k}/{i}": x for k, v in losses.router_state.items() for i, x in enumerate(v)},
    }
    values = reduce_scalars(shares, maxed, replicas=par.tp, group=device_group(par.device))
    values.update(count_fractions({k: values.pop(k) for k in list(values) if k.startswith("count/")}))
    scored = values.pop("window/scored_tokens")
    data_s = values.pop("window/data_s")
    values["train/lr"] = lr
    values[TOKENS_PER_S] = scored / elapsed
    values["perf/tokens_per_s_per_device"] = scored / elapsed / dist.get_world_size()  # torchtitan's "tps"
    values[STEP_TIME] = elapsed / window.steps
    values["perf/data_time_s"] = data_s / window.steps
    values["perf/data_share"] = data_s / elapsed
    achieved = flops_per_position * window.positions / (elapsed * dist.get_world_size())
    values["perf/tflops_per_device"] = achieved / 1e12
    if peak is not None:
        values[MFU] = achieved / peak
    values["progress/tokens"] = float(state.tokens_seen)
    values["train/skipped_steps"] = float(state.skipped_steps)
    values["progress/flops_paper"] = state.flops_paper
    values["progress/flops_executed"] = state.flops_executed
    return values


def export_final(model: MoRModel, cfg: JobConfig, state: TrainState, rank: int) -> None:
    """Gather full weights to CPU and write <run_dir>/export on rank 0 (every rank joins the gather), with
    what a model card needs to say about the training."""
    if not all_finite(model):
        raise FloatingPointError("the final weights hold NaN or inf: no export written (the checkpoints are finite)")
    sd: dict[str, Any] = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        dtype = torch.bfloat16 if cfg.checkpoint.export_bf16 else None
        training = {
            "steps": state.step,
            "tokens": state.tokens_seen,
            "seq_len": cfg.training.seq_len,
            "dtype": cfg.training.dtype,
            "data": list(cfg.data.sources),
        }
        extra = {"tokenizer": cfg.data.tokenizer, "training": training}
        try:
            save_exported(cfg.folder.export, cfg.model, sd, dtype=dtype, extra=extra)
        except OSError as e:  # a full disk, no permission: the run is saved, only its export is missing
            raise CheckpointError(
                f"{e}. The checkpoint of step {state.step} is complete: fix that and relaunch the same command "
                f"to write the export"
            ) from None


def batches(it: Iterator[dict[str, torch.Tensor]], n: int) -> list[dict[str, torch.Tensor]]:
    out = list(islice(it, n))
    if len(out) < n:
        raise RuntimeError("the train data loader ended; split 'train' must repeat forever")
    return out


def train(cfg: JobConfig) -> TrainState:
    """Run the job described by `cfg` (validated); returns the final TrainState."""
    t = cfg.training
    device = init_distributed(t.device)
    mesh = build_mesh(cfg.parallelism, device.type)
    dp_rank, dp_world = dp_coordinates(mesh)
    par = Parallel(device, mesh, dp_rank, dp_world, mesh["tp"].size())
    accum = grad_accumulation(cfg, dp_world)
    if t.deterministic:
        configure_determinism(device)
    size_vocabulary(cfg)
    lock = lock_run_dir(cfg.run_dir, par.rank)

    model = build_model(cfg, mesh, device)
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_lr_scheduler(optimizer, cfg.optimizer, t.steps)
    loader_kw: dict[str, Any] = dict(seq_len=t.seq_len, micro_batch_size=t.micro_batch_size, dp_rank=dp_rank)
    train_loader = build_dataloader(cfg.data, split="train", dp_world=dp_world, seed=t.seed, **loader_kw)
    val_loader = None
    if t.val_interval:
        val_windows = t.val_batches * t.global_batch_size  # a fixed set, the same for every layout
        val_loader = build_dataloader(
            cfg.data, split="val", dp_world=dp_world, seed=t.seed, val_windows=val_windows, **loader_kw
        )
    state = TrainState()
    checkpointer = Checkpointer(cfg.checkpoint, cfg.folder.checkpoints, config_toml=dump_toml(cfg))
    ck_states = {
        "model": ModelState(model),
        "optimizer": OptimizerState(model, optimizer),
        "lr_scheduler": SchedulerState(scheduler),
        "train_state": state,
    }
    ck_per_rank = {"dataloader": train_loader}
    if cfg.checkpoint.create_seed:
        create_seed(checkpointer, model)
        return finish(state, lock)
    finished_toml = resume(checkpointer, cfg, ck_states, ck_per_rank)
    if finished_toml is not None and state.step >= t.steps:
        nothing_to_do(cfg, finished_toml, state.step)
        # Stopped (SIGTERM, preemption) during its last step: saved, never exported; or killed while
        # exporting: the export is incomplete. Rank 0 decides for all (every rank joins the gather).
        problem = [export_problem(cfg.folder.export) if par.rank == 0 else None]
        dist.broadcast_object_list(problem, src=0, group=host_group())
        if problem[0] is not None:
            export_final(model, cfg, state, par.rank)
            if par.rank == 0:
                what = f"wrote the missing export of step {state.step} to {cfg.folder.export}"
                print(f"{what} ({problem[0]})", flush=True)
        return finish(state, lock)
    if par.rank == 0:  # only now: a refused resume leaves the run's record of what it ran with
        cfg.folder.config.write_text(dump_toml(cfg))
    preemption = PreemptionWatcher()

    positions = t.global_batch_size * t.seq_len
    exec_per_pos = executed_flops_per_token(cfg.model, t.seq_len)
    paper_per_pos = paper_flops_per_token(cfg.model, t.seq_len)
    # A CPU has no MFU worth reporting: only an unknown GPU is worth a warning.
    peak = peak_flops(device_name(device), cfg.metrics.peak_tflops, warn=par.rank == 0 and device.type != "cpu")
    if "wandb" in cfg.metrics.backends and not state.wandb_run_id:  # a new run; a resumed one keeps its id
        run_id = [uuid.uuid4().hex[:12] if par.rank == 0 else ""]
        dist.broadcast_object_list(run_id, src=0, group=host_group())
        state.wandb_run_id = run_id[0]
    metrics = MetricLogger(
        cfg.metrics, cfg.folder, t.steps, par.rank, first_step=state.step, job=cfg, wandb_id=state.wandb_run_id
    )
    if par.rank == 0:
        print(f"run folder {cfg.run_dir} | TensorBoard: tensorboard --logdir {cfg.folder.tb}", flush=True)
    first_step, skipped_at_start = state.step, state.skipped_steps
    window = LogWindow()
    with torch.random.fork_rng(devices=[]):
        train_iter = iter(train_loader)
    stopped = False
    while state.step < t.steps and not stopped:
        lr = float(optimizer.param_groups[0]["lr"])  # the rate this step uses
        fetch = time.perf_counter()
        # Fetching never moves torch's generator (a loader draws its workers' seed when it first iterates,
        # which a resumed run does at another point of the stream): only the model's draws do, so a
        # resumed run continues random routing's draws bit for bit.
        with torch.random.fork_rng(devices=[]):
            micro_batches = batches(train_iter, accum)
        window.data_s += time.perf_counter() - fetch
        losses, grad_norm, skipped = train_step(model, optimizer, scheduler, micro_batches, par, cfg)
        state.step += 1
        state.skipped_steps += skipped
        state.tokens_seen += positions
        state.flops_paper += paper_per_pos * positions
        if "depth_counts" in losses.router:  # routed per token: the depths this step ran, all ranks (a host sync)
            exec_per_pos = executed_flops_per_token(cfg.model, t.seq_len, losses.router["depth_counts"].tolist())
        state.flops_executed += exec_per_pos * positions
        window.add(losses.scored_tokens, positions)
        if state.step % cfg.metrics.log_interval == 0 or state.step == t.steps:
            values = log_step(losses, grad_norm, lr, window, state, exec_per_pos, peak, par)
            finite = math.isfinite(values[TRAIN_LOSS]) and math.isfinite(values["train/grad_norm"])
            if t.nonfinite == "stop" and not finite:
                raise FloatingPointError(f"step {state.step}: non-finite loss or grad norm: {values}")
            metrics.log(state.step, values, state.step - first_step)
            window = LogWindow()
        if val_loader is not None and (state.step % t.val_interval == 0 or state.step == t.steps):
            start = time.perf_counter()
            val = validate(model, val_loader, len(val_loader), par)
            val["perf/val_time_s"] = time.perf_counter() - start
            window.start += val["perf/val_time_s"]  # training throughput leaves validation out
            metrics.log(state.step, val, state.step - first_step)
        checkpointer.poll()
        stopped = preemption.should_stop()
        if stopped or checkpointer.should_save(state.step, last=state.step == t.steps):
            require_finite(losses, grad_norm, state.step, t.nonfinite)
            # the stall is logged, and the metrics up to this step put on disk, before the checkpoint counts
            record = checkpointer.save(state.step, ck_states, ck_per_rank, wait=stopped, written=metrics.checkpoint)
            if par.rank == 0:
                print(f"step {state.step}: checkpoint saved (training stalled {record.stall_s:.2f}s)", flush=True)
        metrics.end_step()

    checkpointer.close()
    if state.skipped_steps - skipped_at_start == state.step - first_step > 0:
        raise FloatingPointError(
            f"every step of this launch ({first_step + 1} to {state.step}) had a non-finite grad norm and was "
            f"skipped: nothing was trained, no export written. Check the model and optimizer settings"
        )
    if stopped:
        logger.warning("preempted: saved step %d; the same command resumes", state.step)
    elif cfg.checkpoint.save_final:
        export_final(model, cfg, state, par.rank)
    metrics.close()
    return finish(state, lock)


def lock_run_dir(run_dir: Path, rank: int) -> RunLock | None:
    """Rank 0 locks the run folder; every rank fails at once if another job holds it."""
    lock, error = None, [""]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = RunLock(run_dir)
        except CheckpointError as e:
            error = [str(e)]
    dist.broadcast_object_list(error, src=0, group=host_group())
    if error[0]:
        raise CheckpointError(error[0])
    return lock


def nothing_to_do(cfg: JobConfig, finished_toml: str, step: int) -> None:
    """A finished run relaunched: say so; a changed config is an error (it was never trained with)."""
    diffs = config_differences(finished_toml, config_to_dict(cfg), keys=None)
    msg = f"run {cfg.run_dir} already finished at step {step} (training.steps = {cfg.training.steps}): nothing to do"
    if diffs:
        raise ConfigError(f"{msg}, but this launch's config differs from the one it ran with: " + "; ".join(diffs))
    if dist.get_rank() == 0:
        print(msg, flush=True)


def finish(state: TrainState, lock: RunLock | None = None) -> TrainState:
    """Leave the process group together: no rank exits while another still talks to it. (Its gloo threads
    outlive it; train.py then exits without interpreter teardown, see train.leave.)"""
    barrier()
    dist.destroy_process_group()
    if lock is not None:
        lock.release()
    return state


def require_finite(losses: StepLosses, grad_norm: torch.Tensor, step: int, mode: str) -> None:
    """Never checkpoint bad weights: in "stop" mode a non-finite step ends the run before its save.
    ("skip" mode never applied a non-finite update.) The loss is already reduced into every rank's norm."""
    if mode == "stop" and not (torch.isfinite(losses.lm) & torch.isfinite(grad_norm)).all().item():
        raise FloatingPointError(
            f"step {step}: non-finite loss ({losses.lm.item()}) or grad norm ({grad_norm.item()}); stopping "
            f'without saving. Resume from the last checkpoint with a lower lr, or set training.nonfinite = "skip"'
        )


def create_seed(checkpointer: Checkpointer, model: MoRModel) -> None:
    """Write the initial weights as step 0 (model only), so runs of any parallel layout start from them."""
    if complete_steps(checkpointer.root):
        raise ConfigError(f"checkpoint.create_seed: {checkpointer.root} already holds checkpoints")
    checkpointer.save(0, {"model": ModelState(model)}, {}, wait=True)
    if dist.get_rank() == 0:
        print(f"seed checkpoint written to {step_dir(checkpointer.root, 0)}", flush=True)


def resume(checkpointer: Checkpointer, cfg: JobConfig, states: dict[str, Any], per_rank: dict[str, Any]) -> str | None:
    """Load the run's latest (or checkpoint.load_step) checkpoint, else checkpoint.init_from, else nothing.
    A checkpoint whose config differs in a structural key (checkpoint.STRUCTURAL_KEYS: what the weights mean,
    the tokenizer, seq_len) is refused in one line naming each such key and both values.
    Returns the config the run's own checkpoint was saved with (None for init_from or a fresh start)."""
    step = checkpointer.resolve_load_step()
    if step is not None:
        path = step_dir(checkpointer.root, step)
    elif cfg.checkpoint.init_from:
        path = Path(cfg.checkpoint.init_from)
    else:
        return None
    current = config_to_dict(cfg)

    def check(saved_toml: str) -> None:
        diffs = config_differences(saved_toml, current)
        if diffs:
            raise ConfigError(f"cannot resume from {path}: the model or data changed: " + "; ".join(diffs))

    start = time.perf_counter()
    checkpointer.load(path, states, per_rank, check)
    states["lr_scheduler"].apply()
    if dist.get_rank() == 0:
        print(f"resumed from {path} in {time.perf_counter() - start:.1f}s", flush=True)
    return saved_config(path) if step is not None else None
