"""Training metrics: one collective and one host sync per log step, TensorBoard on rank 0, a console line.

The model returns losses and routing statistics as device tensors; the trainer keeps them on device and
hands them here only at log steps.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from mor_pretrain.config import (
    MFU,
    TRAIN_LOSS,
    VAL_LOSS,
    JobConfig,
    MetricsConfig,
    RunFolder,
    config_to_dict,
    dump_toml,
)

logger = logging.getLogger(__name__)

# Dense bf16 tensor-core peak per device, TFLOP/s (vendor datasheets, no sparsity), by (model, variant).
# A device name is split into words (at spaces, dashes and underscores): the model must be one of its words
# ("L4" is not "L40"), and so must the variant, if any; a name with no variant word is the model's SXM (or
# only) form. A variant word this table does not know makes the device unknown: no MFU beats a wrong one.
PEAK_TFLOPS: dict[tuple[str, str], float] = {
    ("H100", ""): 989.0,  # SXM: "NVIDIA H100 80GB HBM3"
    ("H100", "PCIE"): 756.0,
    ("H100", "NVL"): 835.0,
    ("H200", ""): 989.0,
    ("H200", "NVL"): 835.0,
    ("H800", ""): 989.0,
    ("H800", "PCIE"): 756.0,
    ("H20", ""): 148.0,
    ("GH200", ""): 989.0,
    ("B200", ""): 2250.0,
    ("A100", ""): 312.0,  # SXM4 and PCIe alike
    ("A100", "PCIE"): 312.0,
    ("A800", ""): 312.0,
    ("A800", "PCIE"): 312.0,
    ("L40S", ""): 362.0,
    ("L40", ""): 181.0,
    ("L4", ""): 121.0,
    ("MI300X", ""): 1307.0,
}
_VARIANTS = {variant for _, variant in PEAK_TFLOPS if variant}
_FORM_WORDS = {"SXM", "SXM4", "SXM5", "HBM3", "HBM3E"}  # spell out the default form


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def table_peak(name: str) -> float | None:
    """The datasheet peak (TFLOP/s) of a device called `name`, or None if the table does not know it."""
    words = set(re.split(r"[\s_\-]+", name.upper()))
    variants = words & _VARIANTS
    if len(variants) > 1:
        return None
    variant = variants.pop() if variants else ""
    for (model, form), tflops in PEAK_TFLOPS.items():
        if model in words and form == variant:
            unknown = words - {model, form, "NVIDIA", "AMD", "INSTINCT", "TESLA"} - _FORM_WORDS
            # memory sizes ("80GB", "141GB") are fine; any other word may name a variant we do not know
            if all(re.fullmatch(r"\d+GB", w) for w in unknown):
                return tflops
    return None


def peak_flops(name: str, override_tflops: float, warn: bool = True) -> float | None:
    """Peak FLOP/s of one device called `name`: the override if set, else the table. None (with a warning)
    if unknown: a guessed peak would report a wrong MFU, which is worse than none."""
    if override_tflops > 0:
        return override_tflops * 1e12
    tflops = table_peak(name)
    if tflops is not None:
        return tflops * 1e12
    if warn:
        logger.warning("no bf16 peak known for device %r: MFU is not reported; set metrics.peak_tflops", name)
    return None


def memory_stats(device: torch.device) -> dict[str, float]:
    """This process's peak memory and its share of the device.

    CUDA: max allocated / reserved since the last reset (GiB), reserved as a share of the device's memory,
    and the caching allocator's cumulative retries (cache flushes to satisfy an allocation: a sign of
    fragmentation or memory pressure) and OOMs. CPU: peak RSS (GiB) and its share of physical memory.
    """
    gib = 1024**3
    if device.type == "cuda":
        counters = torch.cuda.memory_stats(device)
        reserved = torch.cuda.max_memory_reserved(device)
        return {
            "max_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
            "max_reserved_gib": reserved / gib,
            "max_reserved_share": reserved / torch.cuda.get_device_properties(device).total_memory,
            "alloc_retries": float(counters.get("num_alloc_retries", 0)),
            "ooms": float(counters.get("num_ooms", 0)),
        }
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"max_rss_gib": rss / gib, "max_rss_share": rss / physical_memory()}


def physical_memory() -> int:
    """Bytes of physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def reduce_scalars(
    sums: dict[str, torch.Tensor],
    maxes: dict[str, torch.Tensor] | None = None,
    replicas: int = 1,
    group: dist.ProcessGroup | None = None,
) -> dict[str, float]:
    """Sum `sums` and take the maximum of `maxes` over all ranks in ONE collective and ONE host sync.

    replicas: ranks holding the same data (tensor-parallel ranks), whose sums are counted once.
    group: every rank, on the tensors' device (mor_pretrain.distributed.device_group).
    """
    maxes = maxes or {}
    names = [*sums, *maxes]
    if not names:
        return {}
    flat = torch.stack([t.detach().float().reshape(()) for t in (*sums.values(), *maxes.values())])
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat, group=group)
        stacked = torch.stack(gathered)
        flat = torch.cat([stacked[:, : len(sums)].sum(0) / replicas, stacked[:, len(sums) :].amax(0)])
    return dict(zip(names, flat.tolist(), strict=True))


