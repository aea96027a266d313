import dataclasses
import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from conftest import GPU_LIKE_BACKEND, cpu_mesh, spawn, tiny_args, tiny_model

from mor_pretrain.checkpoint import COMPLETE, load_dcp_model, mark_complete
from mor_pretrain.config import JobConfig, RunFolder, TrainingConfig, dump_toml
from mor_pretrain.convert import dcp_to_export, export_to_dcp, load_hf_llama, to_hf_llama, unpermute_qk, upcycle
from mor_pretrain.distributed import barrier, host_group
from mor_pretrain.export import load_exported
from mor_pretrain.integrations.hf import save_hf
from mor_pretrain.models import MoRModel
from mor_pretrain.models.layers import apply_rope, rope_table


def job_toml(args):
    return dump_toml(JobConfig(model=args, training=TrainingConfig(seq_len=16)))


def write_run_checkpoint(run, model, step=3, folder="checkpoints"):
    """A run folder as the trainer lays it out: config.toml + <checkpoint.folder>/step-N with a DCP save."""
    run.mkdir(parents=True, exist_ok=True)
    cfg = JobConfig(model=model.args, training=TrainingConfig(seq_len=16))
    cfg.checkpoint.folder = folder
    (run / "config.toml").write_text(dump_toml(cfg))
    ckpt = RunFolder(run, folder).checkpoints / f"step-{step:08d}"
    state = {"model": model.state_dict(), "train_state": {"step": torch.tensor(step)}}
    dcp.save(state, checkpoint_id=str(ckpt))
    mark_complete(ckpt, step)
    return ckpt


def test_dcp_to_export_and_back(tmp_path):
    model = tiny_model(router="expert", kv_mode="share", capacities=[1.0, 0.5, 0.25])
    ckpt = write_run_checkpoint(tmp_path / "run", model)
    out = dcp_to_export(ckpt, tmp_path / "export", dtype=None, progress=False)
    loaded, meta = load_exported(out)
    assert meta["model"]["capacities"] == [1.0, 0.5, 0.25] and meta["tokenizer_source"] == "default"
    x = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    back = export_to_dcp(out, tmp_path / "run" / "checkpoints" / "step-00000009")
    _, state, _ = load_dcp_model(back, config=tmp_path / "run" / "config.toml", progress=False)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    with pytest.raises(FileExistsError):
        export_to_dcp(out, back)


def test_evaluation_opens_a_run_folder_whose_checkpoints_live_elsewhere(tmp_path):
    """checkpoint.folder names where the run's checkpoints are; evaluation reads it from the run's config."""
    from mor_pretrain.evaluate import load_for_eval

    model = tiny_model()
    write_run_checkpoint(tmp_path / "run", model, step=2, folder="ckpt")
    ckpt = write_run_checkpoint(tmp_path / "run", model, step=5, folder="ckpt")
    assert not (tmp_path / "run" / "checkpoints").exists()
    loaded, _, resolved = load_for_eval(tmp_path / "run")
    assert resolved == str(ckpt)
    x = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("router", ["none", "expert"])  # a Llama folder, and a MoR remote-code folder
