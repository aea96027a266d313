"""Single-process pieces of the trainer: schedules, parameter groups, grad norm, mesh shapes, MFU peaks,
activation checkpointing and regional compile."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model

from mor_pretrain.config import ConfigError, JobConfig, OptimizerConfig, ParallelismConfig, TrainingConfig
from mor_pretrain.metrics import count_fractions, memory_stats, peak_flops, physical_memory, reduce_scalars
from mor_pretrain.optim import clip_grad_norm, grad_norm, lr_factor, param_groups
from mor_pretrain.parallel import apply_ac, apply_compile, mesh_shape
from mor_pretrain.trainer import TrainState, gate_stats, grad_accumulation


def test_wsd_schedule_is_a_trapezoid():
    cfg = OptimizerConfig(schedule="wsd", warmup_fraction=0.1, decay_fraction=0.2, min_lr_ratio=0.1)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert all(x == 1.0 for x in f[10:80])  # stable
    assert f[80] == pytest.approx(1 - 0.9 / 20) and f[99] == pytest.approx(0.1)  # linear decay, last 20
    assert all(a > b for a, b in zip(f[80:], f[81:], strict=False))


def test_cosine_schedule_ends_at_min_lr():
    cfg = OptimizerConfig(schedule="cosine", warmup_fraction=0.0, min_lr_ratio=0.0)
    f = [lr_factor(s, 50, cfg) for s in range(50)]
    assert f[-1] == pytest.approx(0.0, abs=1e-12)
    assert f[24] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 25 / 50)).item()))
    assert all(a >= b for a, b in zip(f, f[1:], strict=False))


@pytest.mark.parametrize("schedule", ["wsd", "cosine", "constant"])
def test_schedules_survive_tiny_runs(schedule):
    """A few steps round the warmup and decay lengths to 0 or 1; the scheduler also evaluates step == total."""
    cfg = OptimizerConfig(schedule=schedule, warmup_fraction=0.05, decay_fraction=0.2)
    for total in range(1, 8):
        for step in range(total + 1):
            assert 0.0 <= lr_factor(step, total, cfg) <= 1.0


@pytest.mark.parametrize("tied", [True, False])
def test_param_groups_skip_norms_and_embeddings(tied):
    model = tiny_model(router="expert", tie_embeddings=tied)
    decay, no_decay = param_groups(model, decay_all=False)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0
    assert "tok_embeddings.weight" in kept and "norm.weight" in kept
    assert all("norm" not in n for n in decayed)
    assert "stack.layers.0.attention.wq.weight" in decayed and "stack.routers.0.net.weight" in decayed
    assert ("output.weight" in decayed) == (not tied)
    assert len(decayed) + len(kept) == len(list(model.parameters()))
    all_decay, none = param_groups(model, decay_all=True)
    assert len(all_decay["params"]) == len(list(model.parameters())) and not none["params"]


def test_grad_norm_and_clipping_match_torch():
    model = tiny_model(router="expert")
    model(torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))).loss.backward()
    params = list(model.parameters())
    expected = torch.cat([p.grad.flatten() for p in params]).double().norm()
    assert grad_norm(params).item() == pytest.approx(expected.item(), rel=1e-6)
    norm = clip_grad_norm(params, 0.1 * expected.item())
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    assert grad_norm(params).item() == pytest.approx(0.1 * expected.item(), rel=1e-4)


def test_mesh_shape_checks_the_world_size():
    assert mesh_shape(ParallelismConfig(dp_shard=-1, tp=2), 8) == (1, 4, 2)
    assert mesh_shape(ParallelismConfig(dp_replicate=2, dp_shard=2, tp=1), 4) == (2, 2, 1)
    with pytest.raises(ConfigError, match="does not equal the world size 4"):
        mesh_shape(ParallelismConfig(dp_shard=2, tp=4), 4)
    with pytest.raises(ConfigError, match="not divisible"):
        mesh_shape(ParallelismConfig(dp_shard=-1, tp=3), 4)


def test_grad_accumulation_needs_whole_micro_batches():
    cfg = JobConfig(training=TrainingConfig(global_batch_size=16, micro_batch_size=4))
    assert grad_accumulation(cfg, 2) == 2
    with pytest.raises(ConfigError, match="multiple of training.micro_batch_size"):
        grad_accumulation(cfg, 3)


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H200 NVL", 835.0),  # not the SXM figure
        ("NVIDIA H800", 989.0),
        ("NVIDIA H800 PCIe", 756.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100-PCIE-40GB", 312.0),
        ("NVIDIA L40", 181.0),  # not the L4
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA B200", 2250.0),
        ("AMD Instinct MI300X", 1307.0),
        ("NVIDIA RTX 6000 Ada Generation", None),
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None),  # a slice of the card: its peak is not the card's
        ("NVIDIA H100 PCIe NVL", None),
    ],
)
def test_peak_table_matches_whole_words(name, tflops):
    from mor_pretrain.metrics import table_peak

    assert table_peak(name) == tflops


def test_peak_table_override_and_unknown_device(caplog):
    assert peak_flops("NVIDIA H100 80GB HBM3", 0.0) == 989e12
    assert peak_flops("cpu", 2.5) == 2.5e12
    with caplog.at_level(logging.WARNING):
        assert peak_flops("cpu", 0.0) is None
    assert "MFU is not reported" in caplog.text


def test_deterministic_cuda_sets_the_cublas_workspace_or_refuses_a_wrong_one(monkeypatch):
    """cuBLAS raises at its first matmul under deterministic algorithms unless CUBLAS_WORKSPACE_CONFIG is
    set; the trainer sets it (before any matmul) and refuses a value that is not deterministic."""
    from mor_pretrain.trainer import configure_determinism

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        configure_determinism(torch.device("cuda"))
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and torch.are_deterministic_algorithms_enabled()
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        configure_determinism(torch.device("cuda"))
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
        with pytest.raises(ConfigError, match="CUBLAS_WORKSPACE_CONFIG=:4096:8"):
            configure_determinism(torch.device("cuda"))
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
        configure_determinism(torch.device("cpu"))  # the CPU needs no workspace setting
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    finally:
        torch.use_deterministic_algorithms(before)


def test_count_fractions_and_the_global_maxvio():
    counts = {"count/tokens_per_depth/1": 1.0, "count/tokens_per_depth/0": 0.0, "count/tokens_per_depth/2": 3.0}
    counts |= {f"count/tc_load/{i}": x for i, x in enumerate([6.0, 2.0, 0.0, 4.0])}
    got = count_fractions(counts)
    assert got == {
        "routing/tokens_per_depth/0": 0.0,
        "routing/tokens_per_depth/1": 0.25,
        "routing/tokens_per_depth/2": 0.75,
        "routing/maxvio": pytest.approx(6 / 3 - 1),  # max load over the mean load of 3
    }


def test_gate_stats_are_each_steps_mean_and_spread_over_the_tokens_that_ran_it():
    gates = [torch.tensor([0.05, 0.05, 0.07, 0.03]), torch.tensor([0.09, 0.01])]
    # Two micro-batches' moments, summed as the trainer sums them: the stats are the whole batch's.
    halves = [[g[: len(g) // 2] for g in gates], [g[len(g) // 2 :] for g in gates]]
    c = 0.05
    moments = sum(
        torch.tensor([[len(g), c * len(g), (g - c).sum(), (g - c).square().sum()] for g in half]) for half in halves
    )
    got = {k: v.item() for k, v in gate_stats({"gate_moments": moments, "depth_counts": torch.ones(3)}).items()}
    assert got == {
        "routing/gate_mean/0": pytest.approx(0.05),
        "routing/gate_mean/1": pytest.approx(0.05),
        "routing/gate_std/0": pytest.approx(gates[0].std(correction=0).item(), abs=1e-6),
        "routing/gate_std/1": pytest.approx(0.04, abs=1e-6),
    }
    assert gate_stats({"depth_counts": torch.ones(3)}) == {}


def test_reduce_scalars_without_a_process_group():
    got = reduce_scalars({"a": torch.tensor(2.5)}, {"b": torch.tensor([4.0])}, replicas=2)
    assert got == {"a": 2.5, "b": 4.0}


def test_cpu_memory_is_peak_rss_and_its_share_of_physical_memory():
    got = memory_stats(torch.device("cpu"))
    assert set(got) == {"max_rss_gib", "max_rss_share"}
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():  # Linux: sysconf's physical pages are MemTotal
        total_kib = int(
            next(line for line in meminfo.read_text().splitlines() if line.startswith("MemTotal")).split()[1]
        )
        assert physical_memory() == total_kib * 1024
    assert got["max_rss_share"] == pytest.approx(got["max_rss_gib"] * 2**30 / physical_memory())
    assert 0 < got["max_rss_share"] < 1


def test_cuda_memory_reports_share_retries_and_ooms(monkeypatch):
    """The CUDA path against a stand-in allocator (the gpu test below checks a real device)."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda d: {"num_alloc_retries": 3, "num_ooms": 1})
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 30 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: 40 * gib)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 * gib))
    got = memory_stats(torch.device("cuda", 0))
    assert got == {
        "max_allocated_gib": 30.0,
        "max_reserved_gib": 40.0,
        "max_reserved_share": 0.5,
        "alloc_retries": 3.0,
        "ooms": 1.0,
    }


