"""A tied model's LM head is its token embedding, one tensor, at every stage of its life: built, parallelized
(FSDP2 on a 1-rank process group), restored from a checkpoint, exported and read back (load_exported,
open_model). Checked by identity and by behaviour: zeroing embedding row j zeroes logit j everywhere."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import GPU_LIKE_BACKEND, spawn, tiny_args
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from mor_pretrain.models import MoRModel

TOKEN = 5  # the embedding row the behavioural check zeroes


def assert_tied(model: MoRModel, when: str) -> None:
    emb = model.tok_embeddings.weight
    assert model.args.tie_embeddings, when
    assert model.output is None, f"{when}: an untied head module"
    assert model.head_weight() is emb, f"{when}: the head is not the embedding"
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert not [n for n in names if n.startswith("output")], f"{when}: {names}"
    assert "output.weight" not in model.state_dict(), when
    x = torch.tensor([[1, 2, 3, 4, 6, 7]])
    with torch.no_grad():
        before = forward(model, x)
        assert (before[..., TOKEN] != 0).all(), when  # so the check below can fail
        emb = model.tok_embeddings.weight  # FSDP: the sharded parameter, what the optimizer and saves see
        local = emb.to_local() if isinstance(emb, DTensor) else emb
        saved = local[TOKEN].clone()
        local[TOKEN] = 0.0
        after = forward(model, x)
        local[TOKEN] = saved
    assert (after[..., TOKEN] == 0).all(), f"{when}: the head does not read the embedding"
    keep = [i for i in range(after.shape[-1]) if i != TOKEN]
    torch.testing.assert_close(after[..., keep], before[..., keep], msg=when)


def forward(model: MoRModel, x: torch.Tensor) -> torch.Tensor:
    """Logits, with every FSDP unit sharded again afterwards: small models keep their gathered parameters
    after forward (reshard_after_forward "auto"), which a write to the shards would not reach."""
    logits = model(x, routing="causal").logits
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    assert logits is not None
    return logits


def full_embedding(model: MoRModel) -> torch.Tensor:
    w = model.tok_embeddings.weight
    return (w.full_tensor() if isinstance(w, DTensor) else w).detach().clone()


def _worker(rank: int, tmp: Path) -> None:
    from mor_pretrain.checkpoint import Checkpointer, ModelState
    from mor_pretrain.config import JobConfig, TrainingConfig, dump_toml
    from mor_pretrain.folders import load_exported, open_model, step_dir
    from mor_pretrain.parallel import build_mesh
    from mor_pretrain.trainer import TrainState, build_model, export_final

    torch.set_num_threads(1)
    dist.init_process_group(
        GPU_LIKE_BACKEND, init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=1,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    training = TrainingConfig(seq_len=16, dtype="float32", device="cpu")
    cfg = JobConfig(model=tiny_args(router="expert"), training=training, run_root=str(tmp / "runs"))
    cfg.checkpoint.export_bf16 = False
    cfg.validate()
    mesh = build_mesh(cfg.parallelism, "cpu")

    model = build_model(cfg, mesh, torch.device("cpu"))  # on meta, parallelized, then the seeded weights
    assert isinstance(model.tok_embeddings.weight, DTensor)  # FSDP2 did wrap it
    assert_tied(model, "after parallelize")
    trained = full_embedding(model)

    ck = Checkpointer(cfg.checkpoint, cfg.folder.checkpoints, config_toml=dump_toml(cfg))
    ck.save(1, {"model": ModelState(model)}, {}, wait=True)
    cfg.training.seed = 1  # other initial weights, so the load must bring the saved ones back
    fresh = build_model(cfg, mesh, torch.device("cpu"))
    assert not torch.equal(full_embedding(fresh), trained)
    ck.load(step_dir(cfg.folder.checkpoints, 1), {"model": ModelState(fresh)}, {}, check_config=lambda _: None)
    assert torch.equal(full_embedding(fresh), trained)
    assert_tied(fresh, "after a checkpoint load")

    export_final(fresh, cfg, TrainState(step=1), rank)
    loaded, _ = load_exported(cfg.folder.export)
    assert torch.equal(loaded.tok_embeddings.weight, trained)
    assert_tied(loaded, "after load_exported")
    dist.destroy_process_group()  # the offline readers run without one (tools/convert_checkpoint.py, eval)
    for folder in (cfg.folder.export, step_dir(cfg.folder.checkpoints, 1)):  # an export, a DCP checkpoint
        args, state, _, _ = open_model(folder, progress=False)
        assert args.tie_embeddings and "output.weight" not in state, folder
        opened = MoRModel(args)
        opened.load_state_dict(state)
        assert torch.equal(opened.tok_embeddings.weight, trained)
        assert_tied(opened, f"after open_model({folder})")


def test_a_built_model_ties_its_head_to_the_embedding():
    model = MoRModel(tiny_args(router="expert"))
    model.init_weights()
    assert_tied(model, "after build")
    untied = MoRModel(tiny_args(router="expert", tie_embeddings=False))
    untied.init_weights()
    assert untied.head_weight() is not untied.tok_embeddings.weight


@pytest.mark.distributed  # one process, but through a process group and FSDP2
def test_tying_survives_parallelize_checkpoint_and_export(tmp_path):
    spawn(_worker, 1, tmp_path)
