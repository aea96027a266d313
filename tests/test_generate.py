"""Cached generation equals recomputing MoRModel.forward(routing="causal") on the whole sequence."""

import copy

import pytest
import torch
from conftest import spread_thresholds, tiny_model

from mor_pretrain.generate import (
    DepthControl,
    SamplingConfig,
    forward_cached,
    generate,
    lm_head,
    new_cache,
    sample,
    trim_stop,
)

pytestmark = pytest.mark.usefixtures("single_thread")

KINDS = {
    "vanilla": dict(num_recursions=1, sharing="cycle", n_layers=4),
    "recursive": dict(router="none"),
    "recursive_sequence": dict(router="none", sharing="middle_sequence"),
    "recursive_share": dict(router="none", kv_mode="share"),
    "expert": dict(router="expert"),
    "expert_share": dict(router="expert", kv_mode="share"),
    "expert_aux_mlp": dict(router="expert", aux_router=True, router_arch="mlp"),
    "expert_low_first_capacity": dict(router="expert", capacities=[0.75, 0.5, 0.25]),
    "token": dict(router="token"),
    "token_softmax_share": dict(router="token", router_activation="softmax", router_alpha=1.0, kv_mode="share"),
    "expert_threshold": dict(router="expert", expert_rule="threshold"),
    "recursive_gate": dict(router="none", recursion_gate=0.3),
    "recursive_eps": dict(router="none", residual_scale=0.5),
}


def model_for(kind: str, **kw):
    # A larger init than training's makes logits and routing decisions far from ties.
    model = tiny_model(init_std=0.1, **{**KINDS[kind], **kw}).eval()
    if model.args.router == "token":
        model.stack.depth_bias.copy_(torch.tensor([0.0, 0.01, -0.01]))
    if model.stack.expert_threshold is not None:  # learned thresholds, unlike model.causal_threshold
        spread_thresholds(model, torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(5)))
    return model


def reference_greedy(model, prompt, n):
    """Greedy decoding that recomputes the whole sequence causally at every step."""
    seq, depths = list(prompt), []
    for _ in range(n):
        out = model(torch.tensor([seq]), routing="causal")
        seq.append(int(out.logits[0, -1].argmax()))
        depths.append(model.args.num_recursions if out.depth is None else int(out.depth[0, -1]))
    return seq[len(prompt) :], depths


@pytest.mark.parametrize("kind", list(KINDS))
def test_cached_logits_and_depths_match_causal_forward(kind):
    model = model_for(kind)
    x = torch.randint(0, 97, (3, 24))
    ref = model(x, routing="causal")
    cache = new_cache(model, 3, 32)
    outs = [forward_cached(model, cache, x[:, :9])]  # prefill, then one token at a time
    outs += [forward_cached(model, cache, x[:, t : t + 1]) for t in range(9, 24)]
    logits = lm_head(model, torch.cat([h for h, _ in outs], 1))
    depth = torch.cat([d for _, d in outs], 1)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-4, atol=1e-4)
    if ref.depth is not None:
        assert torch.equal(depth, ref.depth)
        assert 0 < (depth < depth.max()).float().mean() < 1, "routing should send tokens to several depths"
    # Recursion-wise caching: each step stores only the tokens that reached it.
    if model.args.router != "none" and model.args.kv_mode == "recursion":
        for step, group in enumerate(cache.steps):
            assert torch.equal(group.length, (ref.depth > step).sum(1))


@pytest.mark.parametrize("kind", ["vanilla", "recursive_share", "expert", "expert_share", "token"])
def test_batched_greedy_generation_equals_per_prompt_recompute(kind):
    model = model_for(kind)
    prompts = [[5, 17, 3], [9, 1, 44, 60, 2, 81, 7, 30], [12]]
    out = generate(model, prompts, SamplingConfig(max_new_tokens=10))
    for i, p in enumerate(prompts):
        tokens, depths = reference_greedy(model, p, 10)
        assert out.tokens[i] == tokens
        assert out.depths[i] == depths
        assert out.finish[i] == "length"
    hist = out.depth_histogram(model.args.num_recursions)
    assert sum(hist) == 30 and hist[0] == 0


@pytest.mark.parametrize("kind", ["expert", "token"])
def test_left_and_right_padding_give_each_prompt_its_own_logits(kind):
    model = model_for(kind)
    prompts = [torch.randint(0, 97, (n,)) for n in (4, 11, 7)]
    right = torch.zeros(3, 11, dtype=torch.long)
    left = torch.zeros(3, 11, dtype=torch.long)
    rmask = torch.zeros(3, 11, dtype=torch.bool)
    lmask = torch.zeros(3, 11, dtype=torch.bool)
    for i, p in enumerate(prompts):
        right[i, : len(p)], rmask[i, : len(p)] = p, True
        left[i, 11 - len(p) :], lmask[i, 11 - len(p) :] = p, True
    for tokens, mask in ((right, rmask), (left, lmask)):
        h, _ = forward_cached(model, new_cache(model, 3, 16), tokens, mask)
        for i, p in enumerate(prompts):
            ref = model(p[None], routing="causal").logits[0]
            torch.testing.assert_close(lm_head(model, h[i][mask[i]]), ref, rtol=1e-4, atol=1e-4)


