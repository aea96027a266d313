"""Parallel training equals single-process training: FSDP2 on 2 ranks, dp x tp on 4 ranks, and the
collective count of the shared recursion stack. Workers run on gloo with mp.spawn; the reference is a
plain MoRModel trained in this process on the whole global batch in one forward."""

from __future__ import annotations

import datetime
import math
import os
import time
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import GPU_LIKE_BACKEND, tiny_args
from conftest import spawn as spawn_workers
from torch.distributed.tensor import DTensor

from mor_pretrain.config import JobConfig, OptimizerConfig, ParallelismConfig, TrainingConfig
from mor_pretrain.distributed import barrier
from mor_pretrain.models import MoRModel
from mor_pretrain.optim import build_lr_scheduler, build_optimizer, clip_grad_norm
from mor_pretrain.parallel import build_mesh, dp_coordinates
from mor_pretrain.trainer import IGNORE, Parallel, build_model, forward_context, grad_accumulation, train_step

pytestmark = pytest.mark.distributed

VARIANTS = {
    "vanilla": dict(num_recursions=1, n_layers=4, sharing="cycle"),
    "recursive": dict(router="none"),
    "expert": dict(router="expert"),
    "token": dict(router="token", balancing="loss_free", bias_update_rate=0.05, z_loss_coef=1e-5),
    "expert_threshold": dict(router="expert", expert_rule="threshold", threshold_rate=0.5),
}
STEPS = 3
GLOBAL_BATCH = 4
SEQ = 16


def make_cfg(variant: str, micro: int = 1, tp: int = 1, **par) -> JobConfig:
    return JobConfig(
        model=tiny_args(vocab_size=96, **VARIANTS[variant]),
        training=TrainingConfig(
            steps=STEPS, global_batch_size=GLOBAL_BATCH, micro_batch_size=micro, seq_len=SEQ, dtype="float32"
        ),
        optimizer=OptimizerConfig(lr=1e-2, warmup_fraction=0.0, decay_fraction=0.5, grad_clip=0.5),
        parallelism=ParallelismConfig(tp=tp, **par),
    )


def make_data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(steps, batch, seq) inputs and labels; labels hide a different number of positions per sequence
    so that per-token weighting across micro-batches matters."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 96, (STEPS, GLOBAL_BATCH, SEQ + 1), generator=g)
    labels = tokens[..., 1:].clone()
    for b in range(GLOBAL_BATCH):
        labels[:, b, : 3 * b] = IGNORE
    return tokens[..., :-1], labels