def test_one_function_opens_every_kind_of_model_folder(tmp_path, router):
    """open_model reads a DCP checkpoint, a run folder, an export and a transformers folder to the same
    weights; evaluation opens all of them through it."""
    from mor_pretrain.evaluate import load_for_eval
    from mor_pretrain.export import open_model

    model = tiny_model(router=router, num_recursions=1 if router == "none" else 3).eval()
    ckpt = write_run_checkpoint(tmp_path / "run", model)
    export = dcp_to_export(ckpt, tmp_path / "export", dtype=None, progress=False)
    hf = save_hf(tmp_path / "hf", model.args, model.state_dict(), tokenizer="default", progress=False)
    assert json.loads((hf / "config.json").read_text())["model_type"] == ("llama" if router == "none" else "mor")
    x = torch.randint(0, 97, (2, 16))
    want = model(x, routing="causal").logits
    for folder, read in ((ckpt, ckpt), (tmp_path / "run", ckpt), (export, export), (hf, hf)):
        args, state, meta, resolved = open_model(folder, progress=False)
        assert resolved == read and meta["tokenizer"]
        loaded, tok, _ = load_for_eval(folder)
        torch.testing.assert_close(loaded(x, routing="causal").logits, want, rtol=0, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        open_model(tmp_path)


def test_vocab_size_zero_is_read_from_the_checkpoint(tmp_path):
    model = tiny_model()
    ckpt = write_run_checkpoint(tmp_path / "run", model)
    (tmp_path / "zero.toml").write_text(job_toml(dataclasses.replace(model.args, vocab_size=0)))
    args, _, _ = load_dcp_model(ckpt, config=tmp_path / "zero.toml", progress=False)
    assert args.vocab_size == 97


def test_bad_checkpoints_are_refused(tmp_path):
    model = tiny_model()
    ckpt = write_run_checkpoint(tmp_path / "run", model)
    (tmp_path / "other.toml").write_text(job_toml(dataclasses.replace(model.args, d_ffn=48)))
    with pytest.raises(ValueError, match=r"does not match.*feed_forward"):
        load_dcp_model(ckpt, config=tmp_path / "other.toml", progress=False)
    data = next(ckpt.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"__0_0.distcp has 100 bytes.*truncated"):
        load_dcp_model(ckpt, progress=False)
    (ckpt / COMPLETE).unlink()
    with pytest.raises(ValueError, match="incomplete"):
        load_dcp_model(ckpt, progress=False)
    with pytest.raises(ValueError, match="not a DCP checkpoint"):
        load_dcp_model(tmp_path / "run", progress=False)


def _fsdp_save_worker(rank, world, init, ckpt):
    os.environ.update(OMP_NUM_THREADS="1")
    dist.init_process_group(
        GPU_LIKE_BACKEND, init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    model = tiny_model(seed=7, router="expert")
    mesh = cpu_mesh(world)
    fully_shard(model.stack, mesh=mesh)
    fully_shard(model, mesh=mesh)
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=ckpt, process_group=host_group())
    if rank == 0:  # dcp.save has returned on rank 0: every rank's files are written
        mark_complete(Path(ckpt), 1)
    barrier()
    dist.destroy_process_group()


@pytest.mark.distributed
def test_sharded_two_rank_checkpoint_converts_without_a_process_group(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ref = tiny_model(seed=7, router="expert")
    (run / "config.toml").write_text(job_toml(ref.args))
    ckpt = run / "checkpoints" / "step-00000001"
    init = f"file://{tmp_path}/rendezvous"  # no free TCP port to pick and race for
    spawn(_fsdp_save_worker, 2, 2, init, str(ckpt))
    assert not dist.is_initialized()
    loaded, _ = load_exported(dcp_to_export(ckpt, tmp_path / "export", dtype=None, progress=False))
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_recursions=1, sharing="cycle", tie_embeddings=False),
        dict(num_recursions=1, sharing="cycle", tie_embeddings=True),
        dict(num_recursions=3, sharing="middle_cycle"),  # unrolled: shared layers repeat
        dict(num_recursions=2, n_layers=6, sharing="sequence"),
    ],
)
def test_hf_llama_gives_equal_logits(tmp_path, kw):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(rope_theta=1e5, **kw)
    out = save_hf(tmp_path / "hf", model.args, model.state_dict(), torch.float32, progress=False)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


def test_hf_llama_round_trip_and_refusals(tmp_path):
    model = tiny_model(num_recursions=1, sharing="cycle", tie_embeddings=False)
    save_hf(tmp_path / "hf", model.args, model.state_dict(), torch.float32, progress=False)
    args, state = load_hf_llama(tmp_path / "hf")
    assert args == model.args
    back = MoRModel(args)
    back.load_state_dict(state)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    routed = tiny_model(router="expert")
    with pytest.raises(ValueError, match="routing"):
        to_hf_llama(routed.args, routed.state_dict())


