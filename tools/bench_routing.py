"""Step time of compacted routing (token choice, causal expert evaluation) against the full-length masked
recursion it replaced, beside the fixed-depth recursive model and top-k MoR of the same shape.

python tools/bench_routing.py [--seq-len 256 --batch 4 --repeats 7] [--json]

Random weights, one process. "masked" is the pre-compaction algorithm, kept as the tests' oracle in
mor_pretrain/models/reference.py: every step runs all positions under a key mask. Training rows time forward +
backward of the LM loss plus auxiliary losses; evaluation rows time a no-grad forward. Each number is the
median of --repeats timings after one warm-up, in process CPU time (run with OMP_NUM_THREADS=1) so other
jobs on a shared machine do not skew the ratios; all ratios come from one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mor_pretrain.models import MoRModel


def build(router: str, seq_len: int, **kw) -> MoRModel:
    import torch

    from mor_pretrain.models import ModelArgs, MoRModel

    args = ModelArgs(
        vocab_size=4096, d_model=192, n_heads=3, n_kv_heads=1, d_ffn=512, n_layers=8, num_recursions=3,
        max_seq_len=seq_len, router=router, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MoRModel(args)
    model.init_weights()
    return model


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    import torch  # after parsing: --help loads no torch

    from mor_pretrain.models.reference import masked_forward

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 4096, (a.batch, a.seq_len), generator=g)
    labels = torch.roll(tokens, -1, 1)
    rec, topk = build("none", a.seq_len), build("expert", a.seq_len)
    token = build("token", a.seq_len, router_activation="softmax", router_alpha=1.0)

    def train(model: MoRModel, masked: bool = False) -> Callable[[], object]:
        def step() -> None:
            loss = masked_forward(model, tokens, labels)[1] if masked else model(tokens, labels).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        return step

    def evaluate(model: MoRModel, routing: str, masked: bool = False) -> Callable[[], object]:
        @torch.no_grad()
        def step() -> None:
            if masked:
                masked_forward(model, tokens, labels, routing)
            else:
                model(tokens, labels, routing=routing)  # type: ignore[arg-type]

        return step

    def share(model: MoRModel, routing: str) -> float:
        with torch.no_grad():
            depth = model(tokens, routing=routing).depth
        assert depth is not None
        return float(depth.float().mean()) / model.args.num_recursions

    rows = {
        "train: recursive": (timed(train(rec), a.repeats), 1.0),
        "train: MoR expert top-k": (timed(train(topk), a.repeats), share(topk, "topk")),
        "train: token choice, masked (before)": (timed(train(token, masked=True), a.repeats), share(token, "topk")),
        "train: token choice, compacted (after)": (timed(train(token), a.repeats), share(token, "topk")),
        "eval: recursive": (timed(evaluate(rec, "topk"), a.repeats), 1.0),
        "eval: MoR expert top-k": (timed(evaluate(topk, "topk"), a.repeats), share(topk, "topk")),
        "eval: causal expert, masked (before)": (
            timed(evaluate(topk, "causal", masked=True), a.repeats),
            share(topk, "causal"),
        ),
        "eval: causal expert, compacted (after)": (timed(evaluate(topk, "causal"), a.repeats), share(topk, "causal")),
    }
    base = {"train": rows["train: recursive"][0], "eval": rows["eval: recursive"][0]}
    out = {
        name: {"seconds": s, "vs_recursive": s / base[name.split(":")[0]], "active_step_share": act}
        for name, (s, act) in rows.items()
    }
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"torch {torch.__version__}, batch {a.batch} x {a.seq_len} tokens, {torch.get_num_threads()} thread(s)")
    print("| path | step time (s) | vs recursive | active share of step-rows |\n|---|---|---|---|")
    for name, r in out.items():
        print(f"| {name} | {r['seconds']:.3f} | {r['vs_recursive']:.2f} | {r['active_step_share']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