def reference(cfg: JobConfig) -> dict[str, list]:
    """Single process, whole global batch per forward, no parallelism."""
    inputs, labels = make_data()
    torch.manual_seed(cfg.training.seed)
    model = MoRModel(cfg.model)
    model.init_weights()
    opt = build_optimizer(model, cfg.optimizer)
    sched = build_lr_scheduler(opt, cfg.optimizer, cfg.training.steps)
    out_log: dict[str, list] = {"loss": [], "norm": [], "grads": None}
    for s in range(STEPS):
        out = model(inputs[s], labels[s], return_logits=False)
        out.loss.backward()
        norm = clip_grad_norm(list(model.parameters()), cfg.optimizer.grad_clip)
        if s == 0:  # the clipped gradients, as the workers see them in the optimizer's pre-step hook
            out_log["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        sched.step()
        opt.zero_grad()
        model.update_routing(out.router_sums, GLOBAL_BATCH)
        if model.stack.expert_threshold is not None:
            out_log["thresholds"] = model.stack.expert_threshold.tolist()
        out_log["loss"].append(out.loss.item())
        out_log["norm"].append(norm.item())
    return out_log


def run_parallel(cfg: JobConfig) -> dict[str, list]:
    """Inside a worker: the trainer's own setup and train_step on this rank's slice of the same data."""
    inputs, labels = make_data()
    device = torch.device("cpu")
    mesh = build_mesh(cfg.parallelism, "cpu")
    dp_rank, dp_world = dp_coordinates(mesh)
    par = Parallel(device, mesh, dp_rank, dp_world, mesh["tp"].size())
    model = build_model(cfg, mesh, device)
    opt = build_optimizer(model, cfg.optimizer)
    sched = build_lr_scheduler(opt, cfg.optimizer, cfg.training.steps)
    per_rank = GLOBAL_BATCH // dp_world
    micro = cfg.training.micro_batch_size
    assert grad_accumulation(cfg, dp_world) == per_rank // micro
    log: dict[str, list] = {"loss": [], "norm": [], "depth": [], "grads": None}
    for s in range(STEPS):
        lo = dp_rank * per_rank
        batches = [
            {"input": inputs[s, i : i + micro], "labels": labels[s, i : i + micro]}
            for i in range(lo, lo + per_rank, micro)
        ]
        if s == 0:
            with torch.no_grad(), forward_context(par.tp):
                out = model(batches[0]["input"], batches[0]["labels"], return_logits=False)
            log["depth"] = out.depth
        grads: dict[str, torch.Tensor] = {}

        def keep_grads(opt, args, kwargs, grads=grads):
            for n, p in model.named_parameters():
                grads[n] = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()

        handle = opt.register_step_pre_hook(keep_grads) if s == 0 else None
        losses, norm, _ = train_step(model, opt, sched, batches, par, cfg)
        if handle is not None:
            handle.remove()
            log["grads"] = grads
        total = losses.lm + sum(losses.aux.values(), torch.zeros(()))
        log["loss"].append(par.dp_sum(total).item())
        log["norm"].append(norm.item())
        if model.stack.expert_threshold is not None:
            log["thresholds"] = model.stack.expert_threshold.tolist()
    return log


def _entry(rank: int, world: int, init: str, out_dir: Path, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group(
        GPU_LIKE_BACKEND, init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    result = fn(*args)
    torch.save(result, out_dir / f"rank{rank}.pt")
    barrier()
    dist.destroy_process_group()


def spawn(world: int, tmp_path: Path, fn, *args) -> list:
    # A file rendezvous (fresh per launch): no free TCP port to pick and race for.
    init = f"file://{tmp_path}/rendezvous-{uuid.uuid4().hex}"
    spawn_workers(_entry, world, world, init, tmp_path, fn, args)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _fsdp_all_variants(micro: int) -> dict[str, dict]:
    return {v: run_parallel(make_cfg(v, micro=micro)) for v in VARIANTS}


@pytest.mark.parametrize("micro", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["micro1-accum2", "micro2-accum1"])
def test_fsdp_two_ranks_match_single_process(tmp_path, micro):
    """Same losses, grad norms and first-step gradients as one process on the whole batch, for vanilla,
    expert-choice and token-choice MoR, whether each rank accumulates 2 micro-batches or runs 1."""
    results = spawn(2, tmp_path, _fsdp_all_variants, micro)
    for variant in VARIANTS:
        ref = reference(make_cfg(variant))
        got = results[0][variant]
        assert got["loss"] == pytest.approx(ref["loss"], abs=2e-5), variant
        assert got["norm"] == pytest.approx(ref["norm"], rel=1e-4), variant
        for name, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], g, atol=2e-6, rtol=1e-4, msg=f"{variant}: {name}")
        assert results[1][variant]["loss"] == got["loss"]
        if "thresholds" in ref:  # expert-threshold: every rank moves them by the global batch's k-th scores
            assert got["thresholds"] == pytest.approx(ref["thresholds"], abs=1e-4), variant  # scores: fp32 noise
            assert results[1][variant]["thresholds"] == got["thresholds"]


def untied(cfg: JobConfig) -> JobConfig:
    cfg.model.tie_embeddings = False
    return cfg


def _hsdp_ac_untied() -> dict[str, dict]:
    out = {"hsdp": run_parallel(make_cfg("expert", dp_replicate=2, dp_shard=1))}
    for mode in ("full", "selective"):
        out[f"ac-{mode}"] = run_parallel(make_cfg("expert", activation_checkpoint=mode))
    out["untied-fsdp"] = run_parallel(untied(make_cfg("expert")))
    out["untied-tp"] = run_parallel(untied(make_cfg("expert", tp=2, dp_shard=1)))
    return out


@pytest.mark.slow  # about 40 s
def test_hsdp_ac_and_untied_head_match_single_process(tmp_path):
    """HSDP (2 replicas of 1 shard), FSDP with full / selective activation checkpointing, and an untied
    head (its own embedding unit under FSDP; a vocab-sharded head weight under TP)."""
    results = spawn(2, tmp_path, _hsdp_ac_untied)[0]
    for name, got in results.items():
        ref = reference(untied(make_cfg("expert")) if name.startswith("untied") else make_cfg("expert"))
        assert got["loss"] == pytest.approx(ref["loss"], abs=2e-5), name
        assert got["norm"] == pytest.approx(ref["norm"], rel=1e-4), name
        for pname, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][pname], g, atol=2e-6, rtol=1e-4, msg=f"{name}: {pname}")


