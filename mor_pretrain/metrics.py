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
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from mor_pretrain.checkpoint import SaveRecord

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


# W&B's service writes a run's file in 32 KiB blocks, and the last, partial one only once the run is finished
# and the service has closed it: rows in that block die with the service (a lost node, an OOM kill). Offline,
# the logger therefore finishes the W&B run at each checkpoint, before the checkpoint counts, waits for the file
# to be written, and continues the same run (same id) in a new run folder, a "segment", from the next row on.
# Each segment records the first step it logs; a relaunch from step N moves the segments that began past N
# (steps a crashed launch logged after its last checkpoint, which the relaunch logs again) to SUPERSEDED.
SEGMENT_FIRST_STEP = "mor_first_step"
SUPERSEDED = "superseded"


def supersede_wandb_segments(wandb_dir: Path, after: int) -> list[Path]:
    """Move the W&B run folders under `wandb_dir` whose first logged step is past `after` to
    `wandb_dir/superseded/`, out of `wandb sync <wandb_dir>`'s reach. Returns their new paths."""
    moved = []
    for marker in sorted(wandb_dir.glob(f"*/{SEGMENT_FIRST_STEP}")):
        if marker.parent.is_symlink():  # W&B's latest-run
            continue
        try:
            first = int(marker.read_text())
        except ValueError:
            continue
        if first <= after:
            continue
        dest = wandb_dir / SUPERSEDED / marker.parent.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        n = 1
        while dest.exists():
            dest, n = dest.with_name(f"{marker.parent.name}.{n}"), n + 1
        marker.parent.rename(dest)
        moved.append(dest)
    return moved


class MetricLogger:
    """Writes scalars to the configured backends (rank 0) and prints a console line at log steps.

    The trainer calls log() for a step's scalars (any number of times), checkpoint() once a checkpoint of the
    step is written but not yet marked complete, and end_step() when the step ends. TensorBoard is flushed at
    each log(); W&B gets one committed row per step, at its end or at its checkpoint, whichever is first.
    """

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
        """first_step: the step the run resumes from (0: a start). Both backends show each step once, as the
        last launch that trained it logged it: a launch that crashed after its last checkpoint logged steps
        past first_step that this launch logs again, and their earlier records are dropped, by TensorBoard's
        purge_step and by moving W&B's segments that began past first_step aside (supersede_wandb_segments).
        Steps up to first_step stay as logged: their records were on disk before that checkpoint counted.
        job: the resolved job config, shown in TensorBoard's text tab and as the W&B run's config.
        wandb_id: the W&B run to create or continue."""
        self.total_steps = total_steps
        self.rank = rank
        self.start = time.perf_counter()
        self.writer = None
        self.wandb: Any = None  # the open W&B run (segment), if any
        self.use_wandb = "wandb" in cfg.backends
        self.wandb_dir = folder.path / "wandb"
        self._wandb_init: dict[str, Any] = {}
        self._wandb_floor = 0  # W&B drops steps below the run's starting step (online: the server's next step)
        self._segments = 0
        self._wandb_offline = False
        self._row: dict[str, float] = {}  # the current step's W&B row, committed at its end
        self._row_step = -1
        if rank != 0:
            return
        if "tensorboard" in cfg.backends:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_dir = folder.tb
            self.writer = SummaryWriter(str(self.tb_dir), purge_step=first_step + 1)
            if job is not None:
                self.writer.add_text("config", "```toml\n" + dump_toml(job) + "```", first_step)
        if self.use_wandb:
            moved = supersede_wandb_segments(self.wandb_dir, first_step)
            if moved:
                print(
                    f"W&B: moved {len(moved)} run folder(s) holding steps past {first_step} (logged before a crash, "
                    f"logged again now) to {self.wandb_dir / SUPERSEDED}",
                    flush=True,
                )
            self._wandb_init = dict(
                project=cfg.wandb_project,
                name=folder.path.name,
                id=wandb_id or None,
                resume="allow",
                dir=str(folder.path),
                config=config_to_dict(job) if job is not None else None,
            )
            self._open_wandb(first_step + 1)

    def _open_wandb(self, first_step: int) -> None:
        """Start (or continue) the W&B run in a new segment whose first step is `first_step`."""
        import wandb  # optional extra "wandb"

        settings = None
        if self._segments:  # a checkpoint closed the last one: the same run goes on, without a banner
            settings = wandb.Settings(silent=True)
        elif wandb.setup().settings.mode in ("offline", "dryrun"):  # no summary at each checkpoint's close
            settings = wandb.Settings(quiet=True)
        self.wandb = wandb.init(**self._wandb_init, settings=settings)
        self._wandb_offline = bool(self.wandb.offline)
        Path(self.wandb.settings.sync_dir, SEGMENT_FIRST_STEP).write_text(f"{first_step}\n")
        self._wandb_floor = self.wandb.starting_step
        self._segments += 1

    def log(self, step: int, scalars: dict[str, float], steps_done_since_start: int, console: bool = True) -> None:
        """Write `scalars` at global step `step`; steps_done_since_start drives the ETA."""
        if self.rank != 0:
            return
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        if self.use_wandb:
            if step != self._row_step:
                self._commit()
            if self.wandb is None:
                self._open_wandb(step)
            self._row_step = step
            self._row.update(scalars)
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

    def _commit(self) -> None:
        """Send the pending W&B row as one committed step (W&B keeps a step open until it is committed)."""
        if self._row and self.wandb is not None and self._row_step >= self._wandb_floor:
            self.wandb.log(self._row, step=self._row_step, commit=True)
        self._row, self._row_step = {}, -1

    def end_step(self) -> None:
        """The step ended: commit its W&B row."""
        if self.rank == 0:
            self._commit()

    def checkpoint(self, record: SaveRecord) -> None:
        """A checkpoint is written (or staged) and not yet marked complete: log its stall and put every W&B
        row up to its step on disk (offline: finish the segment; the next row opens the next one), so that no
        checkpoint a relaunch can resume from has rows missing before it."""
        self.log(record.step, {"checkpoint/stall_s": record.stall_s}, 0, console=False)
        if self.rank != 0 or self.wandb is None:
            return
        self._commit()
        if self.wandb.offline:
            self._finish_wandb()

    def _finish_wandb(self) -> None:
        """Finish the W&B run (segment) and wait until its file is written: finish() returns before W&B's
        service has written the last block, teardown() waits for the service to end, every file closed."""
        import wandb

        self.wandb.finish()
        self.wandb = None
        wandb.teardown()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.rank != 0:
            return
        self._commit()
        if self.wandb is not None:
            self._finish_wandb()
        if self._wandb_offline:
            print(f"W&B (offline): wandb sync {self.wandb_dir} uploads this run's files", flush=True)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
