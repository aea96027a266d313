"""The continuous depth-wise batching engine gives the same outputs as plain cached generation."""

import pytest
import torch
from conftest import spread_thresholds, tiny_model
from test_generate import KINDS as GENERATE_KINDS

from mor_pretrain.generate import (
    DepthControl,
    KVGroup,
    ModelCache,
    SamplingConfig,
    forward_cached,
    generate,
    lm_head,
)
from mor_pretrain.serving import DepthBatchEngine

pytestmark = pytest.mark.usefixtures("single_thread")

# Every kind cached generation supports except sequence sharing, which the engine refuses by design.
KINDS = {k: v for k, v in GENERATE_KINDS.items() if "sequence" not in k}
MAX_NEW = [3, 9, 5, 12, 1, 7, 10]


def requests():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 12, (len(MAX_NEW),), generator=g)
    return [torch.randint(0, 97, (int(n),), generator=g).tolist() for n in lengths]


def model_for(kind: str):
    model = tiny_model(init_std=0.1, **KINDS[kind]).eval()
    if model.stack.expert_threshold is not None:  # learned thresholds, unlike model.causal_threshold
        spread_thresholds(model, torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(5)))
    return model


def serve(engine, prompts):
    for p, n in zip(prompts, MAX_NEW, strict=True):
        engine.submit(p, n)
    return engine.run()


@pytest.mark.parametrize("kind", list(KINDS))
def test_engine_equals_plain_cached_generation(kind):
    model = model_for(kind)
    prompts = requests()
    out = serve(DepthBatchEngine(model, slots=3, max_len=32), prompts)
    for i, (p, n) in enumerate(zip(prompts, MAX_NEW, strict=True)):
        ref = generate(model, [p], SamplingConfig(max_new_tokens=n))
        assert (out.tokens[i], out.depths[i], out.finish[i]) == (ref.tokens[0], ref.depths[0], ref.finish[0])


def test_one_stack_pass_mixes_depths_and_finished_slots_refill_at_once():
    model = model_for("expert")
    engine = DepthBatchEngine(model, slots=3, max_len=32)
    steps_per_pass: list[set[int]] = []
    stack_pass = engine._stack_pass

    def spy():
        steps_per_pass.append(set(engine.step[engine.live].tolist()))
        stack_pass()

    engine._stack_pass = spy
    for p, n in zip(requests(), MAX_NEW, strict=True):
        engine.submit(p, n)
    while engine.queue or engine.live.any():
        engine.iterate()
        if engine.queue:
            assert all(r is not None for r in engine.owner), "a free slot waited while requests were queued"
    assert any(len(s) >= 2 for s in steps_per_pass), "tokens at different steps should share a stack pass"
    assert len(engine.run().tokens) == len(MAX_NEW)


def test_stack_pass_has_static_shapes():
    model = model_for("expert")
    engine = DepthBatchEngine(model, slots=4, max_len=32)
    buffers = [t.data_ptr() for t in engine.stack_kv.k]
    shapes, in_pass = set(), []
    stack_pass = engine._stack_pass

    def spy():
        in_pass.append(True)
        stack_pass()
        in_pass.pop()

    def record(module, inputs, output):
        if in_pass:
            shapes.add(tuple(inputs[0].shape))

    engine._stack_pass = spy
    hook = model.stack.layers[0].attention.wq.register_forward_hook(record)
    serve(engine, requests())
    hook.remove()
    assert shapes == {(4, 1, model.args.d_model)}
    assert [t.data_ptr() for t in engine.stack_kv.k] == buffers


@pytest.mark.parametrize(
    "ctl", [DepthControl(max_depth=2), DepthControl(threshold=0.45), DepthControl(full_depth=True)]
)
def test_engine_applies_depth_control_like_generate(ctl):
    model = model_for("expert")
    prompts = requests()
    out = serve(DepthBatchEngine(model, slots=2, max_len=32, ctl=ctl), prompts)
    for i, (p, n) in enumerate(zip(prompts, MAX_NEW, strict=True)):
        ref = generate(model, [p], SamplingConfig(max_new_tokens=n), ctl=ctl)
        assert (out.tokens[i], out.depths[i]) == (ref.tokens[0], ref.depths[0])