def _dp_tp() -> dict:
    import mor_pretrain.models.mor as mor

    mor.LOGITS_CHUNK_ELEMENTS = 96 * 6  # the LM loss in slices of 6 tokens, vocab-sharded under loss_parallel
    return run_parallel(make_cfg("expert", micro=1, tp=2, dp_shard=2))


@pytest.mark.slow  # 4 processes on 2 cores: about 45 s
def test_dp2_tp2_matches_single_process(tmp_path):
    """dp_shard=2 x tp=2 on 4 ranks, the LM loss sliced: losses, grad norm and gradients match one process
    (unsliced), and the two TP ranks of each data shard make identical routing decisions."""
    results = spawn(4, tmp_path, _dp_tp)
    ref = reference(make_cfg("expert"))
    for r in results:
        # Adam's normalized updates amplify fp32 reduction-order noise a little by step 3
        assert r["loss"] == pytest.approx(ref["loss"], abs=1e-4)
        assert r["norm"] == pytest.approx(ref["norm"], rel=1e-4)
    for name, g in ref["grads"].items():
        torch.testing.assert_close(results[0]["grads"][name], g, atol=2e-6, rtol=1e-4, msg=name)
    # mesh (1, 2, 2): ranks 0,1 share a data shard, so do ranks 2,3
    assert torch.equal(results[0]["depth"], results[1]["depth"])
    assert torch.equal(results[2]["depth"], results[3]["depth"])
    assert not torch.equal(results[0]["depth"], results[2]["depth"])


def _count_collectives(wrap_shared_layer: bool) -> dict[int, tuple[int, int]]:
    """All-gathers and reduce-scatters in one training step, per Nr (one shared layer per recursion)."""
    calls = {"ag": 0, "rs": 0}
    # FSDP2 calls all_gather_into_tensor / reduce_scatter_tensor on older torch and the *_single forms
    # on newer ones; neither calls the other, so counting all four counts each collective once.
    kinds = {
        "all_gather_into_tensor": "ag",
        "all_gather_single": "ag",
        "reduce_scatter_tensor": "rs",
        "reduce_scatter_single": "rs",
    }
    real = {name: getattr(dist, name) for name in kinds if hasattr(dist, name)}

    def counting(name):
        def call(*a, **k):
            calls[kinds[name]] += 1
            return real[name](*a, **k)

        return call

    for name in real:
        setattr(dist, name, counting(name))
    counts = {}
    for nr in (2, 3, 4):
        cfg = make_cfg("vanilla", reshard_after_forward="always")  # the backward gathers again: counted too
        cfg.model = tiny_args(vocab_size=96, num_recursions=nr, n_layers=2 + nr)
        mesh = build_mesh(cfg.parallelism, "cpu")
        if wrap_shared_layer:
            # the wrapping we avoid: the shared layer as its own unit, gathered once per application
            from torch.distributed.fsdp import fully_shard

            import mor_pretrain.parallel as parallel

            real_apply = parallel.apply_fsdp

            def apply_fsdp(model, mesh, *a, real_apply=real_apply):
                fully_shard(model.stack.layers[0], mesh=mesh["dp_shard"])
                real_apply(model, mesh, *a)

            parallel.apply_fsdp = apply_fsdp
        model = build_model(cfg, mesh, torch.device("cpu"))
        if wrap_shared_layer:
            parallel.apply_fsdp = real_apply
        tokens = torch.randint(0, 96, (2, SEQ))
        for _ in range(2):  # the second step is the steady state
            calls.update(ag=0, rs=0)
            model(tokens, tokens).loss.backward()
        counts[nr] = (calls["ag"], calls["rs"])
    for name, fn in real.items():
        setattr(dist, name, fn)
    return counts


def _both_wrappings() -> tuple[dict, dict]:
    return _count_collectives(False), _count_collectives(True)


def test_shared_stack_collectives_do_not_grow_with_recursions(tmp_path):
    ours, naive = spawn(2, tmp_path, _both_wrappings)[0]
    # units: root (kept gathered through backward), first, stack, last. Forward gathers each once; backward
    # re-gathers first, stack, last; each unit reduce-scatters once.
    assert ours == {2: (7, 4), 3: (7, 4), 4: (7, 4)}
    # The naive wrapping's count grows with Nr: this is what the test would catch.
    assert naive[2][0] < naive[3][0] < naive[4][0]


# ---------------------------------------------------------------------------------------------------
# Every scalar the trainer writes is a property of the global batch, not of the layout


