"""Peak memory and time of one training forward + backward, the LM loss sliced against whole.

    python tools/bench_lm_loss.py [--tokens 8192] [--vocab 32768] [--dim 256]

Each variant runs in a fresh process (peak RSS is per process) on the CPU: a 4-layer model of width --dim,
one micro-batch of --tokens tokens. "whole" sets models.mor.LOGITS_CHUNK_ELEMENTS above the micro-batch's
logits, "sliced" keeps the default. Prints a markdown row per variant.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, time, torch
import mor_pretrain.models.mor as mor
from mor_pretrain.models import ModelArgs, MoRModel
tokens, vocab, dim, whole = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "whole"
if whole:
    mor.LOGITS_CHUNK_ELEMENTS = 2 * tokens * vocab
torch.manual_seed(0)
args = ModelArgs(vocab_size=vocab, d_model=dim, n_layers=4, n_heads=4, n_kv_heads=2, d_ffn=2 * dim, max_seq_len=512)
model = MoRModel(args)
model.init_weights()
x = torch.randint(0, vocab, (tokens // 512, 512))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
out = model(x, x, return_logits=False)
out.loss.backward()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"loss": out.loss.item(), "seconds": seconds, "step_peak_mib": (peak - before) / 1024}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="tokens in the micro-batch (a multiple of 512)")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--dim", type=int, default=256)
    args = p.parse_args(argv)
    gib = args.tokens * args.vocab * 4 / 2**30
    print(f"{args.tokens} tokens x vocab {args.vocab}: whole fp32 logits {gib:.2f} GiB")
    print("| variant | step peak RSS above the model (MiB) | forward + backward (s) | loss |")
    print("|---|---|---|---|")
    for variant in ("whole", "sliced"):
        cmd = [sys.executable, "-c", CHILD, str(args.tokens), str(args.vocab), str(args.dim), variant]
        out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        print(f"| {variant} | {out['step_peak_mib']:,.0f} | {out['seconds']:.2f} | {out['loss']:.6f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