@pytest.mark.gpu
def test_cuda_memory_on_a_real_device():
    device = torch.device("cuda", 0)
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    got = memory_stats(device)
    del x
    assert got["max_allocated_gib"] >= 0.25 and 0 < got["max_reserved_share"] <= 1
    assert got["alloc_retries"] >= 0 and got["ooms"] >= 0


def test_train_state_round_trip():
    s = TrainState(step=7, tokens_seen=1024, flops_paper=1.5e12, flops_executed=4.5e12)
    t = TrainState()
    t.load_state_dict(s.state_dict())
    assert t == s


def _grads_and_aux(model, tokens, labels):
    out = model(tokens, labels, return_logits=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    losses = {**out.aux_losses, **out.side_losses}
    return out.loss.detach(), {k: v.detach() for k, v in losses.items()}, grads, out.depth


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("kv_mode", ["recursion", "share"])
def test_activation_checkpointing_keeps_grads_and_aux_losses(mode, kv_mode):
    tokens, labels = torch.randint(0, 97, (2, 24)), torch.randint(0, 97, (2, 24))
    ref = tiny_model(router="expert", kv_mode=kv_mode, aux_router=True, z_loss_coef=1e-3)
    ac = copy.deepcopy(ref)
    apply_ac(ac, mode)
    loss0, aux0, grads0, depth0 = _grads_and_aux(ref, tokens, labels)
    loss1, aux1, grads1, depth1 = _grads_and_aux(ac, tokens, labels)
    assert set(aux1) == set(aux0) == {"router_bce", "router_z", "aux_router_bce"}
    for k in aux0:
        torch.testing.assert_close(aux1[k], aux0[k], rtol=0, atol=0)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert torch.equal(depth1, depth0)
    assert set(grads1) == set(grads0)
    for n, g in grads0.items():
        torch.testing.assert_close(grads1[n], g, rtol=1e-5, atol=1e-7, msg=n)
    assert [n for n, _ in ac.named_parameters()] == [n for n, _ in ref.named_parameters()]


@pytest.mark.slow  # inductor compiles on CPU: about 30 s cold
def test_regional_compile_matches_eager_and_stops_recompiling():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    ref = tiny_model(router="expert")
    compiled = copy.deepcopy(ref)
    apply_compile(compiled)
    batches = [(torch.randint(0, 97, (2, 24)), torch.randint(0, 97, (2, 24))) for _ in range(4)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (ref, compiled)]
    graphs = []
    for tokens, labels in batches:
        losses = []
        for model, opt in zip((ref, compiled), opts, strict=True):
            loss = model(tokens, labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], abs=1e-4)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0, "nothing was compiled"
    assert graphs[1] == graphs[2] == graphs[3], f"recompiled after the first steps: {graphs}"


