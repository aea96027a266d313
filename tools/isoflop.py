"""isoFLOP studies: plan runs from FLOP budgets, and report on finished runs.

  python tools/isoflop.py plan --budget 2e18 1e18 --configs train_configs/vanilla_360m.toml \\
      train_configs/mor_360m.toml [--global-batch-size N] [--seq-len N] [--run-root DIR] [--out DIR]
      [--seeds 0 1 2] [--lr 1e-3 3e-3] [--gpu H100 [--gpus 8]] [--section.key=value ...]
  python tools/isoflop.py report RUN_DIR [RUN_DIR ...] [--out DIR]
  python tools/isoflop.py compare RUN_DIR [RUN_DIR ...] --pair A:B [--pair C:D ...] [--margin 0.05] [--out DIR]

plan: budgets are in the paper's FLOP convention. Per config, the largest budget is a full run; smaller ones
are cooldowns branched from its checkpoints (trapezoid reuse). --out DIR writes one TOML per run and
plan.json; run them with `scripts/sweep.sh DIR`. Extra --section.key=value overrides apply to every config.
--gpu adds each run's and the sweep's predicted GPU-hours (one step of each config traced by the dry run).
report: a markdown table of the runs, with both validation losses (causal routing: comparable across model
families and what a deployed model gets; top-k: expert choice's training-time rule, which sees future tokens;
equal without expert choice); with --out, also results.md, results.json and PNG plots of validation loss
against FLOPs and tokens.
compare: runs planned with --seeds, grouped into arms (config names), each scored per window by
`tools/eval.py RUN --tasks val --limit N --log-samples RUN/eval/val_windows.jsonl`: every arm's mean held-out loss
and the paired differences a - b over the seeds both trained, with 95% bootstrap intervals over seeds and windows,
each read against --margin, the largest difference called "the same"; with --out, paired.md and paired.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

GPU_NAMES = ("A100", "H100", "H200", "B200")  # mor_pretrain.estimate.GPUS, listed without importing torch


def plan(args: argparse.Namespace, overrides: list[str]) -> int:
    from mor_pretrain.config import load_config
    from mor_pretrain.isoflop import plan_sweep, plan_table, write_plan

    extra = list(overrides)
    if args.global_batch_size is not None:
        extra.append(f"--training.global_batch_size={args.global_batch_size}")
    if args.seq_len is not None:
        extra.append(f"--training.seq_len={args.seq_len}")
    if args.run_root is not None:
        extra.append(f'--run_root="{args.run_root}"')
    configs = {path: load_config(path, extra) for path in args.configs}
    for path, cfg in configs.items():
        if cfg.training.val_interval == 0:
            print(f"warning: {path}: training.val_interval = 0, its runs log no validation loss", file=sys.stderr)
    runs = plan_sweep(list(configs.items()), args.budget, args.seeds, args.lr)
    if args.gpu is not None:  # the dry run traces one step per config at the sweep's GPU count
        from mor_pretrain.isoflop import gpu_hours, gpu_hours_table, step_seconds

        seconds = {path: step_seconds(cfg, args.gpu, args.gpus) for path, cfg in configs.items()}
    if args.out is not None:
        path = write_plan(args.out, runs, configs)
        print(f"wrote {len(runs)} run configs and {path}", file=sys.stderr)
    if args.json:
        rows = [asdict(r) for r in runs]
        if args.gpu is not None:
            for row, r in zip(rows, runs, strict=True):
                row.update(step_seconds=seconds[r.source], gpu_hours=gpu_hours(r, seconds[r.source], args.gpus))
        print(json.dumps(rows, indent=2))
    else:
        print(plan_table(runs))
        if args.gpu is not None:
            print()
            print(gpu_hours_table(runs, seconds, args.gpu, args.gpus))
    return 0


def report(args: argparse.Namespace) -> int:
    from mor_pretrain.isoflop import write_report

    table, _ = write_report(args.run_dirs, args.out)
    print(table)
    if args.out is not None:
        print(f"wrote results.md, results.json and plots to {args.out}", file=sys.stderr)
    return 0


def compare(args: argparse.Namespace) -> int:
    from mor_pretrain.isoflop import write_paired_report

    pairs = []
    for text in args.pair:
        a, sep, b = text.partition(":")
        if not sep or not a or not b:
            raise ValueError(f"--pair takes ARM_A:ARM_B, got {text!r}")
        pairs.append((a, b))
    if not args.margin > 0:
        raise ValueError(f"--margin must be > 0, got {args.margin}")
    print(write_paired_report(args.run_dirs, pairs, args.margin, args.out))
    if args.out is not None:
        print(f"wrote paired.md and paired.json to {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("plan", help="turn FLOP budgets into runs")
    pp.add_argument("--budget", type=float, nargs="+", required=True, help="FLOP budgets (paper convention)")
    pp.add_argument("--configs", nargs="+", required=True, help="TOML configs, one model each")
    pp.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="plan every config once per training seed (names get _s<seed>)",
    )
    pp.add_argument(
        "--lr",
        type=float,
        nargs="+",
        default=None,
        help="plan every config at each of these peak learning rates (names get _lr<lr>)",
    )
    pp.add_argument("--global-batch-size", type=int, default=None, help="sequences per step; default: config's")
    pp.add_argument("--seq-len", type=int, default=None, help="tokens per sequence; default: config's")
    pp.add_argument("--run-root", default=None, help="run_root of the written configs; default: config's")
    pp.add_argument("--out", default=None, metavar="DIR", help="write run configs and plan.json here")
    pp.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    pp.add_argument("--gpu", choices=GPU_NAMES, default=None, help="also predict GPU-hours on this GPU type")
    pp.add_argument("--gpus", type=int, default=8, help="GPUs per run for --gpu (default 8)")
    rp = sub.add_parser("report", help="table and plots from finished runs")
    rp.add_argument("run_dirs", nargs="+", help="run folders (<run_root>/<name>)")
    rp.add_argument("--out", default=None, metavar="DIR", help="write results.md, results.json and PNGs here")
    cp = sub.add_parser("compare", help="arms over paired seeds, with bootstrap intervals")
    cp.add_argument("run_dirs", nargs="+", help="run folders of seeded runs, each with eval/val_windows.jsonl")
    cp.add_argument("--pair", action="append", required=True, help="ARM_A:ARM_B, reported as a - b; repeatable")
    cp.add_argument("--margin", type=float, default=0.05, help="largest difference (nats) called the same")
    cp.add_argument("--out", default=None, metavar="DIR", help="write paired.md and paired.json here")
    args, overrides = p.parse_known_args(argv)
    if args.command != "plan" and overrides:
        p.error(f"unrecognized arguments: {' '.join(overrides)}")
    from mor_pretrain.config import ConfigError  # after parsing: --help loads no torch

    commands = {"plan": lambda: plan(args, overrides), "report": lambda: report(args), "compare": lambda: compare(args)}
    try:
        return commands[args.command]()
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
