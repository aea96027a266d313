"""Plot how a routed (MoR) model spends recursion depth over a passage of text.

python tools/plot_routing.py CHECKPOINT (--text "..." | --text-file FILE) [--routing causal|topk] [--out routing]

Writes <out>_depth.png (each token coloured by the recursion steps it ran, the text readable) and
<out>_stats.png (depth by token type, mean depth against position, router score histograms per step; an
expert-choice router trained with its BCE loss should give near-bimodal scores). Needs the `plot` extra.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch and the package load once the arguments parse: --help answers at once
    from mor_pretrain.evaluate import Tokenizer
    from mor_pretrain.models import MoRModel

TOKEN_TYPES = ("word start", "word piece", "number", "punctuation", "whitespace")


@dataclass
class Trace:
    pieces: list[str]  # decoded text of each token
    depth: np.ndarray  # (T,) recursion steps each token ran
    scores: list[np.ndarray]  # per recursion step: router scores of the tokens it scored
    num_recursions: int


def token_type(piece: str) -> str:
    """Coarse class of a decoded token, for depth-by-type histograms."""
    core = piece.strip()
    if not core:
        return "whitespace"
    if any(c.isdigit() for c in core):
        return "number"
    if not any(c.isalnum() for c in core):
        return "punctuation"
    return "word start" if piece[0].isspace() else "word piece"


def trace_routing(model: MoRModel, tok: Tokenizer, text: str, routing: str) -> Trace:
    """Run one forward pass and collect each token's depth and every router's scores."""
    import torch

    if model.args.router == "none":
        raise ValueError("the model has no router: every token runs every recursion")
    ids = tok.encode(text)[: model.args.max_seq_len]
    if not ids:
        raise ValueError("the text encodes to no tokens")
    captured: list[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda m, i, o: captured.append(o.detach())) for r in model.stack.routers]
    try:
        device = model.tok_embeddings.weight.device
        with torch.no_grad():
            out = model(torch.tensor([ids], device=device), routing=routing)  # type: ignore[arg-type]
    finally:
        for h in hooks:
            h.remove()
    assert out.depth is not None
    nr = model.args.num_recursions
    if model.args.router == "token":  # one router, one column per depth choice
        probs = captured[0][0].float()
        probs = probs.softmax(-1) if model.args.router_activation == "softmax" else probs.sigmoid()
        scores = [probs[:, d].cpu().numpy() for d in range(nr)]
    else:
        scores = [torch.sigmoid(c[0].float()).flatten().cpu().numpy() for c in captured]
        # Every position is scored; keep the candidates (the tokens that ran step r-1).
        depth = out.depth[0].cpu().numpy()
        scores = [s if r == 0 else s[depth >= r] for r, s in enumerate(scores)]
    # Decode growing prefixes: a token decoded alone loses its leading space under SentencePiece.
    texts = [tok.decode(ids[:n]) for n in range(len(ids) + 1)]
    pieces = [
        texts[n + 1][len(texts[n]) :] if texts[n + 1].startswith(texts[n]) else tok.decode([i])
        for n, i in enumerate(ids)
    ]
    return Trace(pieces, out.depth[0].cpu().numpy(), scores, nr)


def _label(piece: str) -> str:
    return piece.replace("\n", "\\n").strip() or "·"


def plot_depth_text(trace: Trace, path: str | Path, per_row: int = 14) -> Path:
    """Heatmap of depth laid out like text: one cell per token, coloured by depth, labelled with the token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(trace.pieces)
    rows = math.ceil(n / per_row)
    grid = np.full((rows, per_row), np.nan)
    grid.flat[:n] = trace.depth
    fig, ax = plt.subplots(figsize=(per_row * 0.95, rows * 0.42 + 1.0))
    cmap = plt.get_cmap("viridis", trace.num_recursions + 1)
    im = ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=trace.num_recursions + 0.5, aspect="auto")
    for i, piece in enumerate(trace.pieces):
        dark = trace.depth[i] <= trace.num_recursions / 2
        ax.text(i % per_row, i // per_row, _label(piece)[:12], ha="center", va="center", fontsize=8,
                color="white" if dark else "black")  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks(range(rows), [str(r * per_row) for r in range(rows)], fontsize=7)
    ax.set_ylabel("first token index of the row")
    cbar = fig.colorbar(im, ax=ax, ticks=range(trace.num_recursions + 1), fraction=0.03, pad=0.01)
    cbar.set_label("recursion steps run")
    ax.set_title(f"Recursion depth per token ({n} tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_stats(trace: Trace, path: str | Path, position_bins: int = 16) -> Path:
    """Depth fractions by token type, mean depth against position, and router score histograms per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nr = trace.num_recursions
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    types = [token_type(p) for p in trace.pieces]
    present = [t for t in TOKEN_TYPES if t in types]
    kinds = np.array(types)
    bottom = np.zeros(len(present))
    for d in range(nr + 1):
        frac = np.array([(trace.depth[kinds == ty] == d).mean() for ty in present])
        axes[0].bar(present, frac, bottom=bottom, label=f"depth {d}", color=plt.get_cmap("viridis", nr + 1)(d))
        bottom += frac
    counts = [types.count(t) for t in present]
    axes[0].set_xticks(range(len(present)), [f"{t}\n(n={c})" for t, c in zip(present, counts, strict=True)], fontsize=8)
    axes[0].set_ylabel("fraction of tokens")
    axes[0].set_title("Depth by token type")
    axes[0].legend(fontsize=7)

    edges = np.linspace(0, len(trace.depth), min(position_bins, len(trace.depth)) + 1).astype(int)
    means = [trace.depth[a:b].mean() for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]
    axes[1].plot(centers, means, marker="o")
    axes[1].set_ylim(0, nr + 0.2)
    axes[1].set_xlabel("token position")
    axes[1].set_ylabel("mean recursion steps")
    axes[1].set_title("Depth against position")

    bins = np.linspace(0, 1, 41)
    for step, s in enumerate(trace.scores):
        axes[2].hist(s, bins=bins, alpha=0.5, label=f"step {step} (n={len(s)})")
    axes[2].set_xlabel("router score (sigmoid / probability)")
    axes[2].set_ylabel("tokens")
    axes[2].set_title("Router scores per step")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="export, DCP checkpoint, run or to-hf folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="passage to route")
    src.add_argument("--text-file", help="file holding the passage")
    p.add_argument("--routing", choices=["causal", "topk"], default="causal", help="expert-choice routing mode")
    p.add_argument("--max-tokens", type=int, default=196, help="tokens of the passage to plot")
    p.add_argument("--out", default="routing", help="output prefix")
    args = p.parse_args(argv)
    from mor_pretrain.evaluate import load_for_eval

    try:
        model, tok, _ = load_for_eval(args.checkpoint)
        text = args.text if args.text is not None else Path(args.text_file).read_text()
        text = tok.decode(tok.encode(text)[: args.max_tokens])
        trace = trace_routing(model, tok, text, args.routing)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for out in (plot_depth_text(trace, f"{args.out}_depth.png"), plot_stats(trace, f"{args.out}_stats.png")):
        print(f"wrote {out}")
    print(f"mean depth {trace.depth.mean():.3f} over {len(trace.depth)} tokens ({args.routing})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