def test_every_config_validates_at_a_small_share_of_training():
    """A study's runs must log validation losses (the isoFLOP report reads them), at a cost that stays
    small: for the paper shapes, under 1% of the training FLOPs on any layout, counting both
    routing passes of expert choice (its causal pass runs every step at full length)."""
    from mor_pretrain.config import load_config
    from mor_pretrain.flops import executed_flops_per_token

    root = Path(__file__).resolve().parents[1] / "train_configs"
    configs = sorted(root.glob("*.toml"))
    assert len(configs) >= 14
    for path in configs:
        cfg = load_config(path)
        t, a = cfg.training, cfg.model
        assert t.val_interval > 0 and t.val_batches >= 1, path.name
        if path.name.startswith("debug"):
            continue
        fwd = executed_flops_per_token(a, t.seq_len) / 3  # forward + backward is 3 forwards
        if a.router == "expert":
            full_depth = copy.deepcopy(a)
            full_depth.router, full_depth.capacities = "none", []
            fwd += executed_flops_per_token(full_depth, t.seq_len) / 3
        val = t.val_batches * t.global_batch_size * t.seq_len * fwd
        train = t.val_interval * t.global_batch_size * t.seq_len * executed_flops_per_token(a, t.seq_len)
        assert val / train < 0.01, path.name
