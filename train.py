"""Train a model: `python train.py --config train_configs/X.toml [--section.key=value ...]`.

Runs as one process, or one process per device under torchrun:
`torchrun --nproc_per_node=N train.py --config ...`. Overrides beat the TOML, which beats the defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

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
    from mor_pretrain.config import CheckpointError, ConfigError
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


# How long a rank that stays quiet about its failure waits for the rank that reports it to have printed
# (printing takes well under a second; the wait ends as soon as it has).
REPORT_WAIT_S = 30.0


def job_store() -> Any:
    """The key-value store every rank of this launch shares, or None: the default group's, or before the
    group exists the one torchrun's agent serves at MASTER_ADDR:MASTER_PORT (which the group's store then
    becomes: the same keys, through the same prefix)."""
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return dist.distributed_c10d._get_default_store()
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_PORT" not in os.environ:
        return None  # one process, or a launcher that serves no store
    timeout = datetime.timedelta(seconds=10)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore("default_pg", store)


def report_failure(line: str | None) -> None:
    """Print this rank's failure, `line` or (None) the current exception's traceback, unless another rank
    reports it; return once what this rank stays quiet about has been printed.

    A job prints each distinct error line once, from whichever rank finds it first, and a traceback only when
    it is the job's first failure (a rank that fails later, in a collective with a departed peer, reports a
    consequence, not news). Ranks claim their reports in the launch's store, and a rank that stays quiet waits
    until the claimant has printed: torchrun stops every rank as soon as one exits, which could otherwise
    stop the claimant between its claim and its print, and the job would end without a word. Without a store
    (one process; another launcher before the process group exists, where every rank fails the same way)
    rank 0 reports and the others give it a moment.
    """
    import datetime
    import hashlib
    import time
    import traceback

    def show() -> None:
        if line is None:
            traceback.print_exc()
        else:
            print(line, file=sys.stderr)
        sys.stderr.flush()

    prefix = f"mor_pretrain/failure/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    try:
        store = job_store()
        if store is not None:
            first = store.add(prefix + "count", 1) == 1
            if line is None:
                mine, printed = first, prefix + "printed/first"
            else:
                what = hashlib.sha1(line.encode()).hexdigest()
                mine, printed = store.add(prefix + "claim/" + what, 1) == 1, prefix + "printed/" + what
    except Exception:  # the launcher, and its store, went away: better twice than never
        show()
        return
    if store is None:
        if int(os.environ.get("RANK", "0")) == 0:
            show()
        else:
            time.sleep(2.0)
        return
    # Errors from the store: the claimant died before it printed, or the launcher went away.
    with contextlib.suppress(Exception):
        if mine:
            show()
        else:
            store.wait([printed], datetime.timedelta(seconds=REPORT_WAIT_S))
        for key in ([printed] if mine else []) + ([prefix + "printed/first"] if first else []):
            store.set(key, "1")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--config", required=True, help="TOML job config")
    parser.add_argument("--dry-run", type=int, metavar="WORLD_SIZE", help="only check the config and model")
    args, overrides = parser.parse_known_args(argv)
    from mor_pretrain import trainer
    from mor_pretrain.config import ConfigError, error_source, load_config

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, overrides)
        if args.dry_run is not None:
            try:
                dry_run(cfg, args.dry_run)
            except ValueError as e:  # mesh and batch arithmetic that the config alone cannot check
                raise ConfigError(f"{error_source(str(e), args.config, overrides)}: {e}") from None
            return
        trainer.train(cfg)
    except user_errors() as e:
        report_failure(f"error: {user_message(e)}")
        leave(1)
    except Exception:
        report_failure(None)  # a bug: its traceback, once
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
