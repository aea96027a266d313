"""Train a model: `python train.py --config train_configs/X.toml [--section.key=value ...]`.

Runs as one process, or one process per device under torchrun:
`torchrun --nproc_per_node=N train.py --config ...`. Overrides beat the TOML, which beats the defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:  # the package (and torch) load once the arguments parse: --help answers at once
    from mor_pretrain.config import JobConfig


def dry_run(cfg: JobConfig, world_size: int) -> None:
    """Check a config without devices or data: the mesh for `world_size`, the model built on meta, FLOPs, and
    one training step traced at that world size (memory, collectives, predicted speed: mor_pretrain.estimate)."""
    import torch

    from mor_pretrain.data.loader import check_lanes
    from mor_pretrain.estimate import estimate, fit_report, fitting_settings, report
    from mor_pretrain.flops import executed_flops_per_token, paper_flops_per_token
    from mor_pretrain.models import MoRModel
    from mor_pretrain.parallel import check_tp, mesh_shape
    from mor_pretrain.trainer import grad_accumulation, size_vocabulary

    # What the launch checks before it trains, in the same functions.
    rep, shard, tp = mesh_shape(cfg.parallelism, world_size)
    accum = grad_accumulation(cfg, rep * shard)
    size_vocabulary(cfg)
    check_tp(cfg.model, tp)
    check_lanes(cfg.data, rep * shard)
    with torch.device("meta"):
        model = MoRModel(cfg.model)
    t = cfg.training
    print(f"config {cfg.name}: {world_size} processes = dp_replicate {rep} x dp_shard {shard} x tp {tp}")
    print(f"model: {model.num_params() / 1e6:.1f}M params ({model.num_params(True) / 1e6:.1f}M non-embedding)")
    print(f"batch: {t.global_batch_size} x {t.seq_len} tokens, micro-batch {t.micro_batch_size}, accumulation {accum}")
    print(
        f"FLOPs/token: executed {executed_flops_per_token(cfg.model, t.seq_len) / 1e9:.3f} G (fwd+bwd), "
        f"paper convention {paper_flops_per_token(cfg.model, t.seq_len) / 1e9:.3f} G (fwd)"
    )
    est = estimate(cfg, world_size)
    print(report(est, t.dtype))
    if found := fitting_settings(cfg, world_size, est):
        print(fit_report(found))


def user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message tells the user what to fix: one line, no traceback. Add new user-facing errors
    here."""
    from mor_pretrain.checkpoint import CheckpointError
    from mor_pretrain.config import ConfigError
    from mor_pretrain.data import DataError

    return (
        ConfigError,
        CheckpointError,  # a damaged, hostile or refused checkpoint, a run folder held by another launch
        DataError,
        FileNotFoundError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
        FloatingPointError,  # a non-finite loss or grad norm under training.nonfinite = "stop"
    )


def user_message(e: Exception) -> str:
    """The one-line message of a user error. A DataLoader worker's error reaches the trainer re-raised with
    the worker's traceback in its message; the original `module.Error: message` is its last line."""
    text = str(e)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text


def first_to_fail() -> bool:
    """Whether this process reports the job's error, so a job prints it once rather than once per rank.

    Before the process group exists every rank fails the same way, so rank 0 reports. After, the first rank
    to fail claims the report in the launcher's store: the others are either failing the same way or failing
    because that rank left (a collective with a closed peer), and stay quiet.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return int(os.environ.get("RANK", "0")) == 0
    try:
        return bool(dist.distributed_c10d._get_default_store().add("mor_pretrain/error_reports", 1) == 1)
    except Exception:  # the store went away with the launcher: better twice than never
        return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--config", required=True, help="TOML job config")
    parser.add_argument("--dry-run", type=int, metavar="WORLD_SIZE", help="only check the config and model")
    args, overrides = parser.parse_known_args(argv)
    from mor_pretrain import trainer
    from mor_pretrain.config import ConfigError, load_config

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, overrides)
        if args.dry_run is not None:
            try:
                dry_run(cfg, args.dry_run)
            except ValueError as e:  # mesh and batch arithmetic that the config alone cannot check
                raise ConfigError(f"{args.config}: {e}") from None
            return
        trainer.train(cfg)
    except user_errors() as e:
        if first_to_fail():
            print(f"error: {user_message(e)}", file=sys.stderr, flush=True)
        leave(1)
    except Exception:
        if first_to_fail():
            raise
        leave(1)
    leave(0)


def leave(code: int) -> NoReturn:
    """Exit without interpreter teardown. The gloo backend's threads outlive the process group, and the C++
    static destructors of a normal exit race them and can abort the process ("terminate called without an
    active exception"), even after a run that succeeded."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
