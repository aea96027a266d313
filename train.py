"""Train a model: `python train.py --config train_configs/X.toml [--section.key=value ...]`.

Runs as one process, or one process per device under torchrun:
`torchrun --nproc_per_node=N train.py --config ...`. Overrides beat the TOML, which beats the defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mor_pretrain.config import ConfigError, load_config
from mor_pretrain.trainer import train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--config", required=True, help="TOML job config")
    args, overrides = parser.parse_known_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    train(cfg)


if __name__ == "__main__":
    main()
