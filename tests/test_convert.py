import dataclasses
import json
import os
import re
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from conftest import GPU_LIKE_BACKEND, cpu_mesh, spawn, tiny_args, tiny_model

from mor_pretrain.config import JobConfig, RunFolder, TrainingConfig, dump_toml
from mor_pretrain.convert import dcp_to_export, export_to_dcp, to_hf_llama, unpermute_qk, upcycle
from mor_pretrain.distributed import barrier, host_group
from mor_pretrain.folders import COMPLETE, load_dcp_model, load_exported, load_hf_llama, mark_complete, save_exported
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
    from mor_pretrain.folders import open_model

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


# ---------------------------------------------------------------------------------------------------------------
# What a model folder of any format cannot make a reader do (hostile audit)


def _tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", Path(__file__).parents[1] / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_error_line(capsys) -> str:
    """The one `error:` line a command printed last on stderr (after its progress lines), no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and "Traceback" not in "\n".join(err), err
    return errors[0]


BAD = "stack.layers.1.feed_forward.w2.weight"


def _with_nan(model):
    with torch.no_grad():
        model.state_dict()[BAD][3, 5] = float("nan")
    return model


def test_nan_weights_in_a_checkpoint_are_never_used_or_exported(tmp_path, capsys):
    """A DCP checkpoint holding NaN (hand-made, or older than the save's own check): to-export, evaluation and
    generation refuse it naming the tensor, and no export is written."""
    from mor_pretrain.evaluate import load_for_eval

    ckpt = write_run_checkpoint(tmp_path / "run", _with_nan(tiny_model()))
    out = tmp_path / "export"
    assert _tool("convert_checkpoint").main(["to-export", str(ckpt), str(out)]) == 1
    assert f"tensor {BAD} holds NaN or inf" in _one_error_line(capsys)
    assert not (out / "model.safetensors").exists()
    for folder in (ckpt, tmp_path / "run"):
        with pytest.raises(ValueError, match=rf"checkpoint {ckpt}: tensor {BAD} holds NaN or inf"):
            load_for_eval(folder)  # what tools/eval.py runs
    argv = [str(ckpt), "--prompt", "the", "--max-new-tokens", "2", "--device", "cpu"]
    assert _tool("generate").main(argv) == 2
    assert f"tensor {BAD} holds NaN or inf" in _one_error_line(capsys)


@pytest.mark.parametrize("router", ["none", "expert"])  # a Llama folder, a MoR remote-code folder
def test_nan_weights_in_a_transformers_folder_are_refused(tmp_path, capsys, router):
    from mor_pretrain.evaluate import load_for_eval

    kw = dict(num_recursions=1, sharing="cycle") if router == "none" else dict(router=router)
    model = _with_nan(tiny_model(**kw))
    hf = save_hf(tmp_path / "hf", model.args, model.state_dict(), tokenizer="default", progress=False)
    with pytest.raises(ValueError, match=rf"tensor {BAD} holds NaN or inf"):
        load_for_eval(hf)
    assert _tool("convert_checkpoint").main(["upcycle", str(hf), str(tmp_path / "up"), "--config", "x.toml"]) == 1
    assert "NaN or inf" in _one_error_line(capsys) and not (tmp_path / "up").exists()
    if router == "none":
        assert _tool("convert_checkpoint").main(["from-hf", str(hf), str(tmp_path / "from")]) == 1
        assert "NaN or inf" in _one_error_line(capsys) and not (tmp_path / "from" / "model.safetensors").exists()


def test_a_max_seq_len_the_weights_do_not_back_is_refused_in_every_format(tmp_path):
    """max_seq_len sizes the RoPE table alone: a checkpoint's config.toml or a transformers folder's config.json
    giving 10**9 is refused before any model is built (evaluation would allocate 128 GB)."""
    from mor_pretrain.folders import open_model

    huge = 10**9
    model = tiny_model()
    ckpt = write_run_checkpoint(tmp_path / "run", model)
    cfg = JobConfig(model=dataclasses.replace(model.args, max_seq_len=huge), training=TrainingConfig(seq_len=16))
    (ckpt / "config.toml").write_text(dump_toml(cfg))
    mark_complete(ckpt, 3)
    with pytest.raises(ValueError, match=rf"config.toml: max_seq_len {huge} would need a .* RoPE table"):
        open_model(ckpt, progress=False)
    for router in ("none", "expert"):
        m = tiny_model(router=router, num_recursions=1 if router == "none" else 3)
        hf = save_hf(tmp_path / f"hf_{router}", m.args, m.state_dict(), progress=False)

        meta = json.loads((hf / "config.json").read_text())
        if router == "none":
            meta["max_position_embeddings"] = huge
        else:
            meta["mor"]["max_seq_len"] = huge
        (hf / "config.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=rf"config.json: max_seq_len {huge} would need"):
            open_model(hf, progress=False)


def _outside_tokenizer(tmp_path):
    from mor_pretrain.data.tokenizer import default_tokenizer_path

    outside = tmp_path / "elsewhere" / "secret.model"
    outside.parent.mkdir(exist_ok=True)
    outside.write_bytes(default_tokenizer_path().read_bytes())
    return outside


@pytest.mark.parametrize("where", ["outside", "/etc/passwd"])
def test_a_checkpoints_config_cannot_name_a_tokenizer_outside_its_folder(tmp_path, capsys, where):
    """A checkpoint read offline (conversion, evaluation) takes its tokenizer from its own folder, or the
    built-in one; the path its config.toml names may point anywhere and is never opened."""
    from mor_pretrain.evaluate import load_for_eval

    spec = str(_outside_tokenizer(tmp_path)) if where == "outside" else where
    model = tiny_model()
    ckpt = write_run_checkpoint(tmp_path / "run", model)
    cfg = JobConfig(model=model.args, training=TrainingConfig(seq_len=16))
    cfg.data.tokenizer = spec
    (ckpt / "config.toml").write_text(dump_toml(cfg))
    mark_complete(ckpt, 3)
    rule = "must be a file of that folder (tokenizer.model or tokenizer.json) or the built-in 'default'"
    named = rf"config.toml names the tokenizer '{spec}', .* no copy of it: .*{re.escape(rule)}"
    with pytest.raises(ValueError, match=named):
        load_for_eval(ckpt)
    assert _tool("convert_checkpoint").main(["to-export", str(ckpt), str(tmp_path / "export")]) == 1
    assert rule in _one_error_line(capsys)
    if where == "outside":  # the user's own job config, passed on the command line, is theirs to point anywhere
        (tmp_path / "job.toml").write_text(dump_toml(cfg))
        argv = ["to-export", str(ckpt), str(tmp_path / "export"), "--config", str(tmp_path / "job.toml")]
        assert _tool("convert_checkpoint").main(argv) == 0
        assert (tmp_path / "export" / "tokenizer.model").read_bytes() == Path(spec).read_bytes()


def test_a_checkpoint_carries_its_tokenizer_and_a_link_out_of_it_is_refused(tmp_path):
    """Saves copy the run's tokenizer into the checkpoint (under its manifest), so it is read offline with
    that copy; a copy replaced by a link out of the folder is refused."""
    import sentencepiece as spm

    from mor_pretrain.checkpoint import Checkpointer, ModelState
    from mor_pretrain.config import CheckpointConfig, CheckpointError
    from mor_pretrain.evaluate import load_for_eval
    from mor_pretrain.folders import step_dir

    outside = _outside_tokenizer(tmp_path)
    model = tiny_model()
    cfg = JobConfig(model=model.args, training=TrainingConfig(seq_len=16))
    cfg.data.tokenizer = str(outside)
    ck = Checkpointer(CheckpointConfig(), tmp_path / "ck", config_toml=dump_toml(cfg))
    ck.save(1, {"model": ModelState(model)}, {})
    ckpt = step_dir(tmp_path / "ck", 1)
    assert (ckpt / "tokenizer.model").read_bytes() == outside.read_bytes()
    outside.write_bytes(b"changed after the run")  # the checkpoint does not depend on it any more
    _, tok, _ = load_for_eval(ckpt)
    want = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model")).encode("the router")
    assert tok.encode("the router") == want
    (ckpt / "tokenizer.model").unlink()
    (ckpt / "tokenizer.model").symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"tokenizer.model resolves to .*secret.model, outside the checkpoint"):
        load_for_eval(ckpt)


@pytest.mark.parametrize("kind", ["export", "hf"])
def test_a_tokenizer_linked_out_of_a_model_folder_is_refused(tmp_path, kind):
    from mor_pretrain.evaluate import load_for_eval

    model = tiny_model(router="expert")
    if kind == "export":
        folder = save_exported(tmp_path / "e", model.args, model.state_dict(), extra={"tokenizer": "default"})
    else:
        folder = save_hf(tmp_path / "hf", model.args, model.state_dict(), tokenizer="default", progress=False)
    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer.model").symlink_to(_outside_tokenizer(tmp_path))
    with pytest.raises(ValueError, match=r"tokenizer.model: it resolves to .*secret.model, outside its folder"):
        load_for_eval(folder)