def _interleaved_rope(x, theta):
    """llama.cpp's RoPE: rotates adjacent pairs (x[2i], x[2i+1])."""
    t, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = torch.outer(torch.arange(t).float(), inv)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.stack([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], dim=-1)
    return out.flatten(-2)


def test_gguf_qk_unpermute_turns_interleaved_rope_into_rotate_half():
    torch.manual_seed(0)
    heads, hd, dim, t, theta = 3, 8, 16, 5, 1e4
    wq, wk = torch.randn(heads * hd, dim), torch.randn(heads * hd, dim)  # GGUF row order
    x = torch.randn(t, dim)

    def heads_of(w):
        return (x @ w.T).view(t, heads, hd).transpose(0, 1)  # (heads, t, hd)

    ref = _interleaved_rope(heads_of(wq), theta) @ _interleaved_rope(heads_of(wk), theta).transpose(-1, -2)
    rope = rope_table(hd, t, theta)[None]
    q = apply_rope(heads_of(unpermute_qk(wq, heads))[None], rope[None])
    k = apply_rope(heads_of(unpermute_qk(wk, heads))[None], rope[None])
    torch.testing.assert_close(q @ k.transpose(-1, -2), ref[None], rtol=1e-5, atol=1e-5)


def _block(state, prefix):
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize(
    "strategy, sources",
    [("lower", [[1], [2]]), ("upper", [[5], [6]]), ("stepwise", [[1], [4]]), ("average", [[1, 3, 5], [2, 4, 6]])],
)
def test_upcycle_strategies_pick_the_documented_layers(strategy, sources):
    src = tiny_model(num_recursions=1, sharing="cycle")  # 8 vanilla layers
    target = tiny_args(router="expert")  # middle_cycle, Nr=3: first, 2 shared x 3, last
    new = upcycle(src.args, src.state_dict(), target, strategy)
    sd = src.state_dict()
    for j, picks in enumerate(sources):
        got = _block(new, f"stack.layers.{j}.")
        for name, v in got.items():
            want = torch.stack([sd[f"stack.layers.{i}.{name}"] for i in picks]).mean(0)
            torch.testing.assert_close(v, want, rtol=0, atol=1e-7)
    for name, v in _block(new, "first.").items():
        torch.testing.assert_close(v, sd[f"stack.layers.0.{name}"])
    for name, v in _block(new, "last.").items():
        torch.testing.assert_close(v, sd[f"stack.layers.7.{name}"])
    model = MoRModel(target)
    model.load_state_dict(new)  # strict: routers are present (fresh)
    assert torch.isfinite(model(torch.randint(0, 97, (1, 12))).logits).all()


def test_upcycle_random_keeps_only_embeddings_and_edges_and_identity_is_exact():
    src = tiny_model(num_recursions=1, sharing="cycle")
    sd = src.state_dict()
    new = upcycle(src.args, sd, tiny_args(num_recursions=2, sharing="cycle"), "random", seed=1)
    torch.testing.assert_close(new["tok_embeddings.weight"], sd["tok_embeddings.weight"])
    w = new["stack.layers.0.attention.wq.weight"]
    assert all(not torch.equal(w, sd[f"stack.layers.{i}.attention.wq.weight"]) for i in range(8))
    same = upcycle(src.args, sd, src.args, "stepwise")
    x = torch.randint(0, 97, (2, 10))
    twin = MoRModel(src.args)
    twin.load_state_dict(same)
    torch.testing.assert_close(twin(x).logits, src(x).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="strategy"):
        upcycle(src.args, sd, src.args, "middle")
    with pytest.raises(ValueError, match="d_ffn"):
        upcycle(src.args, sd, tiny_args(d_ffn=48), "lower")
