import pytest
import torch
from conftest import spread_thresholds, tiny_args, tiny_model

from mor_pretrain.models import ModelArgs, MoRModel
from mor_pretrain.models.reference import causal_key_mask

VARIANTS = {
    "vanilla": dict(num_recursions=1, sharing="cycle", n_layers=4),
    "recursive": dict(router="none"),
    "recursive_share": dict(router="none", kv_mode="share"),
    "expert": dict(router="expert"),
    "expert_share": dict(router="expert", kv_mode="share"),
    "expert_aux": dict(router="expert", aux_router=True, z_loss_coef=1e-3),
    "expert_mlp": dict(router="expert", router_arch="mlp"),
    "token_softmax": dict(router="token", router_activation="softmax", router_alpha=1.0, z_loss_coef=1e-5),
    "token_sigmoid_lossfree": dict(router="token", balancing="loss_free"),
    "token_share": dict(router="token", kv_mode="share"),
    "expert_threshold": dict(router="expert", expert_rule="threshold"),
    "recursive_gate": dict(router="none", recursion_gate=0.3),
    "expert_random": dict(router="expert", expert_rule="random"),
    "recursive_eps": dict(router="none", residual_scale=1 / 3),
}


@pytest.mark.parametrize(
    "sharing,expected",
    [
        ("cycle", [0, 1, 2, 0, 1, 2, 0, 1, 2]),
        ("sequence", [0, 0, 0, 1, 1, 1, 2, 2, 2]),
    ],
)
def test_sharing_maps_match_paper_examples(sharing, expected):
    assert ModelArgs(n_layers=9, num_recursions=3, sharing=sharing).layer_map() == expected


def test_middle_sharing_maps():
    # L=8, Nr=3: first, 2 shared layers x 3, last.
    assert ModelArgs(n_layers=8, num_recursions=3, sharing="middle_cycle").layer_map() == [0, 1, 2, 1, 2, 1, 2, 3]
    assert ModelArgs(n_layers=8, num_recursions=3, sharing="middle_sequence").layer_map() == [0, 1, 1, 1, 2, 2, 2, 3]


@pytest.mark.parametrize("sharing", ["cycle", "sequence", "middle_cycle", "middle_sequence"])
def test_shared_stack_is_one_module_applied_nr_times(sharing):
    n_layers = 8 if sharing.startswith("middle") else 9
    model = tiny_model(sharing=sharing, n_layers=n_layers)
    a = model.args
    # Unique parameters only: no tensor registered twice.
    assert len(list(model.parameters())) == len(list(model.named_parameters(remove_duplicate=False)))
    per_block = sum(p.numel() for p in model.stack.layers[0].parameters())
    n_unique_blocks = a.num_shared + (2 if a.middle else 0)
    expected = per_block * n_unique_blocks + a.vocab_size * a.d_model + a.d_model
    assert model.num_params() == expected
    # Every application of a shared layer uses the very same weight tensor.
    seen: list[list[int]] = [[] for _ in model.stack.layers]
    hooks = [
        layer.register_forward_hook(lambda m, i, o, j=j: seen[j].append(m.attention.wq.weight.data_ptr()))
        for j, layer in enumerate(model.stack.layers)
    ]
    model(torch.randint(0, a.vocab_size, (2, 16)))
    for h in hooks:
        h.remove()
    for calls, layer in zip(seen, model.stack.layers, strict=True):
        assert calls == [layer.attention.wq.weight.data_ptr()] * a.num_recursions
    # The applied-layer map covers every unique layer, each used Nr times inside the stack.
    lm = a.layer_map()
    assert len(lm) == a.n_layers
    inner = lm[1:-1] if a.middle else lm
    assert sorted(set(inner)) == sorted(set(inner)) and all(inner.count(u) == a.num_recursions for u in set(inner))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gradients_reach_every_parameter(name):
    model = tiny_model(**VARIANTS[name])
    x = torch.randint(0, model.args.vocab_size, (2, 24))
    out = model(x, x)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert torch.isfinite(out.loss)


