"""Train a model: `python train.py --config train_configs/X.toml [--section.key=value ...]`.

Runs as one process, or one process per device under torchrun:
`torchrun --nproc_per_node=N train.py --config ...`. Overrides beat the TOML, which beats the defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

from mor_pretrain.config import ConfigError, JobConfig, load_config
from mor_pretrain.trainer import train


def dry_run(cfg: JobConfig, world_size: int) -> None:
    """Check a config without devices or data: the mesh for `world_size`, the model built on meta, FLOPs."""
    import torch

    from mor_pretrain.data.tokenizer import resolve_vocab_size
    from mor_pretrain.flops import executed_flops_per_token, paper_flops_per_token
    from mor_pretrain.models import MoRModel
    from mor_pretrain.parallel import mesh_shape
    from mor_pretrain.trainer import grad_accumulation

    rep, shard, tp = mesh_shape(cfg.parallelism, world_size)
    accum = grad_accumulation(cfg, rep * shard)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = resolve_vocab_size(cfg.data)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--config", required=True, help="TOML job config")
    parser.add_argument("--dry-run", type=int, metavar="WORLD_SIZE", help="only check the config and model")
    args, overrides = parser.parse_known_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if args.dry_run is not None:
        try:
            dry_run(cfg, args.dry_run)
        except (ConfigError, ValueError) as e:
            sys.exit(f"error: {args.config}: {e}")
        return
    train(cfg)
    leave(0)


def leave(code: int) -> NoReturn:
    """Exit without interpreter teardown. train() has left its process group, but the gloo backend's
    threads outlive it, and the C++ static destructors of a normal exit race them and can abort the
    process ("terminate called without an active exception") after a run that succeeded."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