class GlobalBatchLoader:
    """A stand-in for build_dataloader: rank r of W takes the r-th contiguous share of each fixed global
    batch, in micro-batches, so every layout trains (and validates) on the same global batches."""

    def __init__(
        self, split: str, dp_rank: int, dp_world: int, micro: int, global_batch: int, steps: int, delay: float = 0.0
    ):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        self.tokens = torch.randint(0, 96, (steps, global_batch, SEQ + 1), generator=g)
        self.labels = self.tokens[..., 1:].clone()
        for b in range(global_batch):
            self.labels[:, b, : 3 * b] = IGNORE  # unequal scored tokens per sequence
        per_rank = global_batch // dp_world
        self.rows = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        self.micro, self.delay = micro, delay

    def __iter__(self):
        for step in range(len(self.tokens)):
            for i in range(self.rows.start, self.rows.stop, self.micro):
                time.sleep(self.delay)  # a slow loader, for the data-time figures
                yield {
                    "input": self.tokens[step, i : i + self.micro, :-1],
                    "labels": self.labels[step, i : i + self.micro],
                }

    def __len__(self) -> int:
        return len(self.tokens) * len(range(self.rows.start, self.rows.stop, self.micro))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        pass


# Scalars that describe one rank or the machine, not the global batch: time and throughput depend on
# the layout by nature, memory is per process, the max loss over ranks is a per-rank loss (on one rank
# it is the global loss), and the checkpoint stall is a time.
PER_RANK_TAGS = {
    "perf/tokens_per_s",
    "perf/tokens_per_s_per_device",
    "perf/step_time_s",
    "perf/data_time_s",
    "perf/data_share",
    "perf/tflops_per_device",
    "perf/val_time_s",
    "mem/max_rss_gib",
    "mem/max_rss_share",
    "train/lm_loss_max_rank",
    "checkpoint/stall_s",
}
LOADER_DELAY_S = 0.05  # per train micro-batch
LAYOUT_VARIANTS = ("expert", "token", "expert_threshold")
LAYOUTS = {  # world size, micro-batch, parallelism: 4 sequences per step, split three ways
    "1 rank": (1, 2, {}),
    "dp2": (2, 1, {}),
    "dp2 x tp2": (4, 2, {"tp": 2, "dp_shard": 2}),
}


def _train_layouts(out: Path, micro: int, par: dict) -> None:
    import mor_pretrain.trainer as trainer

    rank, world = dist.get_rank(), dist.get_world_size()
    for i, variant in enumerate(LAYOUT_VARIANTS):
        if i:  # train() leaves the process group at its end; join a fresh one for the next run
            dist.init_process_group(
                GPU_LIKE_BACKEND, init_method=f"file://{out}/rendezvous-{variant}", rank=rank, world_size=world
            )
        cfg = make_cfg(variant, micro=micro, **par)
        cfg.name, cfg.run_root = variant, str(out)
        cfg.training.steps, cfg.training.val_interval, cfg.training.device = 2, 1, "cpu"
        cfg.training.val_batches = 1  # one global batch: the same 4 val sequences on every layout
        cfg.metrics.log_interval = 1

        def loader(data, split, dp_world, seed, seq_len, micro_batch_size, dp_rank, val_windows=0):
            delay = LOADER_DELAY_S if split == "train" else 0.0
            steps = 8 if split == "train" else val_windows // GLOBAL_BATCH
            return GlobalBatchLoader(split, dp_rank, dp_world, micro_batch_size, GLOBAL_BATCH, steps, delay)

        trainer.build_dataloader = loader
        trainer.size_vocabulary = lambda cfg: None  # the stand-in data has no tokenizer: ids < vocab_size
        trainer.train(cfg)