CAUSAL = [
    ("vanilla", "topk"),
    ("recursive", "topk"),
    ("recursive_share", "topk"),
    ("expert", "causal"),
    ("expert_share", "causal"),
    ("expert_aux", "causal"),
    ("token_softmax", "topk"),
    ("token_share", "topk"),
    ("expert_threshold", "topk"),  # learned thresholds: causal in training's mode too
    ("recursive_gate", "topk"),
    ("expert_random", "causal"),  # the same draws in every forward (seeded below): each position's own
    ("recursive_eps", "topk"),
]


@pytest.mark.parametrize("name,routing", CAUSAL)
def test_changing_a_future_token_never_changes_past_logits(name, routing):
    model = tiny_model(**VARIANTS[name])
    # Lower the expert threshold so both decisions occur in a random model.
    model.args.causal_threshold = 0.5
    torch.manual_seed(1)
    x = torch.randint(0, model.args.vocab_size, (3, 32))
    torch.manual_seed(2)  # random routing draws its scores from here: the same ones in every forward
    base = model(x, routing=routing).logits
    for t in (5, 17, 30):
        y = x.clone()
        y[:, t + 1] = (y[:, t + 1] + 1 + torch.arange(3)) % model.args.vocab_size
        torch.manual_seed(2)
        out = model(y, routing=routing).logits
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_expert_topk_mode_is_not_causal():
    model = tiny_model(**VARIANTS["expert"])
    x = torch.randint(0, model.args.vocab_size, (4, 32))
    base = model(x)
    leaked = False
    for t in range(8, 31, 3):
        y = x.clone()
        y[:, t + 1 :] = torch.randint(0, model.args.vocab_size, y[:, t + 1 :].shape)
        out = model(y)
        if not torch.allclose(out.logits[:, : t + 1], base.logits[:, : t + 1], atol=1e-6):
            leaked = True
            break
    assert leaked, "top-k over the whole sequence should let future tokens change past routing"


@pytest.mark.parametrize("caps,t", [([1.0, 2 / 3, 1 / 3], 30), ([1.0, 0.5, 0.25], 32), ([0.75, 0.5, 0.5], 20)])
def test_expert_selects_exact_token_counts(caps, t):
    model = tiny_model(router="expert", capacities=caps)
    b = 3
    out = model(torch.randint(0, 97, (b, t)))
    ks = [max(1, round(c * t)) for c in caps]  # every c * t here is a whole number of tokens
    depth = out.depth
    for r, k in enumerate(ks):
        assert ((depth > r).sum(dim=1) == k).all()
    # Top-k's depths are its capacities: no depth statistics to log. Causal routing's are reported.
    assert "tokens_per_depth" not in out.stats and "mean_depth" not in out.stats
    causal = model(torch.randint(0, 97, (b, t)), routing="causal")
    counts = torch.bincount(causal.depth.flatten(), minlength=4).tolist()
    assert causal.stats["tokens_per_depth"].tolist() == counts and sum(counts) == b * t


def _gated_recursive_reference(model, x):
    """Plain recursion over the full sequence with the expert gate: what capacities of 1 must equal."""
    a = model.args
    t = x.shape[1]
    rope = model.rope[:t][None, None]
    h, _ = model.first(model.tok_embeddings(x), rope)
    for step in range(a.num_recursions):
        g = a.router_alpha * torch.sigmoid(model.stack.routers[step](h))
        f, _ = model.stack.apply_once(h, rope, None)
        h = h + g * f
    h, _ = model.last(h, rope)
    return torch.nn.functional.linear(model.norm(h), model.head_weight())


@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_capacity_one_equals_recursive_baseline(routing):
    model = tiny_model(router="expert", capacities=[1.0, 1.0, 1.0])
    x = torch.randint(0, 97, (2, 24))
    ref = _gated_recursive_reference(model, x)
    torch.testing.assert_close(model(x, routing=routing).logits, ref, rtol=1e-5, atol=1e-5)
    # And the same shared weights in a router-free recursive model run the same stack without gates.
    rec = MoRModel(tiny_args(router="none"))
    missing, unexpected = rec.load_state_dict(model.state_dict(), strict=False)
    assert missing == [] and all("routers" in k for k in unexpected)
    assert rec(x).logits.shape == ref.shape