def test_threshold_and_full_depth_match_the_model_with_that_threshold():
    model = model_for("expert")
    x = torch.randint(0, 97, (2, 20))
    for ctl, thr in ((DepthControl(threshold=0.47), 0.47), (DepthControl(full_depth=True), 1e-9)):
        h, depth = forward_cached(model, new_cache(model, 2, 20), x, ctl=ctl)
        moved = copy.deepcopy(model)
        moved.args.causal_threshold = thr
        ref = moved(x, routing="causal")
        torch.testing.assert_close(lm_head(model, h), ref.logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(depth, ref.depth)
    assert (depth == 3).all()


class _NeverContinue(torch.nn.Module):
    def forward(self, x):
        return x.new_full((*x.shape[:-1], 1), -30.0)


def test_expert_depth_cap_equals_routers_that_stop_at_the_cap():
    model = model_for("expert")
    x = torch.randint(0, 97, (2, 20))
    h, depth = forward_cached(model, new_cache(model, 2, 20), x, ctl=DepthControl(max_depth=2))
    capped = copy.deepcopy(model)
    capped.stack.routers[2] = _NeverContinue()
    ref = capped(x, routing="causal")
    torch.testing.assert_close(lm_head(model, h), ref.logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(depth, ref.depth) and depth.max() == 2


@pytest.mark.parametrize("kind", ["token", "recursive"])
def test_depth_cap_and_full_depth_for_token_choice_and_recursion(kind):
    model = model_for(kind)
    x = torch.randint(0, 97, (2, 20))
    run = lambda ctl: forward_cached(model, new_cache(model, 2, 20), x, ctl=ctl)  # noqa: E731
    h_default, d_default = run(DepthControl())
    h_cap3, d_cap3 = run(DepthControl(max_depth=3))
    assert torch.equal(h_default, h_cap3) and torch.equal(d_default, d_cap3)
    h1, d1 = run(DepthControl(max_depth=1))
    assert (d1 == 1).all() and not torch.allclose(h1, h_default)
    _, d2 = run(DepthControl(max_depth=2))
    assert torch.equal(d2, d_default.clamp(max=2))
    _, dfull = run(DepthControl(full_depth=True))
    assert (dfull == 3).all()


def test_depth_control_refuses_bad_settings():
    with pytest.raises(ValueError, match="threshold moves the fixed causal threshold"):
        generate(model_for("token"), [[1]], ctl=DepthControl(threshold=0.3))
    with pytest.raises(ValueError, match="max_depth"):
        generate(model_for("expert"), [[1]], ctl=DepthControl(max_depth=4))
    with pytest.raises(ValueError, match="contradict"):
        generate(model_for("expert"), [[1]], ctl=DepthControl(max_depth=2, full_depth=True))


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    draws = lambda **kw: sample(logits, SamplingConfig(temperature=1.0, **kw), gen)  # noqa: E731
    assert set(draws(top_k=2).tolist()) == {0, 1}
    assert set(draws(top_p=0.45).tolist()) == {0}
    assert set(draws(top_p=0.7).tolist()) == {0, 1}
    freq = torch.bincount(draws(), minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    assert torch.equal(sample(logits, SamplingConfig()), torch.zeros(4000, dtype=torch.long))


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = model_for("expert")
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.5, seed=3)
    a = generate(model, [[1, 2, 3], [4]], cfg)
    assert a.tokens == generate(model, [[1, 2, 3], [4]], cfg).tokens
    greedy = generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=8))
    top1 = generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=8, temperature=2.0, top_k=1))
    assert top1.tokens == greedy.tokens and a.tokens[0] != greedy.tokens[0]


def test_eos_stop_strings_and_streaming():
    model = model_for("expert")
    prompt = [[7, 8, 9]]
    full = generate(model, prompt, SamplingConfig(max_new_tokens=8)).tokens[0]
    eos = generate(model, prompt, SamplingConfig(max_new_tokens=8, eos_ids=[full[3]]))
    first = full.index(full[3])
    assert eos.tokens[0] == full[:first] and eos.finish == ["eos"]
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    streamed: list[tuple[int, int]] = []
    stop = f"<{full[1]}><{full[2]}>"
    out = generate(
        model,
        prompt,
        SamplingConfig(max_new_tokens=8, stop_strings=[stop]),
        decode=decode,
        on_token=lambda row, tok: streamed.append((row, tok)),
    )
    assert out.finish == ["stop"] and stop in decode(out.tokens[0])
    assert streamed == [(0, t) for t in out.tokens[0]] and len(out.depths[0]) == len(out.tokens[0])
    assert trim_stop(decode(out.tokens[0]), [stop]) == decode(full)[: decode(full).find(stop)]
    with pytest.raises(ValueError, match="decode"):
        generate(model, prompt, SamplingConfig(stop_strings=["x"]))


def test_bad_prompts_are_refused():
    model = model_for("expert")
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []])
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [list(range(64))])


@pytest.mark.parametrize("kind", ["expert", "expert_share", "token"])
def test_each_step_computes_only_the_tokens_that_reached_it(kind):
    model = model_for(kind)
    x = torch.randint(0, 97, (1, 24))
    rows: list[int] = []
    hook = model.stack.layers[0].attention.wq.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[1]))
    _, depth = forward_cached(model, new_cache(model, 1, 24), x)
    hook.remove()
    reached = [int((depth > r).sum()) for r in range(3)]
    assert rows == [n for n in reached if n] and reached[0] > reached[1] > 0
