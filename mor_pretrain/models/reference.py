"""The full-length masked recursion: the oracle the compacted recursion of MoRModel is tested (tests/) and
timed (tools/bench_routing.py) against. Not used by training or inference.

Every recursion step runs on all positions, attention restricted to the tokens active at that step (or, with
KV sharing, to the tokens active at step 0), and only active rows take the update. It decides routing the
same way as the model but shares none of its gather/scatter code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mor_pretrain.models.mor import KV, MoRModel


def causal_key_mask(keys: torch.Tensor) -> torch.Tensor:
    """(batch, 1, T, T): query i may attend key j iff j <= i and keys[:, j]; the diagonal always, so rows
    of inactive queries (whose outputs are discarded) never become NaN."""
    t = keys.shape[1]
    eye = torch.eye(t, dtype=torch.bool, device=keys.device)
    causal = torch.ones(t, t, dtype=torch.bool, device=keys.device).tril()
    return ((causal & keys[:, None, :]) | eye).unsqueeze(1)


def masked_stack(
    model: MoRModel, h: torch.Tensor, routing: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Token choice (both routings) or expert choice with routing="causal". Returns h, aux, depth."""
    a, stack = model.args, model.stack
    b, t, _ = h.shape
    nr = a.num_recursions
    rope = model.rope[:t][None, None]
    aux: dict[str, torch.Tensor] = {}
    if a.router == "token":
        logits = stack.routers[0](h)
        probs = logits.softmax(-1) if a.router_activation == "softmax" else logits.sigmoid()
        choice = (probs.detach() + stack.depth_bias).argmax(-1)
        gate_tc = a.router_alpha * probs.gather(-1, choice.unsqueeze(-1))
        load = F.one_hot(choice, nr).float().flatten(0, 1).sum(0)
        if a.balancing == "loss":
            p = probs if a.router_activation == "softmax" else probs / probs.sum(-1, keepdim=True)
            aux["balance"] = a.balance_loss_coef * (p.flatten(0, 1).mean(0) * load / load.sum() * nr).sum()
        if a.z_loss_coef:
            aux["router_z"] = a.z_loss_coef * torch.logsumexp(logits, -1).square().mean()
    else:
        assert routing == "causal"
    active = torch.ones(b, t, dtype=torch.bool)
    depth = torch.zeros(b, t, dtype=torch.long)
    kvs0: list[KV] | None = None
    keys0 = active
    for step in range(nr):
        if a.router == "token":
            sel, gate = choice >= step, gate_tc
        else:
            lg = stack.routers[step](h)
            gate = a.router_alpha * torch.sigmoid(lg)
            decide = stack.aux_routers[step](h.detach()) if len(stack.aux_routers) else lg
            sel = active
            if a.step_capacities[step] < 1.0:
                sel = active & (torch.sigmoid(decide.squeeze(-1)) >= a.causal_threshold)
        share = a.kv_mode == "share" and step > 0
        mask = causal_key_mask(keys0 if share else sel)
        f, kvs = stack.apply_once(h, rope, mask, kvs0 if share else None)
        if step == 0:
            kvs0, keys0 = kvs, sel
        h = torch.where(sel.unsqueeze(-1), h + gate.to(h.dtype) * f, h)
        depth = depth + sel.long()
        active = sel
    return h, aux, depth


def masked_forward(
    model: MoRModel, tokens: torch.Tensor, labels: torch.Tensor, routing: str = "topk"
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(logits, loss, aux losses, depth) of the whole model with the masked recursion stack."""
    t = tokens.shape[1]
    rope = model.rope[:t][None, None]
    h = model.tok_embeddings(tokens)
    if model.first is not None:
        h, _ = model.first(h, rope)
    h, aux, depth = masked_stack(model, h, routing)
    if model.last is not None:
        h, _ = model.last(h, rope)
    logits = F.linear(model.norm(h), model.head_weight())
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten()) + sum(aux.values(), torch.zeros(()))
    return logits, loss, aux, depth