def test_expert_compacted_attention_matches_masked_full_sequence():
    """Top-k gather + causal attention over the compacted tokens at original RoPE positions equals running
    every token with attention restricted to the selected ones, when the selection is the same."""
    model = tiny_model(router="expert")
    x = torch.randint(0, 97, (2, 30))
    out = model(x)
    a = model.args
    rope = model.rope[:30][None, None]
    h, _ = model.first(model.tok_embeddings(x), rope)
    for step in range(a.num_recursions):
        sel = out.depth > step
        g = a.router_alpha * torch.sigmoid(model.stack.routers[step](h))
        f, _ = model.stack.apply_once(h, rope, causal_key_mask(sel))
        h = torch.where(sel.unsqueeze(-1), h + g * f, h)
    h, _ = model.last(h, rope)
    ref = torch.nn.functional.linear(model.norm(h), model.head_weight())
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)


def test_kv_share_reuses_step0_keys_and_skips_projections():
    model = tiny_model(router="expert", kv_mode="share")
    calls = []
    for layer in model.stack.layers:
        layer.attention.wk.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    model(torch.randint(0, 97, (2, 30)))
    # K projections run once per shared layer (step 0 only), on the full sequence.
    assert calls == [30] * model.args.num_shared


def test_causal_mode_reports_topk_agreement_and_threshold_moves_depth():
    model = tiny_model(router="expert")
    x = torch.randint(0, 97, (2, 32))
    lo = model(x, routing="causal")
    assert 0.0 <= lo.stats["topk_agreement"].item() <= 1.0
    model.args.causal_threshold = 0.01
    deep = model(x, routing="causal").depth
    model.args.causal_threshold = 0.99
    shallow = model(x, routing="causal").depth
    assert (deep == 3).all() and (shallow == 1).all()


def test_token_choice_loss_free_bias_update_and_maxvio():
    model = tiny_model(router="token", balancing="loss_free")
    out = model(torch.randint(0, 97, (2, 32)))
    load = out.stats["tc_load"]
    assert load.sum() == 64 and "balance" not in out.aux_losses
    assert out.stats["maxvio"] == pytest.approx((load.max() / load.mean() - 1).item())
    model.update_routing({"tc_load": torch.tensor([10.0, 0.0, 2.0])}, 1)
    assert model.stack.depth_bias.tolist() == pytest.approx([-1e-3, 1e-3, 1e-3])
    assert "stack.depth_bias" in model.state_dict()


def test_ignore_index_excludes_padding_from_loss():
    model = tiny_model(router="expert")
    x = torch.randint(0, 97, (2, 16))
    labels = x.clone()
    labels[:, 8:] = -100
    full = model(x, labels)
    logits = full.logits[:, :8].flatten(0, 1)
    torch.testing.assert_close(full.lm_loss, torch.nn.functional.cross_entropy(logits, x[:, :8].flatten()))


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(n_heads=5), "n_heads"),
        (dict(n_kv_heads=3), "n_kv_heads"),
        (dict(n_layers=9), "n_layers"),
        (dict(router="expert", capacities=[1.0, 0.5, 0.75]), "capacities"),
        (dict(router="expert", capacities=[1.0, 0.5]), "capacities"),
        (dict(router="expert", sharing="middle_sequence"), "sharing"),
        (dict(router="token", num_recursions=1, n_layers=4, sharing="cycle"), "router"),
        (dict(expert_rule="threshold"), "expert_rule"),
        (dict(router="expert", expert_rule="threshold", aux_router=True), "aux_router"),
        (dict(router="expert", expert_rule="threshold", threshold_rate=0.0), "threshold_rate"),
        (dict(router="expert", recursion_gate=0.1), "recursion_gate"),
        (dict(recursion_gate=-0.1), "recursion_gate"),
        (dict(router="expert", expert_rule="random", aux_router=True), "aux_router"),
        (dict(router="expert", residual_scale=0.5), "residual_scale"),
        (dict(residual_scale=1.5), "residual_scale"),
        (dict(recursion_gate=0.1, residual_scale=0.5), "residual_scale"),
    ],
)
def test_bad_model_args_name_the_key(kw, key):
    with pytest.raises(ValueError, match=f"model.{key}"):
        MoRModel(tiny_args(**kw))


