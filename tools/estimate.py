"""Size a run before launching it: trace one training step of CONFIG at WORLD ranks on this machine (no GPU)
and print per-rank peak memory by category, collectives, host syncs and a predicted step time, tokens/s and
MFU on A100, H100, H200 and B200 (the step-time model and its error band are stated in mor_pretrain/estimate.py).

python tools/estimate.py train_configs/mor_1.7b.toml --world 64 [--section.key=value ...]
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="job TOML")
    p.add_argument("--world", type=int, required=True, help="ranks (GPUs) of the run")
    args, overrides = p.parse_known_args(argv)
    from mor_pretrain.config import ConfigError, load_config  # after parsing: --help loads no torch
    from mor_pretrain.data import DataError
    from mor_pretrain.estimate import estimate, fit_report, fitting_settings, report
    from mor_pretrain.trainer import size_vocabulary

    try:
        cfg = load_config(args.config, overrides)
        size_vocabulary(cfg)
        est = estimate(cfg, args.world)
        print(report(est, cfg.training.dtype))
        if found := fitting_settings(cfg, args.world, est):
            print(fit_report(found))
    except (ConfigError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
