"""The dry run's traced step (mor_pretrain.estimate): its memory against a real run of the same step, the
collectives it sees, host syncs, and every shipped config against an 80 GB card."""

from pathlib import Path

import pytest
import torch

from mor_pretrain.config import load_config
from mor_pretrain.estimate import GPUS, MARGIN, estimate, predict
from mor_pretrain.trainer import size_vocabulary

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


def config(name: str, *overrides: str):
    cfg = load_config(str(ROOT / "train_configs" / name), ["--data.tokenizer=default", *overrides])
    size_vocabulary(cfg)
    return cfg


# Real steps on one H100 with torch 2.11 (../shared/DISTRIBUTED_FACTS.md: a plain training loop, bf16, per-block
# compile, SDPA, fused AdamW, batch 16 x 2048, no activation checkpointing, untied head), and the overrides
# that give the shipped configs those settings. docs/BENCHMARKS.md holds the same table.
MEASURED_H100_STEP_S = {"vanilla_360m.toml": 0.241, "mor_360m.toml": 0.183, "recursive_360m.toml": 0.251}
H100_LOOP = ("--model.tie_embeddings=false", "--training.global_batch_size=16", "--training.micro_batch_size=16")


@pytest.mark.slow  # about 15 s per config on 2 cores
@pytest.mark.parametrize("name", sorted(MEASURED_H100_STEP_S))
def test_estimated_step_is_within_10_percent_of_the_measured_h100_step(name):
    est = estimate(config(name, *H100_LOOP), 1)
    assert est.compiled and est.accumulation == 1
    step = predict(est, GPUS["H100"], "bfloat16").step_s
    measured = MEASURED_H100_STEP_S[name]
    assert abs(step - measured) <= 0.10 * measured, (name, step, measured)


@pytest.mark.parametrize(
    "overrides",
    [
        ("--model.num_recursions=1", "--model.router=none", "--model.sharing=cycle"),  # vanilla
        ("--model.router=none",),  # fixed-depth recursive
        ("--model.router=none", "--model.recursion_gate=0.5"),
        (),  # expert choice, top-k
        ("--model.tie_embeddings=false", "--model.num_recursions=2"),
    ],
    ids=["vanilla", "recursive", "recursive-gate", "expert-topk", "expert-nr2-untied"],
)
def test_traced_matmul_and_attention_flops_equal_the_executed_flop_count(overrides):
    """The trace counts what the ops do (attention from each call's shapes, causal pairs); flops.py counts
    the model's useful FLOPs from its arguments. Routers whose shapes follow the data (token choice,
    expert-threshold) trace at a made-up depth and are left out; so is KV sharing (masked calls run
    every pair)."""
    from mor_pretrain.flops import executed_flops_per_token

    cfg = config("debug_mor.toml", "--training.global_batch_size=4", *overrides)
    est = estimate(cfg, 1)
    t = cfg.training
    traced = est.step.matmul_flops + sum(est.step.attention_flops.values())
    expected = executed_flops_per_token(cfg.model, t.seq_len) * t.micro_batch_size * t.seq_len
    assert traced == pytest.approx(expected, rel=0.01)


def test_compiled_blocks_move_less_and_keep_less():
    """The fused-traffic model: compiled blocks move fewer bytes than eager ops and keep fewer activations;
    matmul and attention FLOPs do not change."""
    eager = estimate(config("debug_mor.toml", "--parallelism.compile=false"), 1)
    compiled = estimate(config("debug_mor.toml", "--parallelism.compile=true"), 1)
    assert compiled.step.fused_bytes < compiled.step.eager_bytes
    assert compiled.step.eager_bytes == eager.step.eager_bytes
    assert compiled.memory.activations < eager.memory.activations
    assert compiled.step.matmul_flops == eager.step.matmul_flops
    gpu = GPUS["H100"]
    assert predict(compiled, gpu, "float32").memory_s < predict(eager, gpu, "float32").memory_s


def test_device_memory_adds_what_the_allocator_and_the_driver_hold():
    from mor_pretrain.estimate import CUDA_CONTEXT, device_memory

    est = estimate(config("debug_mor.toml"), 2)
    dev = device_memory(est)
    assert dev.allocated == est.memory.total < dev.reserved
    assert dev.device == dev.reserved + CUDA_CONTEXT


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
    room = E.device_memory(est, 0.75 * est.memory.total).device / (1 - MARGIN)
    card = E.GPU("small", 1e15, 1e15, 1e12, room, 1e11, 1e10)
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
    assert E.fits(card, E.device_memory(again))
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