def _spawned_train(rank: int, world: int, init: str, out: Path, micro: int, par: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group(
        GPU_LIKE_BACKEND, init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    _train_layouts(out, micro, par)


@pytest.mark.slow  # 7 processes in three launches, two runs each: about a minute on 2 cores
def test_every_logged_scalar_is_the_same_on_any_layout(tmp_path):
    """The same global batches on 1 rank (2 micro-batches), 2 ranks (2 each) and dp2 x tp2 (1 each): the
    TensorBoard scalars the trainer writes (losses, aux losses, routing statistics, grad norm, validation,
    counters) agree within fp32 noise, for expert and token choice. Only per-rank figures may differ."""
    from mor_pretrain.isoflop import read_scalars

    logged = {}
    for name, (world, micro, par) in LAYOUTS.items():
        out = tmp_path / name.replace(" ", "")
        out.mkdir()
        init = f"file://{out}/rendezvous-{uuid.uuid4().hex}"
        spawn_workers(_spawned_train, world, world, init, out, micro, par)
        logged[name] = {v: read_scalars(out / v / "tb") for v in LAYOUT_VARIANTS}
    ref = logged["1 rank"]
    for name, (world, micro, par) in LAYOUTS.items():
        for variant, tb in logged[name].items():
            check_per_rank_figures(tb, world, micro, world // par.get("tp", 1), variant)
    for variant in LAYOUT_VARIANTS:
        tags = set(ref[variant])
        expert = variant.startswith("expert")
        per_token = variant != "expert"  # training routes token by token: its depths are logged
        depth_tags = {"routing/mean_depth", "routing/tokens_per_depth/1"} if per_token else set()
        depth_tags |= {"val/causal_mean_depth", "val/causal_depth/1"} if expert else set()
        depth_tags |= {"routing/threshold/1"} if variant == "expert_threshold" else set()
        assert depth_tags | {"val/loss_causal", "train/grad_norm"} <= tags
        fits = "sampling_acc" in MoRModel(make_cfg(variant).model)(make_data()[0][0]).stats  # the router's top-k BCE
        assert ("routing/maxvio" in tags) == (variant == "token") and ("routing/sampling_acc" in tags) == fits
        for name, got in logged.items():
            assert set(got[variant]) == tags, (name, variant, set(got[variant]) ^ tags)
            for tag in sorted(tags - PER_RANK_TAGS):
                assert got[variant][tag].keys() == ref[variant][tag].keys(), (name, variant, tag)
                for step, value in ref[variant][tag].items():
                    assert got[variant][tag][step] == pytest.approx(value, rel=1e-4, abs=1e-5), (
                        name,
                        variant,
                        tag,
                        step,
                    )


def check_per_rank_figures(tb: dict, world: int, micro: int, dp: int, variant: str) -> None:
    """Data time, achieved FLOP/s, memory share and the max loss over ranks, against their definitions."""
    from mor_pretrain.flops import executed_flops_per_token
    from mor_pretrain.metrics import physical_memory

    accum = GLOBAL_BATCH // (micro * dp)
    fpt = executed_flops_per_token(make_cfg(variant).model, SEQ)
    done = 0.0
    for step, step_s in tb["perf/step_time_s"].items():  # log_interval = 1: one step per window
        assert tb["perf/data_time_s"][step] >= accum * LOADER_DELAY_S and tb["perf/val_time_s"][step] > 0
        assert tb["perf/data_share"][step] == pytest.approx(tb["perf/data_time_s"][step] / step_s, rel=1e-5)
        assert tb["perf/tokens_per_s_per_device"][step] == pytest.approx(tb["perf/tokens_per_s"][step] / world)
        step_flops, done = tb["progress/flops_executed"][step] - done, tb["progress/flops_executed"][step]
        if variant == "expert":  # top-k capacities; routers that decide per token charge the depths run
            assert step_flops == pytest.approx(fpt * GLOBAL_BATCH * SEQ, rel=1e-6)
        else:
            cfg = make_cfg(variant)
            ran = [tb[f"routing/tokens_per_depth/{d}"][step] for d in range(cfg.model.num_recursions + 1)]
            charged = executed_flops_per_token(cfg.model, SEQ, ran) * GLOBAL_BATCH * SEQ
            assert step_flops == pytest.approx(charged, rel=1e-5)
        tflops = step_flops / (step_s * world) / 1e12
        assert tb["perf/tflops_per_device"][step] == pytest.approx(tflops, rel=1e-4)
        share = tb["mem/max_rss_gib"][step] * 2**30 / physical_memory()
        assert tb["mem/max_rss_share"][step] == pytest.approx(share, rel=1e-5)
        top, lm = tb["train/lm_loss_max_rank"][step], tb["train/lm_loss"][step]
        assert top == pytest.approx(lm, rel=1e-6) if dp == 1 else top > lm  # ranks' halves differ


def strong_gates(cfg: JobConfig) -> JobConfig:
    cfg.model.router_alpha = 1.0  # at init, routing then changes the loss visibly
    return cfg


def _validate_both_modes() -> dict[str, dict[str, float]]:
    from mor_pretrain.trainer import validate

    out = {}
    for variant in ("expert", "token"):
        cfg = strong_gates(make_cfg(variant))
        mesh = build_mesh(cfg.parallelism, "cpu")
        dp_rank, dp_world = dp_coordinates(mesh)
        par = Parallel(torch.device("cpu"), mesh, dp_rank, dp_world, 1)
        model = build_model(cfg, mesh, par.device)
        out[variant] = validate(model, GlobalBatchLoader("val", dp_rank, dp_world, 1, GLOBAL_BATCH, steps=8), 2, par)
    return out


def test_validation_logs_the_causal_and_the_topk_loss(tmp_path):
    """On 2 ranks, val/loss_causal and val/loss_topk equal one process's token-weighted loss over the
    same 4 sequences in each routing mode; token choice routes the same way in both."""
    got = spawn(2, tmp_path, _validate_both_modes)[0]
    loader = GlobalBatchLoader("val", 0, 1, GLOBAL_BATCH, GLOBAL_BATCH, steps=8)
    batch = next(iter(loader))
    for variant in ("expert", "token"):
        cfg = strong_gates(make_cfg(variant))
        torch.manual_seed(cfg.training.seed)
        model = MoRModel(cfg.model)
        model.init_weights()
        ref = {}
        for mode in ("causal", "topk"):
            with torch.no_grad():
                logits = model(batch["input"], routing=mode).logits
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
            ref[mode] = ce.item() / (batch["labels"] != IGNORE).sum().item()
            assert got[variant][f"val/loss_{mode}"] == pytest.approx(ref[mode], rel=1e-6), (variant, mode)
            assert got[variant][f"val/ppl_{mode}"] == pytest.approx(math.exp(ref[mode]), rel=1e-5)
        if variant == "expert":
            assert abs(ref["topk"] - ref["causal"]) > 20e-6 * ref["topk"]  # the modes differ beyond the tolerance
        else:
            assert got[variant]["val/loss_topk"] == got[variant]["val/loss_causal"]


def _rope_dtypes() -> dict[str, list[torch.dtype]]:
    import mor_pretrain.models.layers as layers

    seen: dict[str, list[torch.dtype]] = {"x": [], "rope": [], "out": []}
    real = layers.apply_rope

    def recording(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        out = real(x, rope)
        for key, t in (("x", x), ("rope", rope), ("out", out)):
            seen[key].append(t.dtype)
        return out

    layers.apply_rope = recording
    cfg = make_cfg("expert")
    cfg.training.dtype = "bfloat16"
    mesh = build_mesh(cfg.parallelism, "cpu")
    model = build_model(cfg, mesh, torch.device("cpu"))
    inputs, labels = make_data()
    model(inputs[0], labels[0], return_logits=False).loss.backward()
    return seen


def test_rope_table_stays_fp32_under_bf16_fsdp(tmp_path):
    """FSDP2 casts floating forward inputs to the param dtype by default; the RoPE table is an input of
    the blocks and the stack, and must reach the rotation in fp32 (queries and keys stay bf16)."""
    seen = spawn(2, tmp_path, _rope_dtypes)[0]
    assert seen["rope"] and set(seen["rope"]) == {torch.float32}
    assert set(seen["x"]) == set(seen["out"]) == {torch.bfloat16}


def _all_skipped(out: Path) -> str:
    import mor_pretrain.trainer as trainer

    cfg = make_cfg("expert")
    cfg.name, cfg.run_root = "skipped", str(out)
    cfg.training.nonfinite, cfg.training.device, cfg.training.steps = "skip", "cpu", 2
    cfg.metrics.log_interval = 1
    trainer.build_dataloader = lambda data, split, dp_world, seed, seq_len, micro_batch_size, dp_rank, **kw: (
        GlobalBatchLoader(split, dp_rank, dp_world, micro_batch_size, GLOBAL_BATCH, 8, 0.0)
    )
    trainer.size_vocabulary = lambda cfg: None
    trainer.clip_grad_norm = lambda params, max_norm: torch.tensor(float("nan"))  # every step non-finite
    with pytest.raises(FloatingPointError, match=r"every step of this launch \(1 to 2\) .* was skipped") as e:
        trainer.train(cfg)
    assert not (out / "skipped" / "export").exists()
    return str(e.value)


def test_a_run_whose_every_step_was_skipped_fails(tmp_path):
    """nonfinite = "skip" with NaN at every step (e.g. a broken setting): the run must not exit 0 and
    export its untrained weights as if it had trained."""
    assert "nothing was trained" in spawn(1, tmp_path, _all_skipped, tmp_path)[0]