def test_engine_eos_and_bad_input():
    model = model_for("token")
    prompt = requests()[1]
    full = generate(model, [prompt], SamplingConfig(max_new_tokens=8)).tokens[0]
    engine = DepthBatchEngine(model, slots=2, max_len=32, sampling=SamplingConfig(max_new_tokens=8, eos_ids=[full[2]]))
    engine.submit(prompt)
    out = engine.run()
    assert out.tokens == [full[: full.index(full[2])]] and out.finish == ["eos"]
    with pytest.raises(ValueError, match="prompt of 32 tokens"):
        engine.submit(list(range(32)))
    with pytest.raises(ValueError, match="sharing 'middle_sequence'"):
        DepthBatchEngine(tiny_model(sharing="middle_sequence"), slots=2, max_len=32)


def capped_greedy(model, prompt, n, capacities):
    """Greedy decoding with forward_cached over step caches of the given lengths."""
    a = model.args
    unique = lambda: KVGroup.empty(model, 1, 1, 32)  # noqa: E731
    steps = [KVGroup.empty(model, a.num_shared, 1, c) for c in capacities]
    cache = ModelCache(unique(), steps, unique(), torch.zeros(1, dtype=torch.long))
    h, depth = forward_cached(model, cache, torch.tensor([prompt]))
    tokens, depths = [], []
    while True:
        tokens.append(int(lm_head(model, h[0, -1]).argmax()))
        depths.append(int(depth[0, -1]))
        if len(tokens) == n:
            return tokens, depths
        h, depth = forward_cached(model, cache, torch.tensor([[tokens[-1]]]))


def test_short_step_caches_save_memory_and_turn_tokens_away_like_capped_caches():
    model = model_for("expert")
    prompts = requests()
    full = DepthBatchEngine(model, slots=3, max_len=32)
    short = DepthBatchEngine(model, slots=3, max_len=32, step_cache_fractions=[1.0, 0.25, 0.1])
    out = serve(short, prompts)
    assert short.stats["cache_full_exits"] > 0
    assert short.stack_kv.nbytes() * (3 * 32 + 1) == full.stack_kv.nbytes() * (32 + 8 + 4 + 1)
    for i, (p, n) in enumerate(zip(prompts, MAX_NEW, strict=True)):
        assert (out.tokens[i], out.depths[i]) == capped_greedy(model, p, n, [32, 8, 4])
    with pytest.raises(ValueError, match="step_cache_fractions"):
        DepthBatchEngine(model, slots=3, max_len=32, step_cache_fractions=[1.0, 0.5])


def test_bench_tool_runs_every_kind_and_short_caches_shrink_kv(capsys):
    import json

    from mor_pretrain import bench
    from mor_pretrain.folders import DTYPES

    dtype = next(a for a in bench.generate_parser()._actions if a.dest == "dtype")
    assert set(dtype.choices) == set(DTYPES)  # the tool names them without importing torch
    argv = ["--shape", "small", "--batch", "2", "--prompt-len", "2", "--new-tokens", "3", "--repeats", "1"]
    argv += ["--device", "cpu", "--json"]
    assert bench.generate_main([*argv, "--kinds", "vanilla,mor2"]) == 0
    full = {r["kind"]: r["at_batch"] for r in json.loads(capsys.readouterr().out)["rows"]}
    assert bench.generate_main([*argv, "--kinds", "mor2", "--cache-slack", "1.0"]) == 0
    short = json.loads(capsys.readouterr().out)["rows"][0]["at_batch"]
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in full.values())
    # Slots per layer cache (+1 scratch), max_len 5: vanilla 32 x 6; MoR-2 15 x (5 + 5 + 1) + 2 x 6, and with
    # steps sized 1 and 1/2 (3 slots) 15 x (5 + 3 + 1) + 2 x 6.
    vanilla = full["vanilla"]["kv_mib"]
    assert full["mor2"]["kv_mib"] == pytest.approx(vanilla * 177 / 192)
    assert short["kv_mib"] == pytest.approx(vanilla * 147 / 192)
