"""Template of `configuration_mor.py`, written into every MoR transformers folder by `hf.save_hf`.

The ModelArgs fields travel as one dict (`mor`), so the folder describes the model exactly as an export does;
the usual transformers names (hidden_size, ...) are derived from it for tools that read them.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

ROUTINGS = ("causal", "topk")


class MoRConfig(PretrainedConfig):
    model_type = "mor"

    def __init__(self, mor: dict[str, Any] | None = None, routing: str = "causal", **kwargs: Any):
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        self.mor = dict(mor or {})
        # causal: per-token decisions (generation needs them); topk: the training rule, which sees the whole sequence.
        self.routing = routing
        m = self.mor
        for ours, theirs in (
            ("vocab_size", "vocab_size"),
            ("d_model", "hidden_size"),
            ("n_layers", "num_hidden_layers"),
            ("n_heads", "num_attention_heads"),
            ("n_kv_heads", "num_key_value_heads"),
            ("max_seq_len", "max_position_embeddings"),
        ):
            if ours in m:
                kwargs[theirs] = m[ours]
        # The model ties its head to the embedding itself; transformers must not tie anything.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
