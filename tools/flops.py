"""FLOPs per token of a config under the paper and executed conventions, and what a budget buys.

python tools/flops.py train_configs/mor_360m.toml [--budget 16.5e18] [--global-batch-tokens 2097152] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="job TOML (its [model] and training shape)")
    p.add_argument("--budget", type=float, default=None, help="total training FLOPs (paper convention)")
    p.add_argument(
        "--global-batch-tokens",
        type=int,
        default=None,
        help="tokens per optimizer step; default: training.global_batch_size x seq_len",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args, overrides = p.parse_known_args(argv)
    from mor_pretrain.config import ConfigError, load_config  # after parsing: --help loads no torch
    from mor_pretrain.flops import budget, executed_flops_per_token, paper_flops_per_token
    from mor_pretrain.models import MoRModel

    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m, t = cfg.model, cfg.training.seq_len
    if m.vocab_size == 0:
        from mor_pretrain.data.tokenizer import resolve_vocab_size

        m.vocab_size = resolve_vocab_size(cfg.data)
    import torch

    with torch.device("meta"):
        model = MoRModel(m)
    out = {
        "config": args.config,
        "seq_len": t,
        "params": model.num_params(),
        "non_embedding_params": model.num_params(exclude_embedding=True),
        "paper_flops_per_token": paper_flops_per_token(m, t),
        "executed_flops_per_token": executed_flops_per_token(m, t),
    }
    if args.budget is not None:
        batch = args.global_batch_tokens or cfg.training.global_batch_size * t
        b = budget(out["paper_flops_per_token"], args.budget, batch)
        out.update(budget=args.budget, global_batch_tokens=batch, tokens=b.tokens, steps=b.steps)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(
                f"{k:>26}: {v:,.1f}"
                if isinstance(v, float)
                else f"{k:>26}: {v:,}"
                if isinstance(v, int)
                else f"{k:>26}: {v}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
