"""The compacted recursion (gather the active tokens, causal attention, scatter back) equals the full-length
masked recursion of tests/masked_reference.py, and runs only the rows it routes."""

import pytest
import torch
from conftest import tiny_model
from masked_reference import masked_forward
from torch.utils.flop_counter import FlopCounterMode

from mor_pretrain.models.mor import bucket_size

TOKEN = {
    "softmax_loss": dict(router_activation="softmax", router_alpha=1.0, z_loss_coef=1e-5),
    "sigmoid_loss": dict(router_activation="sigmoid"),
    "softmax_lossfree": dict(router_activation="softmax", router_alpha=1.0, balancing="loss_free"),
    "sigmoid_lossfree": dict(router_activation="sigmoid", balancing="loss_free"),
}


def _check(model, tokens, routing):
    labels = torch.roll(tokens, -1, 1)
    out = model(tokens, labels, routing=routing)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    logits, loss, aux, depth = masked_forward(model, tokens, labels, routing)
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert torch.equal(out.depth, depth)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, loss, rtol=1e-6, atol=1e-6)
    assert set(out.aux_losses) == set(aux)
    for k, v in aux.items():
        torch.testing.assert_close(out.aux_losses[k], v, rtol=1e-6, atol=1e-7)
    assert set(got) == set(want)
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-6, msg=n)
    return out


@pytest.mark.parametrize("kv_mode", ["recursion", "share"])
@pytest.mark.parametrize("kind", list(TOKEN))
def test_token_choice_equals_masked_path(kind, kv_mode):
    model = tiny_model(router="token", kv_mode=kv_mode, **TOKEN[kind])
    if model.args.balancing == "loss_free":
        model.stack.depth_bias.copy_(torch.tensor([2e-3, -1e-3, 0.0]))
    out = _check(model, torch.randint(0, 97, (3, 40)), "topk")
    assert (out.depth > 1).any() and (out.depth < 3).any()  # deeper steps run part of the tokens


@pytest.mark.parametrize("kv_mode", ["recursion", "share"])
@pytest.mark.parametrize(
    "case,threshold,shape,kw",
    [
        ("mixed", 0.5, (3, 40), {}),
        ("aux_router", 0.5, (3, 40), dict(aux_router=True)),
        ("step0_thresholded", 0.5, (3, 40), dict(capacities=[0.75, 0.5, 0.25])),
        ("nothing_continues", 0.99, (3, 40), {}),
        ("nothing_active", 0.99, (2, 24), dict(capacities=[0.75, 0.5, 0.25])),
        ("everything_active", 0.01, (3, 40), {}),
        ("batch_1", 0.5, (1, 40), {}),
        ("T_below_Nr", 0.5, (2, 2), {}),
    ],
)
def test_causal_expert_equals_masked_path(case, threshold, shape, kw, kv_mode):
    model = tiny_model(router="expert", kv_mode=kv_mode, causal_threshold=threshold, **kw)
    out = _check(model, torch.randint(0, 97, shape), "causal")
    if case == "everything_active":
        assert (out.depth == 3).all()
    if case == "nothing_active":
        assert (out.depth == 0).all()


def _linear_flops(model, tokens, routing):
    with FlopCounterMode(display=False) as fc:
        model(tokens, routing=routing)
    return fc.get_flop_counts()["Global"][torch.ops.aten.mm]


@pytest.mark.parametrize("router,routing", [("token", "topk"), ("expert", "causal")])
def test_linear_flops_follow_the_routed_rows(router, routing):
    """Linear FLOPs of the shared layers = the compacted rows each step runs: the active share of the
    recursive model's, up to the bucket rounding."""
    model = tiny_model(router=router, causal_threshold=0.5)
    a = model.args
    b, t = 4, 48
    tokens = torch.randint(0, 97, (b, t))
    depth = model(tokens, routing=routing).depth
    # Rows run per step: everybody at step 0, else the bucket of the busiest sequence, for every sequence.
    rows = [b * t] + [b * bucket_size(int((depth > r).sum(1).max()), t) for r in range(1, a.num_recursions)]
    active = [int((depth > r).sum()) for r in range(a.num_recursions)]
    per_row = (
        2
        * a.num_shared
        * (2 * a.d_model * a.d_model + 2 * a.d_model * a.n_kv_heads * a.head_dim + 3 * a.d_model * a.d_ffn)
    )
    rec = tiny_model(router="none")
    fixed = _linear_flops(rec, tokens, "topk") - a.num_recursions * b * t * per_row  # edges, head
    routers = 2 * b * t * a.d_model * a.num_recursions  # Nr scores per token, either router kind
    got = _linear_flops(model, tokens, routing) - fixed - routers
    assert got == sum(rows) * per_row
    # Padding: up to the busiest sequence, plus less than one bucket unit (t / 16) per sequence and step.
    busiest = [b * int((depth > r).sum(1).max()) for r in range(a.num_recursions)]
    assert sum(active) <= sum(busiest) <= sum(rows) < sum(busiest) + (a.num_recursions - 1) * b * -(-t // 16)
    assert sum(rows) < a.num_recursions * b * t  # fewer rows than the recursive model runs
