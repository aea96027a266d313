"""lm-evaluation-harness adapter: `--model mor`, scored by the project's own core (mor_pretrain.evaluate).

    mor-lm-eval --model mor --model_args pretrained=runs/mor_360m/export,routing=causal --tasks hellaswag

lm-eval (0.4.x) finds models only in its own registry: it reads no package entry points for them. So the
adapter registers itself when this module is imported (`@register_model("mor")`), and the package's
console script `mor-lm-eval` (an entry point in pyproject.toml) is lm-eval's own command line with this
module imported first; every lm-eval flag works unchanged. From Python: import this module, then
`lm_eval.simple_evaluate(model="mor", model_args=...)`.

Offline tasks: lm-eval's own suite tasks over the project's local data, in groups named <task>_local
(hellaswag_local, piqa_local, winogrande_local, arc_easy_local, arc_challenge_local, lambada_openai_local,
mmlu_continuation_local) from the configs in LOCAL_TASKS. `mor-lm-eval` adds `--include_path LOCAL_TASKS`
unless given an include path of its own; the stock `lm_eval` takes the same flag. Few-shot: MMLU takes
--num_fewshot 0..5 (its dev split, as tools/eval.py --shots), LAMBADA draws its examples from its test split as
lm-eval's does; the other tasks' source (their train split) is not local, so their samplers refuse shots
(evaluate.ShotsUnsupported), which `mor-lm-eval` prints as one `error:` line, exit status 2.

pretrained: anything tools/eval.py takes (export folder, DCP checkpoint folder, run folder). routing:
"causal" (default; per-token decisions) or "topk" (the training rule, which sees the whole sequence).
Log-likelihoods come from evaluate.encode_pair + evaluate.score_requests, exactly as tools/eval.py computes
them; generation from mor_pretrain.generate (cached, recursion-wise KV).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from mor_pretrain.evaluate import encode_pair, load_for_eval, score_requests
from mor_pretrain.folders import DTYPES
from mor_pretrain.generate import SamplingConfig, generate, trim_stop
from mor_pretrain.integrations import LOCAL_TASKS


@register_model("mor")
class MoRLM(LM):
    def __init__(
        self,
        pretrained: str,
        routing: str = "causal",
        device: str | None = None,
        dtype: str = "fp32",
        batch_size: int | str = 8,
        **kwargs: Any,
    ):
        super().__init__()
        if routing not in ("causal", "topk"):
            raise ValueError(f"routing must be 'causal' or 'topk', got {routing!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size=auto is not supported; give a number")
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"device {dev!r} asked for (lm-eval's default is cuda), but CUDA is unavailable: pass --device cpu"
            )
        self.model, self.tok, self.path = load_for_eval(pretrained, dev, DTYPES[dtype])
        self.routing, self.batch_size = routing, int(batch_size)
        self._device = torch.device(dev)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of log-probs of the continuation, whether it is the greedy one) per (context, continuation)."""
        pairs = [encode_pair(self.tok, *r.args) for r in requests]
        return score_requests(self.model, pairs, self.routing, self.batch_size, progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in disjoint windows of max_seq_len tokens after an eos prefix."""
        n = self.model.args.max_seq_len
        windows, owner = [], []
        for i, r in enumerate(requests):
            ids = self.tok.encode(r.args[0])
            for w in get_rolling_token_windows(ids, self.tok.eos_id, n, 1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        scores = score_requests(self.model, windows, self.routing, self.batch_size, progress=not disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scores, strict=True):
            totals[i] += logp
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Cached generation (causal routing) until a stop string, eos or max_gen_toks."""
        out = []
        for r in tqdm(requests, desc="generate", disable=disable_tqdm):
            context, kw = r.args
            kw = dict(kw)
            until = kw.pop("until", [])
            until = [until] if isinstance(until, str) else list(until)
            new = min(int(kw.pop("max_gen_toks", 256)), self.model.args.max_seq_len - 1)
            temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
            cfg = SamplingConfig(
                max_new_tokens=new,
                temperature=temperature,
                top_p=float(kw.pop("top_p", 1.0)),
                top_k=int(kw.pop("top_k", 0)),
                eos_ids=[self.tok.eos_id],
                stop_strings=until,
            )
            prompt = self.tok.encode(context)[-(self.model.args.max_seq_len - new) :] or [self.tok.eos_id]
            ids = generate(self.model, [prompt], cfg, decode=self.tok.decode).tokens[0]
            head = self.tok.decode(prompt)
            full = self.tok.decode(prompt + ids)
            text = full[len(head) :] if full.startswith(head) else self.tok.decode(ids)
            out.append(trim_stop(text, until))
        return out


def main() -> None:
    """`mor-lm-eval`: lm-eval's command line with `--model mor` registered (by importing this module) and the
    offline task configs included."""
    from lm_eval.__main__ import cli_evaluate

    if not any(a.startswith("--include_path") for a in sys.argv):
        sys.argv += ["--include_path", str(LOCAL_TASKS)]
    # lm-eval warns once per task that reads a custom dataset (57 lines for MMLU) about a flag we do not use.
    logging.getLogger("lm_eval.api.task").addFilter(lambda r: "Custom kwargs can be passed" not in r.getMessage())
    cli_evaluate()


def cli() -> None:
    """The `mor-lm-eval` console script: `main`, with a few-shot setting that the local tasks cannot serve
    (evaluate.ShotsUnsupported, raised by their samplers) refused in one `error:` line, exit status 2."""
    from mor_pretrain.evaluate import ShotsUnsupported

    try:
        main()
    except ShotsUnsupported as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
