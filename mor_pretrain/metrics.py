"""Training metrics: one all-reduce and one host sync per log step, TensorBoard on rank 0, a console line.

The model returns losses and routing statistics as device tensors; the trainer keeps them on device and
hands them here only at log steps.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mor_pretrain.config import MetricsConfig

logger = logging.getLogger(__name__)

# Dense bf16 tensor-core peak per device, TFLOP/s (vendor datasheets, no sparsity). The first entry whose
# key occurs in the device name wins, so the more specific names come first.
PEAK_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM: "NVIDIA H100 80GB HBM3"
    "H200": 989.0,
    "H800": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "MI300X": 1307.0,
}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def peak_flops(name: str, override_tflops: float, warn: bool = True) -> float | None:
    """Peak FLOP/s of one device called `name`: the override if set, else the table. None (with a warning)
    if unknown: a guessed peak would report a wrong MFU, which is worse than none."""
    if override_tflops > 0:
        return override_tflops * 1e12
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    if warn:
        logger.warning("no bf16 peak known for device %r: MFU is not reported; set metrics.peak_tflops", name)
    return None


def memory_stats(device: torch.device) -> dict[str, float]:
    """GPU max allocated/reserved since the last reset, or the process's peak RSS on CPU, in GiB."""
    gib = 1024**3
    if device.type == "cuda":
        return {
            "max_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
            "max_reserved_gib": torch.cuda.max_memory_reserved(device) / gib,
        }
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return {"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / gib}


def reduce_scalars(values: dict[str, torch.Tensor], op: str = "mean") -> dict[str, float]:
    """All-reduce scalar tensors across all ranks in ONE collective and ONE host sync."""
    if not values:
        return {}
    names = list(values)
    flat = torch.stack([values[k].detach().float().reshape(()) for k in names])
    if dist.is_initialized():
        dist.all_reduce(flat)
        if op == "mean":
            flat /= dist.get_world_size()
    return dict(zip(names, flat.tolist(), strict=True))


def routing_scalars(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flatten routing statistics to scalars: vectors (tokens per depth, token-choice load) become one
    fraction per entry, e.g. routing/tokens_per_depth/2."""
    out: dict[str, torch.Tensor] = {}
    for name, v in stats.items():
        if v.ndim == 0:
            out[f"routing/{name}"] = v
        else:
            frac = v.float() / v.float().sum().clamp(min=1)
            for i, x in enumerate(frac):
                out[f"routing/{name}/{i}"] = x
    return out


class MetricLogger:
    """Writes scalars to TensorBoard (rank 0) and prints a console line at log steps."""

    def __init__(self, cfg: MetricsConfig, run_dir: Path, total_steps: int, rank: int):
        self.total_steps = total_steps
        self.rank = rank
        self.start = time.perf_counter()
        self.writer = None
        if cfg.tensorboard and rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_dir = run_dir / "tb"
            self.writer = SummaryWriter(str(self.tb_dir))

    def log(self, step: int, scalars: dict[str, float], steps_done_since_start: int, console: bool = True) -> None:
        """Write `scalars` at global step `step`; steps_done_since_start drives the ETA."""
        if self.rank != 0:
            return
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        if not console:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(steps_done_since_start, 1) * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}"]
        for tag, fmt in (
            ("train/loss", "loss {:.4f}"),
            ("train/grad_norm", "gnorm {:.3f}"),
            ("train/lr", "lr {:.2e}"),
            ("perf/tokens_per_s", "tok/s {:,.0f}"),
            ("perf/mfu", "mfu {:.1%}"),
            ("val/loss", "val {:.4f}"),
        ):
            if tag in scalars:
                parts.append(fmt.format(scalars[tag]))
        parts.append(f"eta {_hms(eta)}")
        print(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