def test_capacity_rounding_keeps_decimal_capacities_and_the_paper_default():
    user = ModelArgs(router="expert", num_recursions=3, n_layers=8, capacities=[1.0, 0.58, 0.29])
    assert user.tokens_per_step(100) == [100, 58, 29]
    paper = ModelArgs(router="expert", num_recursions=3, n_layers=8)
    assert paper.tokens_per_step(2048) == [2048, 1365, 682]
    model = tiny_model(router="expert", capacities=[1.0, 0.58, 0.29], max_seq_len=100)
    depth = model(torch.randint(0, 97, (2, 100))).depth
    assert [int((depth > r).sum()) for r in range(3)] == [200, 116, 58]


def test_aux_router_bce_is_a_weighted_side_loss():
    model = tiny_model(router="expert", aux_router=True, aux_router_coef=0.5)
    x = torch.randint(0, 97, (2, 30))
    out = model(x, x)
    assert "aux_router_bce" not in out.aux_losses  # out of every total compared across configs
    # Independent reference: BCE of the aux routers on the detached step inputs vs the top-k choice.
    captured = []
    hooks = [r.register_forward_hook(lambda m, i, o: captured.append(o.squeeze(-1))) for r in model.stack.aux_routers]
    out = model(x, x)
    for h in hooks:
        h.remove()
    want = sum(
        torch.nn.functional.binary_cross_entropy_with_logits(
            lg[out.depth >= r], (out.depth > r)[out.depth >= r].float()
        )
        for r, lg in enumerate(captured)
    )
    torch.testing.assert_close(out.side_losses["aux_router_bce"], 0.5 * want)
    torch.testing.assert_close(out.loss, out.lm_loss + sum(out.aux_losses.values()) + 0.5 * want)


def test_sigmoid_balance_term_does_not_push_every_gate_down():
    """With raw sigmoid scores every term of sum_i P_i f_i grows with its logits, so the loss lowers all of
    them together; normalized over the depths, a common shift of the logits changes it (almost) not at all."""
    model = tiny_model(router="token", router_activation="sigmoid")
    shift = torch.zeros((), requires_grad=True)
    hook = model.stack.routers[0].register_forward_hook(lambda m, i, o: o + shift)
    x = torch.randint(0, 97, (4, 32))
    balance = model(x, x).aux_losses["balance"]
    hook.remove()
    (grad,) = torch.autograd.grad(balance, shift)
    assert abs(grad.item()) < 1e-3 * model.args.balance_loss_coef


