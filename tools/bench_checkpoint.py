"""Checkpoint cost for a config on this machine: size, synchronous save, async stall, load, checksums.

    python tools/bench_checkpoint.py train_configs/debug_mor.toml [--out /tmp/ckbench]

One process, fp32 model + AdamW state (moments filled by one optimizer step), written with the same
Checkpointer the trainer uses. Prints one markdown table row. "checksums" is the part of the sync save
spent hashing the files for COMPLETE (timed again on its own); "verify" the part of the load checking them.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="job TOML; --section.key=value overrides follow")
    p.add_argument("--out", default=None, help="scratch folder (default: a temporary one)")
    args, overrides = p.parse_known_args()
    import torch  # after parsing: --help loads no torch

    from mor_pretrain.checkpoint import Checkpointer, ModelState, OptimizerState
    from mor_pretrain.config import CheckpointConfig, load_config
    from mor_pretrain.folders import mark_complete, step_dir, verify_files
    from mor_pretrain.models import MoRModel

    cfg = load_config(args.config, overrides)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = 32000
    torch.manual_seed(0)
    model = MoRModel(cfg.model)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p_ in model.parameters():
        p_.grad = torch.zeros_like(p_)
    opt.step()
    states = {"model": ModelState(model), "optimizer": OptimizerState(model, opt)}
    root = Path(args.out or tempfile.mkdtemp(prefix="ckbench-"))
    shutil.rmtree(root, ignore_errors=True)

    sync = Checkpointer(CheckpointConfig(keep_latest=5), root / "sync")
    rec = sync.save(1, states, {})
    size = folder_bytes(step_dir(root / "sync", 1))
    start = time.perf_counter()
    mark_complete(step_dir(root / "sync", 1), 1)
    hash_s = time.perf_counter() - start

    asyn = Checkpointer(CheckpointConfig(keep_latest=5, async_save=True), root / "async")
    arec = asyn.save(1, states, {})
    asyn.close()

    start = time.perf_counter()
    sync.load(step_dir(root / "sync", 1), states, {}, check_config=lambda _: None)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    assert verify_files(step_dir(root / "sync", 1)) is None
    verify_s = time.perf_counter() - start
    shutil.rmtree(root, ignore_errors=True)
    params = model.num_params() / 1e6
    cols = ["config", "params", "checkpoint size", "sync save", "of which checksums", "async stall", "async total"]
    print("| " + " | ".join([*cols, "load", "of which verify"]) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {Path(args.config).stem} | {params:.1f}M | {size / 2**20:.1f} MiB | {rec.total_s:.2f} s | "
        f"{hash_s:.2f} s | {arec.stall_s:.2f} s | {arec.total_s:.2f} s | {load_s:.2f} s | {verify_s:.2f} s |"
    )
    cpu = platform.processor() or platform.machine()
    print(f"\n{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")


if __name__ == "__main__":
    main()
