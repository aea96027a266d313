"""Evaluate a checkpoint: held-out loss / perplexity and the zero- / few-shot suite.

python tools/eval.py CHECKPOINT [--tasks lambada,hellaswag,...|all] [--shots 0] [--limit N] [--batch-size 8]
                     [--val-text FILE ...] [--seq-len 512] [--out results.json] [--markdown results.md]
                     [--log-samples samples.jsonl]

CHECKPOINT: an export folder, a DCP checkpoint folder, a run folder (its export, else its latest complete
checkpoint) or a to-hf transformers folder. Expert-choice models are scored in both routing modes ("causal"
and "topk"), labelled per result.
Each accuracy comes with the sample standard error of its mean over the documents (as lm-eval). LAMBADA reports
lm-eval's acc (the last word is the greedy continuation) and perplexity (exp(-mean log-likelihood of the last
word)); its --log-samples records hold acc = that greedy flag and the loglikelihood.
By default the JSON goes to <run>/eval/<name>.json when CHECKPOINT lies in a run folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="export, DCP checkpoint, run or to-hf folder")
    p.add_argument(
        "--tasks",
        default="all",
        help="comma-separated from lambada, hellaswag, piqa, winogrande, arc_easy, arc_challenge, mmlu, val; "
        "all = the few-shot suite",
    )
    p.add_argument(
        "--shots",
        type=int,
        default=0,
        help="in-context examples (MMLU: 0..5 from its dev split; the other tasks 0, see docs)",
    )
    p.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="first N items per task (per subject for MMLU; for val, N windows spread over the text); default: all",
    )
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    p.add_argument("--val-text", nargs="*", default=[], help="held-out .txt / .jsonl files for task 'val'")
    p.add_argument("--seq-len", type=int, default=None, help="window for task 'val'; default: model max_seq_len")
    p.add_argument("--device", default="auto", help="torch device; auto = cuda when available, else cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights and compute dtype")
    p.add_argument("--out", default=None, help="JSON results file (default: <run>/eval/<name>-<shots>shot.json)")
    p.add_argument("--markdown", default=None, help="markdown table file")
    p.add_argument(
        "--log-samples",
        default=None,
        metavar="FILE",
        help="per-document records (JSON lines: choices, log-likelihoods, label, metrics) for error analysis",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    # Imported once the arguments parse: --help and usage errors answer without loading torch.
    import torch

    from mor_pretrain.evaluate import METRICS, evaluate, load_for_eval, task_source, to_markdown
    from mor_pretrain.folders import DTYPES

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    tasks = list(METRICS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    samples: list[dict] | None = [] if args.log_samples else None
    try:
        model, tok, resolved = load_for_eval(args.checkpoint, device, DTYPES[args.dtype])
        results = evaluate(
            model,
            tok,
            tasks,
            shots=args.shots,
            limit=args.limit,
            batch_size=args.batch_size,
            val_files=args.val_text,
            seq_len=args.seq_len,
            progress=not args.no_progress,
            samples=samples,
        )
    except (ValueError, OSError) as e:  # bad input, a missing or unreadable file
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = {"checkpoint": resolved, "results": results, "sources": {t: task_source(t) for t in tasks}}
    output = args.out or default_output(Path(resolved), args.shots)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {output}")
    if samples is not None:
        Path(args.log_samples).parent.mkdir(parents=True, exist_ok=True)
        Path(args.log_samples).write_text("".join(json.dumps(r) + "\n" for r in samples))
        print(f"wrote {len(samples)} document records to {args.log_samples}")
    md = to_markdown(report)
    if args.markdown:
        Path(args.markdown).write_text(md)
    print(md)
    return 0


def positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (leave it out to score every document), got {n}")
    return n


def default_output(resolved: Path, shots: int) -> str | None:
    """<run>/eval/<checkpoint name>-<shots>shot.json when the checkpoint sits in a run folder."""
    from mor_pretrain.config import RunFolder

    for run in (RunFolder(resolved.parent), RunFolder(resolved.parent.parent)):
        if run.config.is_file():
            return str(run.eval / f"{resolved.name}-{shots}shot.json")
    return None


if __name__ == "__main__":
    sys.exit(main())
