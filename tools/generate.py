"""Generate text from a checkpoint: an export folder (ours or a BPE import such as SmolLM2), a DCP checkpoint
folder or a run folder (its export, else its latest complete checkpoint), as tools/eval.py takes.

python tools/generate.py runs/mor_360m/export --prompt "The capital of France is" --max-new-tokens 40
  sampling: --temperature 0.8 --top-k 50 --top-p 0.95 --seed 0
  stopping: --stop "\\n\\n" (backslash escapes as in Python strings; eos always stops)
  test-time depth: --max-depth 2 | --full-depth | --threshold 0.4 (expert-topk models)
  --engine --slots 8: serve all prompts with the continuous depth-wise batching engine
One prompt streams its text as it is generated; several print one completion each. The depth
distribution of the generated tokens goes to stderr. --json prints one JSON object instead.
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the package (and torch) load only once the arguments parse: --help answers at once
    from mor_pretrain.evaluate import Tokenizer
    from mor_pretrain.generate import Generation


def continuation(tok: Tokenizer, prompt: list[int], ids: list[int]) -> str:
    """Text of `ids` as it reads after `prompt` (decoding them alone would drop a leading space)."""
    head = tok.decode(prompt)
    full = tok.decode(prompt + ids)
    return full[len(head) :] if full.startswith(head) else tok.decode(ids)


class StreamPrinter:
    """Prints one row's text as tokens arrive, holding back what may still become a stop string or an
    incomplete multi-byte character."""

    def __init__(self, tok: Tokenizer, prompt: list[int], stop_strings: list[str], out=sys.stdout):
        self.tok, self.prompt, self.stops, self.out = tok, prompt, stop_strings, out
        self.ids: list[int] = []
        self.printed = 0

    def _text(self) -> str:
        from mor_pretrain.generate import trim_stop

        return trim_stop(continuation(self.tok, self.prompt, self.ids), self.stops)

    def on_token(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = self._text()
        safe = len(text.rstrip("\ufffd"))
        for s in self.stops:
            for n in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:n]):
                    safe -= n
                    break
        self._write(text[: max(safe, self.printed)])

    def finish(self) -> None:
        self._write(self._text())
        print(file=self.out, flush=True)

    def _write(self, text: str) -> None:
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = max(self.printed, len(text))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="export, DCP checkpoint, run or to-hf folder")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--bos", action="store_true", help="start each prompt with the tokenizer's bos")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt at most")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = all")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling random stream")
    p.add_argument(
        "--stop", action="append", default=[], type=unescape, help='stop string, escapes allowed ("\\n\\n"); repeatable'
    )
    p.add_argument("--max-depth", type=int, default=0, help="cap on recursion steps; 0 = none")
    p.add_argument("--full-depth", action="store_true", help="every token runs every recursion step")
    p.add_argument("--threshold", type=float, default=None, help="expert-topk models: the causal routing threshold")
    p.add_argument("--engine", action="store_true", help="use the continuous depth-wise batching engine")
    p.add_argument("--slots", type=int, default=8, help="engine slots")
    p.add_argument("--device", default="auto", help="torch device; auto = cuda when available, else cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights and compute dtype")
    p.add_argument("--json", action="store_true", help="print one JSON object with every completion")
    return p.parse_args(argv)


def unescape(text: str) -> str:
    """A shell argument with Python backslash escapes (\\n, \\t, \\u00e9, \\\\) turned into characters."""
    return codecs.decode(text.encode("latin-1", "backslashreplace"), "unicode_escape")


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT or --prompts-file FILE")
    return prompts


def depth_report(gen: Generation, num_recursions: int) -> str:
    hist = gen.depth_histogram(num_recursions)
    total = max(1, sum(hist))
    parts = ", ".join(f"{d}: {n} ({100 * n / total:.1f}%)" for d, n in enumerate(hist) if d > 0 or n)
    mean = sum(d * n for d, n in enumerate(hist)) / total
    return f"depth of {sum(hist)} generated tokens (recursion steps run) {parts}; mean {mean:.2f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from mor_pretrain.evaluate import load_for_eval
    from mor_pretrain.folders import DTYPES
    from mor_pretrain.generate import DepthControl, SamplingConfig, generate, trim_stop
    from mor_pretrain.serving import DepthBatchEngine

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        prompts = read_prompts(args)
        model, tok, _ = load_for_eval(args.checkpoint, device, DTYPES[args.dtype])
        ids = [tok.encode(p, bos=args.bos) for p in prompts]
        if args.bos and any(i[0] < 0 for i in ids):
            raise ValueError("--bos: this tokenizer has no bos token")
        for n, i in enumerate(ids):
            if not i:
                raise ValueError(f"prompt {n} encodes to no tokens; add --bos")
            if len(i) >= model.args.max_seq_len:
                raise ValueError(f"prompt {n} has {len(i)} tokens; the model's max_seq_len is {model.args.max_seq_len}")
        sampling = SamplingConfig(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            eos_ids=[tok.eos_id],
            stop_strings=args.stop,
        )
        ctl = DepthControl(max_depth=args.max_depth, full_depth=args.full_depth, threshold=args.threshold)
        ctl.validate(model)  # before the prompt is echoed, so a refusal prints nothing else
        model.eval()
        stream = None
        if len(prompts) == 1 and not args.json and not args.engine:
            stream = StreamPrinter(tok, ids[0], args.stop)
        if stream is not None:
            print(prompts[0], end="", flush=True)
        start = time.perf_counter()
        if args.engine:
            longest = max(len(i) for i in ids) + args.max_new_tokens
            engine = DepthBatchEngine(
                model, args.slots, min(longest, model.args.max_seq_len), sampling, ctl, decode=tok.decode
            )
            for i in ids:
                engine.submit(i)
            gen = engine.run()
        else:
            on_token = stream.on_token if stream else None
            gen = generate(model, ids, sampling, ctl, decode=tok.decode, on_token=on_token)
        seconds = time.perf_counter() - start
    except (ValueError, OSError) as e:  # bad input, a missing or unreadable file
        print(f"error: {e}", file=sys.stderr)
        return 2
    texts = [trim_stop(continuation(tok, i, t), args.stop) for i, t in zip(ids, gen.tokens, strict=True)]
    n_tokens = sum(len(t) for t in gen.tokens)
    if args.json:
        rows = [
            {"prompt": p, "text": t, "tokens": g, "depths": d, "finish": f}
            for p, t, g, d, f in zip(prompts, texts, gen.tokens, gen.depths, gen.finish, strict=True)
        ]
        hist = gen.depth_histogram(model.args.num_recursions)
        print(json.dumps({"completions": rows, "depth_histogram": hist, "seconds": seconds}))
        return 0
    if stream is not None:
        stream.finish()
    else:
        for p, t in zip(prompts, texts, strict=True):
            print(f"{p}{t}\n---")
    print(depth_report(gen, model.args.num_recursions), file=sys.stderr)
    print(f"{n_tokens} tokens in {seconds:.2f} s ({n_tokens / seconds:.1f} tokens/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
