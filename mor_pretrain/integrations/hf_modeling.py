"""Template of `modeling_mor.py`, written into every MoR transformers folder by `hf.save_hf`.

`MoRForCausalLM` wraps the project's own `MoRModel` (copied beside this file, imports rewritten), so the
folder needs only torch and transformers and computes exactly what the project computes:
- without a cache: `MoRModel.forward` with the configured routing (logits identical to the project's);
- with padding (attention_mask zeros, any side) or a cache: the project's cached inference path
  (`generate.forward_cached`), which places each row's real tokens at consecutive positions.

KV cache. transformers' stock caches append one set of keys/values per layer for every token; recursion-wise
caching stores, per recursion step, only the tokens that reached that step, with their positions. So the
model brings its own cache (`MoRCache`, holding the project's `ModelCache`), which `generate` threads from
step to step through the `cache` keyword. It grows by doubling up to max_seq_len and supports beam search.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from mor_pretrain.generate import KVGroup, ModelCache, forward_cached, new_cache
from mor_pretrain.integrations.hf_configuration import MoRConfig
from mor_pretrain.models.layers import rope_table
from mor_pretrain.models.mor import ModelArgs, MoRModel


class MoRCache:
    """Recursion-wise KV caches of one batch (the project's ModelCache), in the shape `generate` expects."""

    def __init__(self, inner: ModelCache):
        self.inner = inner

    def groups(self) -> list[KVGroup]:
        c = self.inner
        return [g for g in (c.first, *c.steps, c.last) if g is not None]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.inner.seen.max())

    def reserve(self, need: int, limit: int) -> None:
        """Room for `need` tokens per row in every group (a full group would turn tokens away)."""
        for g in self.groups():
            cap = g.pos.shape[1]
            if cap >= need:
                continue
            new = min(limit, max(need, 2 * cap))
            grow = new - cap
            g.k = [F.pad(t, (0, 0, 0, grow)) for t in g.k]  # (batch, kv_heads, capacity, head_dim)
            g.v = [F.pad(t, (0, 0, 0, grow)) for t in g.v]
            g.pos = F.pad(g.pos, (0, grow))

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: rows follow their beams."""
        for g in self.groups():
            g.k = [t.index_select(0, beam_idx.to(t.device)) for t in g.k]
            g.v = [t.index_select(0, beam_idx.to(t.device)) for t in g.v]
            g.pos = g.pos.index_select(0, beam_idx.to(g.pos.device))
            g.length = g.length.index_select(0, beam_idx.to(g.length.device))
        self.inner.seen = self.inner.seen.index_select(0, beam_idx.to(self.inner.seen.device))


class MoRForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MoRConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    main_input_name = "input_ids"

    def __init__(self, config: MoRConfig):
        super().__init__(config)
        self.model = MoRModel(ModelArgs(**config.mor))
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not hand us a DynamicCache: forward creates a MoRCache

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Only the RoPE table is not stored (non-persistent); weights come from the checkpoint.
        if isinstance(module, MoRModel):
            a = module.args
            with torch.no_grad():
                table = rope_table(a.head_dim, a.max_seq_len, a.rope_theta, device=module.rope.device)
                module.rope.copy_(table.to(module.rope.dtype))

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.tok_embeddings

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """input_ids, attention_mask, labels: (batch, seq). Positions follow attention_mask (position_ids
        are not used). labels are the inputs themselves (shifted here), -100 = not scored."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("MoR models take input_ids (inputs_embeds are not supported)")
        if cache is not None and not isinstance(cache, MoRCache):
            if cache.get_seq_length() != 0:
                raise TypeError(
                    f"MoR models keep recursion-wise caches (MoRCache), got a filled {type(cache).__name__}"
                )
            cache = None
        m = self.model
        valid = None if attention_mask is None else attention_mask[:, -input_ids.shape[1] :].bool()
        padded = valid is not None and not bool(valid.all())
        expert_topk = m.args.topk_routing and self.config.routing == "topk"
        if cache is None and not use_cache and not padded:
            logits = m(input_ids, routing=self.config.routing).logits
            assert logits is not None
        else:
            if expert_topk:
                raise ValueError(
                    "routing='topk' scores whole unpadded sequences and cannot use a cache; load with "
                    "routing='causal' to generate or to score padded batches"
                )
            if cache is None:
                cache = MoRCache(new_cache(m, input_ids.shape[0], min(m.args.max_seq_len, input_ids.shape[1])))
            cache.reserve(cache.get_seq_length() + input_ids.shape[1], m.args.max_seq_len)
            h, _ = forward_cached(m, cache.inner, input_ids, valid)
            logits = F.linear(h, m.head_weight())
            if not use_cache:
                cache = None
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)  # a MoRCache, not a transformers Cache
