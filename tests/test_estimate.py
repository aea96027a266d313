"""The dry run's traced step (mor_pretrain.estimate): its memory against a real run of the same step, the
collectives it sees, host syncs, and every shipped config against an 80 GB card."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import spawn

from mor_pretrain.config import load_config
from mor_pretrain.estimate import GPUS, MARGIN, estimate, predict
from mor_pretrain.trainer import size_vocabulary

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


def config(name: str, *overrides: str):
    cfg = load_config(str(ROOT / "train_configs" / name), ["--data.tokenizer=default", *overrides])
    size_vocabulary(cfg)
    return cfg


def _measure(rank: int, world: int, name: str, out: Path) -> None:
    """Rank `rank` of a real gloo run: two train steps of config `name`, its peak live tensor memory."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from mor_pretrain.models import MoRModel
    from mor_pretrain.optim import build_lr_scheduler, build_optimizer
    from mor_pretrain.parallel import DTYPES, build_mesh, dp_coordinates, parallelize
    from mor_pretrain.trainer import Parallel, train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world)
    cfg = config(name)
    mesh = build_mesh(cfg.parallelism, "cpu")
    with torch.device("meta"):
        model = MoRModel(cfg.model)
    parallelize(model, mesh, cfg.parallelism, DTYPES[cfg.training.dtype])
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_lr_scheduler(optimizer, cfg.optimizer, cfg.training.steps)
    par = Parallel(torch.device("cpu"), mesh, *dp_coordinates(mesh), 1)
    t = cfg.training
    ids = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len))
    batches = [{"input": ids, "labels": ids}]
    tracker = FSDPMemTracker(model, optimizer)
    with tracker:
        train_step(model, optimizer, scheduler, batches, par, cfg)
        tracker.reset_mod_stats()
        train_step(model, optimizer, scheduler, batches, par, cfg)
    if rank == 0:
        out.write_text(json.dumps(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("name", ["debug_mor.toml", "debug_vanilla.toml"])
def test_estimated_memory_is_within_15_percent_of_a_real_run(tmp_path, name):
    """Two gloo ranks run the step for real (one micro-batch each); the trace sees shapes only."""
    out = tmp_path / "peak.json"
    spawn(_measure, 2, 2, name, out)
    real = json.loads(out.read_text())
    est = estimate(config(name), 2)
    assert est.accumulation == 1
    assert abs(est.memory.total - real) <= 0.15 * real, (est.memory, real)


def test_collectives_and_flops_of_a_step():
    """FSDP gathers every parameter for each micro-batch's forward, and the resharded units again for its
    backward (the root unit, which holds the tied embedding, stays gathered), in the compute dtype. Gradients
    are reduce-scattered once per step, whatever the accumulation; matmul FLOPs follow the micro-batches."""
    cfg = config("debug_mor.toml", "--training.global_batch_size=64")  # fp32, micro-batch 4, 8 ranks
    est = estimate(cfg, 8)
    assert est.accumulation == 2
    from mor_pretrain.models import MoRModel

    with torch.device("meta"):
        params = sum(p.numel() for p in MoRModel(cfg.model).parameters())
    gathered = sum(b for (op, n), b in est.micro.collective_bytes.items() if op == "_allgather_base" and n == 8)
    assert 4 * params * 0.99 <= gathered <= 2 * 4 * params * 1.01  # fp32
    scatter = ("_reduce_scatter_base", 8)
    assert est.micro.collectives[scatter] == 0  # not one per micro-batch...
    assert est.fixed.collective_bytes[scatter] == pytest.approx(4 * params, rel=0.01)  # ...but each grad once
    assert est.step.collectives[scatter] == est.fixed.collectives[scatter] > 0
    step = est.step
    assert step.matmul_flops == pytest.approx(est.fixed.matmul_flops + 2 * est.micro.matmul_flops)
    assert est.micro.matmul_flops > 0


def test_tensor_parallel_collectives_are_counted_in_their_groups():
    """FSDP x TP 2 x 2: TP's functional all-reduces in the TP group, FSDP's collectives in the data-parallel
    group, each with its own size (which sets its link in the prediction)."""
    est = estimate(config("debug_mor.toml", "--parallelism.tp=2", "--model.n_kv_heads=2"), 4)
    assert est.mesh == (1, 2, 2)
    calls = est.step.collectives
    assert calls[("all_reduce", 2)] > 0 and est.step.collective_bytes[("all_reduce", 2)] > 0  # TP
    assert calls[("_allgather_base", 2)] > 0 and calls[("_reduce_scatter_base", 2)] > 0  # FSDP over dp_shard
    assert {n for (op, n) in calls if op != "allreduce"} == {2}  # only scalars (loss, norm) span all 4


def test_resharding_is_chosen_by_model_size():
    """auto: a model whose gathered copy is small stays gathered from forward to backward (no second
    all-gather per unit); a large one reshards. The trace shows the trade; explicit choices are kept."""
    from mor_pretrain.models import MoRModel
    from mor_pretrain.parallel import DTYPES, reshards

    def choice(name, *overrides):
        cfg = config(name, *overrides)
        with torch.device("meta"):
            return reshards(MoRModel(cfg.model), cfg.parallelism, DTYPES[cfg.training.dtype])

    assert choice("vanilla_1.7b.toml") and not choice("mor_1.7b.toml") and not choice("vanilla_730m.toml")
    assert not choice("vanilla_1.7b.toml", "--parallelism.reshard_after_forward=never")
    assert choice("debug_mor.toml", "--parallelism.reshard_after_forward=always")
    kept = estimate(config("debug_mor.toml"), 2)
    resharded = estimate(config("debug_mor.toml", "--parallelism.reshard_after_forward=always"), 2)
    gathers = ("_allgather_base", 2)
    assert kept.step.collectives[gathers] < resharded.step.collectives[gathers]
    assert kept.step.collective_bytes[gathers] < resharded.step.collective_bytes[gathers]


@pytest.mark.parametrize("name", ["debug_vanilla.toml", "debug_mor.toml"])
def test_a_train_step_issues_no_host_sync(name):
    """Vanilla and expert top-k: nothing in forward, backward, clipping or the (fused, on GPU) update makes
    the host wait for the device."""
    est = estimate(config(name), 2)
    assert not est.step.host_syncs, est.step.host_syncs


def test_host_syncs_are_seen():
    """nonfinite = "skip" reads the grad norm on the host every step: the trace counts it."""
    est = estimate(config("debug_vanilla.toml", "--training.nonfinite=skip"), 2)
    assert est.step.host_syncs["_local_scalar_dense"] >= 1


def test_a_run_that_does_not_fit_gets_a_setting_that_does(monkeypatch):
    """On a card too small for the configured micro-batch without checkpointing, the suggestion (least
    checkpointing first, then the largest micro-batch) fits when traced as configured."""
    from mor_pretrain import estimate as E

    cfg = config("debug_mor.toml", "--training.global_batch_size=16", "--parallelism.activation_checkpoint=none")
    est = estimate(cfg, 2)
    assert est.micro_batch == 4 and est.accumulation == 2
    card = E.GPU("small", 1e15, 1e15, 1e12, 0.75 * est.memory.total / (1 - MARGIN), 1e11, 1e10)
    monkeypatch.setattr(E, "GPUS", {"small": card})
    found = E.fitting_settings(cfg, 2, est)["small"]
    assert found is not None and found.micro_batch_size < 4
    again = estimate(
        config(
            "debug_mor.toml",
            "--training.global_batch_size=16",
            f"--parallelism.activation_checkpoint={found.activation_checkpoint}",
            f"--training.micro_batch_size={found.micro_batch_size}",
        ),
        2,
    )
    assert again.memory.total <= card.memory_bytes * (1 - MARGIN)
    assert again.memory.total == pytest.approx(found.peak_bytes, rel=0.05)
    assert "fits with --parallelism.activation_checkpoint=" in E.fit_report({"small": found})


@pytest.mark.slow  # up to 25 s per config on 2 cores
@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "train_configs").glob("*.toml")))
def test_every_config_fits_an_80gb_card_with_ten_percent_free(name):
    """On one 8-GPU node (the fewest ranks to shard over, so the most memory per rank) where the batch
    divides, with gradient accumulation's unsharded gradients counted."""
    cfg = config(name)
    t = cfg.training
    est = estimate(cfg, next(w for w in (8, 4, 2, 1) if t.global_batch_size % (w * t.micro_batch_size) == 0))
    assert MARGIN >= 0.10
    assert predict(est, GPUS["H100"], cfg.training.dtype).fits, (name, est.memory)
