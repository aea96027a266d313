"""The compacted recursion (gather the active tokens, causal attention, scatter back) equals the full-length
masked recursion of mor_pretrain/models/reference.py, and runs only the rows it routes."""

import pytest
import torch
from conftest import tiny_args, tiny_model
from torch.utils.flop_counter import FlopCounterMode

from mor_pretrain.models import MoRModel
from mor_pretrain.models.mor import bucket_size
from mor_pretrain.models.reference import masked_forward

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


FSDP_CASES = {
    "token_sigmoid": (dict(router="token"), "topk"),
    "token_softmax_share": (dict(router="token", router_activation="softmax", kv_mode="share"), "topk"),
    "causal_expert": (dict(router="expert", aux_router=True), "causal"),
    "causal_expert_share": (dict(router="expert", kv_mode="share"), "causal"),
}
FSDP_BATCH, FSDP_SEQ = 4, 32


def _fsdp_cfg(kw):
    from mor_pretrain.config import JobConfig, TrainingConfig

    return JobConfig(
        model=tiny_args(vocab_size=96, **kw),
        training=TrainingConfig(global_batch_size=FSDP_BATCH, micro_batch_size=2, seq_len=FSDP_SEQ, dtype="float32"),
    )


def _fsdp_data():
    tokens = torch.randint(0, 96, (FSDP_BATCH, FSDP_SEQ), generator=torch.Generator().manual_seed(3))
    return tokens, torch.roll(tokens, -1, 1)


def _fsdp_worker():
    """Each of 2 ranks runs its half of the batch through the FSDP2-sharded compacted model."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from mor_pretrain.parallel import build_mesh
    from mor_pretrain.trainer import Parallel, build_model, forward_backward

    rank = dist.get_rank()
    tokens, labels = (x[2 * rank : 2 * rank + 2] for x in _fsdp_data())
    out = {}
    for name, (kw, routing) in FSDP_CASES.items():
        cfg = _fsdp_cfg(kw)
        model = build_model(cfg, build_mesh(cfg.parallelism, "cpu"), torch.device("cpu"))
        res = model(tokens, labels, routing=routing)
        res.loss.backward()
        grads = {
            n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for n, p in model.named_parameters()
        }
        out[name] = {"logits": res.logits.detach(), "loss": res.loss.item(), "depth": res.depth, "grads": grads}
    # The trainer trains the auxiliary router on its side loss but keeps that out of the compared losses.
    cfg = _fsdp_cfg(dict(router="expert", aux_router=True))
    mesh = build_mesh(cfg.parallelism, "cpu")
    model = build_model(cfg, mesh, torch.device("cpu"))
    par = Parallel(torch.device("cpu"), mesh, rank, 2, 1)
    losses = forward_backward(model, [{"input": tokens, "labels": labels}], par, FSDP_BATCH)
    aux_grad = [p.grad.full_tensor().abs().sum().item() for p in model.stack.aux_routers.parameters()]
    out["trainer"] = {"aux": sorted(losses.aux), "stats": sorted(losses.stats), "aux_router_grad": aux_grad}
    return out


@pytest.mark.distributed
@pytest.mark.slow  # two spawned ranks, four models: about 25 s
def test_fsdp_two_ranks_equal_masked_path(tmp_path):
    """Under FSDP2 on 2 ranks (each with its own compacted lengths) the outputs and losses equal the
    masked path on that rank's sequences, and the averaged gradients equal the masked path's."""
    from test_parallel import spawn

    results = spawn(2, tmp_path, _fsdp_worker)
    trainer = results[0]["trainer"]
    assert "aux_router_bce" not in trainer["aux"] and "aux_router_bce" in trainer["stats"]
    assert all(g > 0 for g in trainer["aux_router_grad"])
    tokens, labels = _fsdp_data()
    for name, (kw, routing) in FSDP_CASES.items():
        cfg = _fsdp_cfg(kw)
        torch.manual_seed(cfg.training.seed)
        model = MoRModel(cfg.model)
        model.init_weights()
        grads = []
        for rank in range(2):
            sl = slice(2 * rank, 2 * rank + 2)
            logits, loss, _, depth = masked_forward(model, tokens[sl], labels[sl], routing)
            got = results[rank][name]
            assert torch.equal(got["depth"], depth), name
            torch.testing.assert_close(got["logits"], logits, rtol=1e-5, atol=1e-5, msg=name)
            assert got["loss"] == pytest.approx(loss.item(), abs=1e-6), name
            grads.append(
                dict(
                    zip(
                        [n for n, _ in model.named_parameters()],
                        torch.autograd.grad(loss, list(model.parameters()), allow_unused=True),
                        strict=True,
                    )
                )
            )
        for n, _ in model.named_parameters():
            if grads[0][n] is None:
                continue
            want = (grads[0][n] + grads[1][n]) / 2
            for rank in range(2):
                torch.testing.assert_close(
                    results[rank][name]["grads"][n], want, rtol=1e-4, atol=1e-6, msg=f"{name}: {n}"
                )


@pytest.mark.parametrize("router,routing", [("token", "topk"), ("expert", "causal")])
def test_compiled_blocks_see_at_most_one_graph_per_bucket(router, routing):
    """Regionally compiled blocks (as parallel.apply_compile does) over 50 random batches: the graphs
    compiled never outnumber the distinct compacted lengths (buckets) the blocks were called with."""
    torch._dynamo.reset()
    model = tiny_model(router=router, causal_threshold=0.5)
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    lengths = set()
    apply_once = model.stack.apply_once

    def recording(x, *args):
        lengths.add(x.shape[1])
        return apply_once(x, *args)

    model.stack.apply_once = recording
    for blk in [model.first, *model.stack.layers, model.last]:
        blk.compile(backend=count, fullgraph=True)
    t = 64
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _ in range(50):
            model(torch.randint(0, 97, (4, t), generator=g), routing=routing)
    torch._dynamo.reset()
    assert len(lengths) > 3  # the batches really vary the compacted lengths
    assert lengths <= {bucket_size(n, t) for n in range(t + 1)}
    assert 0 < len(graphs) <= len(lengths)