@pytest.mark.parametrize("kind", [dict(router="expert"), dict(num_recursions=1, sharing="cycle", tie_embeddings=False)])
def test_sliced_lm_loss_and_gradients_equal_the_whole_head(monkeypatch, kind):
    """Training's LM head and cross-entropy in slices (recomputed in backward) give the loss and gradients
    of the whole-micro-batch computation, with ignored labels and a last slice shorter than the others."""
    import mor_pretrain.models.mor as mor

    model = tiny_model(**kind)
    x = torch.randint(0, 97, (3, 20))
    labels = torch.randint(0, 97, (3, 20))
    labels[0, :7] = -100
    whole = model(x, labels, return_logits=True)  # logits wanted: never sliced
    whole.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setattr(mor, "LOGITS_CHUNK_ELEMENTS", 97 * 7)  # slices of 7 tokens: 9 slices of 60 tokens
    calls = []
    real = mor._summed_ce
    monkeypatch.setattr(mor, "_summed_ce", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    sliced = model(x, labels, return_logits=False)
    sliced.loss.backward()
    assert calls[:9] == [7] * 8 + [4] and len(calls) == 18  # forward, then each slice again in backward
    torch.testing.assert_close(sliced.lm_loss, whole.lm_loss, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-7, msg=n)


def _step_logits(model, monkeypatch) -> dict[int, torch.Tensor]:
    """Record the router logits of every recursion step of the next forward."""
    seen: dict[int, torch.Tensor] = {}
    original = model.stack.expert_logits

    def spy(h, step, aux=False):
        out = original(h, step, aux)
        seen[step] = out.detach()
        return out

    monkeypatch.setattr(model.stack, "expert_logits", spy)
    return seen


def test_expert_threshold_routes_by_its_thresholds_in_both_modes_and_sums_the_kth_scores(monkeypatch):
    model = tiny_model(router="expert", expert_rule="threshold", init_std=0.1)
    x = torch.randint(0, 97, (3, 30))
    spread_thresholds(model, x)
    model.stack.expert_threshold[0] = 0.99  # step 0 has capacity 1: ignored
    tau = model.stack.expert_threshold.tolist()
    seen = _step_logits(model, monkeypatch)
    train = model(x, x)
    scores = {r: torch.sigmoid(v) for r, v in seen.items()}
    causal = model(x, routing="causal")
    torch.testing.assert_close(train.logits, causal.logits, rtol=0, atol=0)
    assert torch.equal(train.depth, causal.depth)
    # Hierarchical thresholding by the buffer's values, not by model.causal_threshold or top-k.
    expect = torch.ones_like(train.depth)
    go = torch.ones_like(x, dtype=torch.bool)
    for r in (1, 2):
        go = go & (scores[r] >= tau[r])
        expect += go.long()
    assert torch.equal(train.depth, expect)
    assert set(expect.unique().tolist()) == {1, 2, 3}
    # The trainer's threshold target: per sequence, the k-th largest score among the step's candidates.
    ks = model.args.tokens_per_step(30)
    sums = train.router_sums["threshold_sums"]
    assert sums[0] == 0
    for r in (1, 2):
        cand = train.depth >= r
        kth = scores[r].masked_fill(~cand, 0.0).topk(ks[r], dim=1).values[:, -1]
        torch.testing.assert_close(sums[r], kth.sum())
    assert "router_bce" in train.aux_losses and "threshold_sums" not in causal.router_sums


def test_expert_threshold_update_is_a_running_mean_then_an_ema():
    model = tiny_model(router="expert", expert_rule="threshold", threshold_rate=0.25)
    stack = model.stack
    model.update_routing({"threshold_sums": torch.tensor([0.0, 1.6, 0.8])}, 2)  # the first update replaces
    assert stack.expert_threshold.tolist() == pytest.approx([0.0, 0.8, 0.4])
    model.update_routing({"threshold_sums": torch.tensor([0.0, 0.4, 0.4])}, 1)  # then 1/2, 1/3, ... >= rate
    assert stack.expert_threshold.tolist() == pytest.approx([0.0, 0.6, 0.4])
    for _ in range(3):
        model.update_routing({"threshold_sums": torch.tensor([0.0, 1.0, 0.0])}, 1)
    assert stack.threshold_updates.item() == 5
    # rates 1/3, then 0.25 twice: 0.6 -> 0.7333 -> 0.8 -> 0.85
    assert stack.expert_threshold[1].item() == pytest.approx(0.85)
    assert set(model.state_dict()) >= {"stack.expert_threshold", "stack.threshold_updates"}
    assert "stack.expert_threshold" not in tiny_model(router="expert").state_dict()


def test_expert_threshold_step_that_nobody_reaches_keeps_the_loss_finite():
    model = tiny_model(router="expert", expert_rule="threshold")
    model.stack.expert_threshold.copy_(torch.tensor([0.5, 1.01, 1.01]))
    x = torch.randint(0, 97, (2, 16))
    out = model(x, x)
    out.loss.backward()
    assert (out.depth == 1).all() and torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert out.stats["score_selected"] < out.stats["score_unselected"]  # step 1 selected nobody: its sum is 0


def logits_by_hand(model, x, update):
    """The fixed-depth model's logits with each recursion step written out: h <- update(h, f(h))."""
    r = model.rope[: x.shape[1]][None, None]
    h, _ = model.first(model.tok_embeddings(x), r)
    for _ in range(model.args.num_recursions):
        f, _ = model.stack.apply_once(h, r, None)
        h = update(h, f)
    h, _ = model.last(h, r)
    return torch.nn.functional.linear(model.norm(h), model.head_weight())


def test_recursion_gate_is_mors_update_with_a_constant_gate():
    model = tiny_model(router="none", recursion_gate=0.3)
    x = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(model(x).logits, logits_by_hand(model, x, lambda h, f: h + 0.3 * f))
    assert model.stack.gated and not tiny_model(router="none").stack.gated
    assert not model.args.llama_equivalent


def test_residual_scale_scales_the_stacks_residual_branch():
    model = tiny_model(router="none", residual_scale=0.25)
    x = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(model(x).logits, logits_by_hand(model, x, lambda h, f: h + 0.25 * (f - h)))
    assert not model.stack.gated and not model.args.llama_equivalent
    # eps = 1 is the plain recursion, h <- f(h).
    plain, one = tiny_model(router="none"), tiny_model(router="none", residual_scale=1.0)
    torch.testing.assert_close(one(x).logits, plain(x).logits)


def test_random_expert_choice_routes_by_fresh_uniform_scores_with_the_same_capacities():
    model = tiny_model(router="expert", expert_rule="random", capacities=[1.0, 0.5, 0.25])
    assert len(model.stack.routers) == 0 and model.args.router_kind == "expert-random"
    assert model.num_params() == tiny_model(router="none").num_params()  # no router weights
    x = torch.randint(0, 97, (4, 32))
    torch.manual_seed(3)
    out = model(x, x)
    # Top-k in training: exactly each step's capacity, and no router loss or router statistics.
    assert [int((out.depth > r).sum()) for r in range(3)] == [128, 64, 32]
    assert not out.aux_losses and "sampling_acc" not in out.stats
    # Gates are alpha x the uniform scores of the tokens that ran: step 0 (everyone) averages about alpha / 2;
    # later steps keep the top half of their candidates' fresh scores, so their gates are larger.
    n, center, shifted, squares = out.router_sums["gate_moments"].unbind(-1)
    assert n.tolist() == [128, 64, 32] and center.tolist() == pytest.approx([6.4, 3.2, 1.6])
    mean = (center + shifted) / n
    assert 0.035 < mean[0] < 0.065 and (mean[1:] > mean[0]).all() and (mean <= 0.1).all()
    assert (squares / n - (shifted / n).square() >= 0).all()
    # Fresh draws: the same seed gives the same routing, another seed another one.
    torch.manual_seed(3)
    torch.testing.assert_close(model(x, x).loss, out.loss)
    assert not torch.equal(model(x, x).depth, out.depth)
    # Causal routing keeps each step's share of the previous step's tokens in expectation: 1/2, then 1/2.
    with torch.no_grad():
        depth = model(torch.randint(0, 97, (16, 64)), routing="causal").depth
    reached = [(depth > r).float().mean().item() for r in range(3)]
    assert reached[0] == 1.0 and abs(reached[1] - 0.5) < 0.05 and abs(reached[2] - 0.25) < 0.05


def test_gate_moments_sum_the_gates_of_the_tokens_that_ran_each_step():
    model = tiny_model(router="expert", init_std=0.1)
    x = torch.randint(0, 97, (2, 24))
    gates = []
    original = model.stack.expert_gate

    def spy(logits):
        g = original(logits)
        gates.append(g.squeeze(-1))
        return g

    model.stack.expert_gate = spy
    out = model(x, x)
    moments = out.router_sums["gate_moments"]
    for step, g in enumerate(gates):
        ran = out.depth > step
        c = model.args.router_alpha / 2
        expect = [ran.sum(), c * ran.sum(), ((g - c) * ran).sum(), ((g - c).square() * ran).sum()]
        torch.testing.assert_close(moments[step], torch.stack(expect).float())
    assert "gate_moments" not in tiny_model(router="none").forward(x, x).router_sums
