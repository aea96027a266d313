"""The continuous depth-wise batching engine gives the same outputs as plain cached generation."""

import pytest
import torch
from conftest import tiny_model

from mor_pretrain.generate import DepthControl, SamplingConfig, generate
from mor_pretrain.serving import DepthBatchEngine

KINDS = {
    "vanilla": dict(num_recursions=1, sharing="cycle", n_layers=4),
    "recursive": dict(router="none"),
    "recursive_share": dict(router="none", kv_mode="share"),
    "expert": dict(router="expert"),
    "expert_share": dict(router="expert", kv_mode="share"),
    "expert_aux_mlp": dict(router="expert", aux_router=True, router_arch="mlp"),
    "expert_low_first_capacity": dict(router="expert", capacities=[0.75, 0.5, 0.25]),
    "token": dict(router="token"),
    "token_share": dict(router="token", kv_mode="share"),
}
MAX_NEW = [3, 9, 5, 12, 1, 7, 10]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls: on a shared, busy CPU, OpenMP threads mostly wait on each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def requests():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 12, (len(MAX_NEW),), generator=g)
    return [torch.randint(0, 97, (int(n),), generator=g).tolist() for n in lengths]


def model_for(kind: str):
    return tiny_model(init_std=0.1, **KINDS[kind]).eval()


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