def count_fractions(counts: dict[str, float]) -> dict[str, float]:
    """Count vectors of the global batch, keyed count/<name>/<i>, as fractions routing/<name>/<i> of their
    total. The token-choice load (tc_load, tokens per chosen depth) becomes routing/maxvio instead: max load
    / mean load - 1 over the global batch (MaxVio of loss-free balancing)."""
    vectors: dict[str, list[float]] = {}
    for key in sorted(counts, key=lambda k: (k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1]))):
        vectors.setdefault(key.split("/")[1], []).append(counts[key])
    out: dict[str, float] = {}
    for name, v in vectors.items():
        total = max(sum(v), 1.0)
        if name == "tc_load":
            out["routing/maxvio"] = max(v) / (total / len(v)) - 1
        else:
            out.update({f"routing/{name}/{i}": x / total for i, x in enumerate(v)})
    return out


# Console line: (tag, format), in order; a tag not logged at this step is left out.
CONSOLE = (
    (TRAIN_LOSS, "loss {:.4f}"),
    ("train/lm_loss_max_rank", "max-rank lm {:.4f}"),
    ("train/grad_norm", "gnorm {:.3f}"),
    ("train/lr", "lr {:.2e}"),
    ("perf/tokens_per_s_per_device", "tok/s/dev {:,.0f}"),
    ("perf/tflops_per_device", "{:.3g} TFLOP/s/dev"),
    (MFU, "mfu {:.1%}"),
    ("perf/data_share", "data {:.1%}"),
    ("mem/max_reserved_share", "mem {:.0%}"),
    ("mem/max_rss_share", "rss {:.0%}"),
    (VAL_LOSS["causal"], "val causal {:.4f}"),
)


class MetricLogger:
    """Writes scalars to the configured backends (rank 0) and prints a console line at log steps."""

    def __init__(
        self,
        cfg: MetricsConfig,
        folder: RunFolder,
        total_steps: int,
        rank: int,
        first_step: int = 0,
        job: JobConfig | None = None,
        wandb_id: str = "",
    ):
        """first_step: the step the run resumes after. A run that crashed logged steps past its last
        checkpoint; TensorBoard drops those (purge_step) so the resumed curves have no duplicate steps (W&B
        keeps its first values of those steps: it takes steps in increasing order only).
        job: the resolved job config, shown in TensorBoard's text tab and as the W&B run's config.
        wandb_id: the W&B run to create or continue."""
        self.total_steps = total_steps
        self.rank = rank
        self.start = time.perf_counter()
        self.writer = None
        self.wandb: Any = None
        if rank != 0:
            return
        if "tensorboard" in cfg.backends:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_dir = folder.tb
            self.writer = SummaryWriter(str(self.tb_dir), purge_step=first_step + 1 if first_step else None)
            if job is not None:
                self.writer.add_text("config", "```toml\n" + dump_toml(job) + "```", first_step)
        if "wandb" in cfg.backends:
            import wandb  # optional extra "wandb"

            config = config_to_dict(job) if job is not None else None
            self.wandb = wandb.init(
                project=cfg.wandb_project,
                name=folder.path.name,
                id=wandb_id or None,
                resume="allow",
                dir=str(folder.path),
                config=config,
            )

    def log(self, step: int, scalars: dict[str, float], steps_done_since_start: int, console: bool = True) -> None:
        """Write `scalars` at global step `step`; steps_done_since_start drives the ETA."""
        if self.rank != 0:
            return
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        if self.wandb is not None and step >= self.wandb.step:
            self.wandb.log(scalars, step=step)
        if not console:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(steps_done_since_start, 1) * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}"]
        for tag, fmt in CONSOLE:
            if tag in scalars:
                parts.append(fmt.format(scalars[tag]))
        if scalars.get("mem/alloc_retries") or scalars.get("mem/ooms"):
            parts.append(f"alloc retries {scalars['mem/alloc_retries']:.0f} ooms {scalars['mem/ooms']:.0f}")
        topk, causal = VAL_LOSS["topk"], VAL_LOSS["causal"]
        if topk in scalars and scalars[topk] != scalars.get(causal):
            parts.append(f"val topk {scalars[topk]:.4f}")
        parts.append(f"eta {_hms(eta)}")
        print(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
