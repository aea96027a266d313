"""isoFLOP planning (budgets -> runs -> configs) and reporting (run folders -> table and plots)."""

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest

from mor_pretrain.config import dump_toml, load_config
from mor_pretrain.isoflop import (
    ArmRun,
    arm_name,
    bootstrap_mean,
    budget_groups,
    budget_tag,
    compare_arms,
    load_plan,
    model_family,
    model_variant,
    plan_config,
    plan_sweep,
    read_run,
    seed_tables,
    step_fraction,
    suite_average,
    t_interval,
    verdict,
    write_plan,
    write_report,
    wsd_steps,
)

ROOT = Path(__file__).resolve().parents[1]
PAPER_BATCH = ["--training.global_batch_size=1024", "--training.seq_len=2048"]


def cfg_of(name, *overrides):
    return load_config(ROOT / "train_configs" / f"{name}.toml", [*PAPER_BATCH, *overrides])


def test_paper_budget_gives_published_step_counts():
    (v,) = plan_config(cfg_of("vanilla_360m"), "v", [16.5e18])
    (m,) = plan_config(cfg_of("mor_360m"), "m", [16.5e18])
    assert (v.steps, m.steps) == (9438, 14161)  # paper, 360M at 16.5e18 with 1024 x 2048 tokens per step
    assert v.tokens == 9438 * 1024 * 2048
    assert (v.warmup_steps, v.decay_steps) == (472, 1888)  # 5% and 20% of 9,438
    assert v.non_embedding_params == pytest.approx(315e6, rel=0.02)
    assert v.executed_flops_per_token > 3 * v.paper_flops_per_token  # forward + backward + head
    assert m.family == "mor" and v.family == "vanilla"
    assert plan_config(cfg_of("recursive_360m"), "r", [1e18])[0].family == "recursive"


def test_smaller_budgets_branch_from_the_largest_run():
    big, mid, small = plan_config(cfg_of("vanilla_360m"), "v", [2e18, 16.5e18, 6e18])
    assert [r.budget for r in (big, mid, small)] == [16.5e18, 6e18, 2e18]
    for run, b in ((mid, 6e18), (small, 2e18)):
        assert run.steps == round(b / 833.6e6 / (1024 * 2048))  # the paper's 833.6M FLOPs per token
        assert run.branch_from == big.name
        assert run.branch_step == run.steps - round(0.2 * run.steps)  # where its own decay begins
        assert big.warmup_steps <= run.branch_step <= big.steps - big.decay_steps  # big run still at peak lr
        assert run.warmup_steps == big.warmup_steps  # the shared trunk warmed up once
    assert big.save_steps == sorted([mid.branch_step, small.branch_step])
    assert big.branch_from is None


def test_runs_that_cannot_branch_are_planned_alone():
    # Decay starts before the big run's warmup ends: no checkpoint of the big run is on the shared trunk.
    big, tiny = plan_config(cfg_of("vanilla_360m"), "v", [16.5e18, 2e17])
    assert tiny.steps - tiny.decay_steps < big.warmup_steps
    assert tiny.branch_from is None and big.save_steps == []
    assert tiny.warmup_steps == round(0.05 * tiny.steps)
    # A cosine schedule has no stable phase to branch from.
    runs = plan_config(cfg_of("vanilla_360m", "--optimizer.schedule=cosine"), "v", [16.5e18, 6e18])
    assert all(r.branch_from is None for r in runs)


def test_budget_tags_name_runs_compactly():
    assert [budget_tag(b) for b in (16.5e18, 2e18, 5.35e9, 3e5, 1234.0)] == [
        "1.65e19",
        "2e18",
        "5.35e9",
        "3e5",
        "1.23e3",
    ]


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="planned twice"):
        plan_sweep([("a.toml", cfg_of("mor_360m")), ("b.toml", cfg_of("mor_360m"))], [1e18])
    with pytest.raises(ValueError, match="buys no optimizer step"):
        plan_config(cfg_of("mor_360m"), "m.toml", [1e12])
    with pytest.raises(ValueError, match="distinct"):
        plan_config(cfg_of("mor_360m"), "m.toml", [1e18, 1e18])


def test_step_fraction_survives_floor_and_round():
    for steps in range(1, 400):
        for n in range(0, steps + 1, max(1, steps // 7)):
            f = step_fraction(n, steps)
            assert math.floor(f * steps) == n and round(f * steps) == n and 0.0 <= f <= 1.0


def test_plan_to_config_round_trip(tmp_path):
    sources = {"v.toml": cfg_of("vanilla_360m"), "m.toml": cfg_of("mor_360m", "--run_root=/data/runs")}
    runs = plan_sweep(list(sources.items()), [16.5e18, 6e18, 2e18])
    write_plan(tmp_path, runs, sources)
    reread = load_plan(tmp_path)
    assert [r.name for r in reread] == [r.name for r in runs]
    for r in reread:
        cfg = load_config(tmp_path / r.config)
        assert cfg.name == r.name and cfg.training.steps == r.steps
        assert cfg.run_dir == Path(r.run_dir)
        assert wsd_steps(r.steps, cfg.optimizer.warmup_fraction, cfg.optimizer.decay_fraction) == (
            r.warmup_steps,
            r.decay_steps,
        )
        assert cfg.checkpoint.save_steps == r.save_steps
        # Everything else is the source config's.
        src = sources["m.toml" if r.name.startswith("mor") else "v.toml"]
        assert cfg.model == src.model and cfg.data == src.data and cfg.optimizer.lr == src.optimizer.lr
        if r.branch_from:
            ckpt = Path(src.run_root) / r.branch_from / "checkpoints" / f"step-{r.branch_step:08d}"
            assert cfg.checkpoint.init_from == str(ckpt)
            big = next(b for b in reread if b.name == r.branch_from)
            assert r.branch_step in big.save_steps
        else:
            assert cfg.checkpoint.init_from == ""
    assert load_config(tmp_path / "mor_360m_2e18.toml").checkpoint.init_from.startswith("/data/runs/mor_360m_1.65e19/")


def test_cooldown_schedule_follows_the_big_run_until_it_branches(tmp_path):
    optim = pytest.importorskip("mor_pretrain.optim")
    sources = {"d.toml": load_config(ROOT / "train_configs/debug_mor.toml", ["--model.vocab_size=512"])}
    big, small = plan_sweep(list(sources.items()), [2e11, 6e10])
    write_plan(tmp_path, [big, small], sources)
    cb, cs = (load_config(tmp_path / r.config).optimizer for r in (big, small))
    b = small.branch_step
    assert b is not None and 0 < b < small.steps
    for step in range(b):
        assert (
            optim.lr_factor(step, small.steps, cs)
            == optim.lr_factor(step, big.steps, cb)
            == pytest.approx(min(1.0, (step + 1) / big.warmup_steps))
        )
    decay = [optim.lr_factor(s, small.steps, cs) for s in range(b, small.steps)]
    assert all(x > y for x, y in zip(decay, decay[1:], strict=False)) and decay[-1] == pytest.approx(0.0)


def isoflop_cli(*argv):
    """tools/isoflop.py main(), run in this process (a subprocess would re-import torch)."""
    spec = importlib.util.spec_from_file_location("isoflop_cli", ROOT / "tools/isoflop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in argv])


def test_plan_cli_prints_and_writes(tmp_path, capsys):
    configs = [ROOT / "train_configs/vanilla_360m.toml", ROOT / "train_configs/mor_360m.toml"]
    runs, plan_dir = tmp_path / "runs", tmp_path / "plan"
    batch = ["--global-batch-size", 1024, "--seq-len", 2048]
    rc = isoflop_cli(
        "plan",
        "--budget",
        16.5e18,
        2e18,
        "--configs",
        *configs,
        *batch,
        "--run-root",
        runs,
        "--out",
        plan_dir,
        "--checkpoint.keep_latest=3",
    )
    assert rc == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "| 9438 |" in rows["vanilla_360m_1.65e19"] and "| 14161 |" in rows["mor_360m_1.65e19"]
    assert "vanilla_360m_1.65e19 @" in rows["vanilla_360m_2e18"]
    plan = json.loads((plan_dir / "plan.json").read_text())["runs"]
    names = ["vanilla_360m_1.65e19", "vanilla_360m_2e18", "mor_360m_1.65e19", "mor_360m_2e18"]
    assert [r["name"] for r in plan] == names
    cfg = load_config(plan_dir / plan[3]["config"])
    assert cfg.checkpoint.keep_latest == 3 and cfg.run_root == str(runs)
    assert isoflop_cli("plan", "--budget", 1e18, "--configs", "nope.toml") == 2
    assert "nope.toml" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# reporting, on run folders written the way the trainer and the evaluator write them


def fake_run(
    root, name, config, vals, evals=None, flops_per_step=1e12, tokens_per_step=1024, last_step=None, topk_gap=0.0
):
    """A run folder with config.toml, real TensorBoard event files and optional eval JSON.

    vals: {step: causal val loss}; the top-k loss is topk_gap lower. train/loss and the progress counters
    are logged every step up to last_step (default: the last validation)."""
    from torch.utils.tensorboard import SummaryWriter

    run = Path(root) / name
    run.mkdir(parents=True)
    cfg = load_config(ROOT / "train_configs" / f"{config}.toml", ["--model.vocab_size=512", f"--name={name}"])
    (run / "config.toml").write_text(dump_toml(cfg))
    w = SummaryWriter(str(run / "tb"))
    last = last_step or max(vals)
    for step in range(1, last + 1):
        w.add_scalar("train/loss", 10.0 - step / 10, step)
        if step % 2 == 0 or step == last:  # counters logged on their own cadence
            w.add_scalar("progress/flops_paper", step * flops_per_step, step)
            w.add_scalar("progress/tokens", step * tokens_per_step, step)
        if step in vals:
            w.add_scalar("val/loss_causal", vals[step], step)
            w.add_scalar("val/loss_topk", vals[step] - topk_gap, step)
    w.close()
    if evals is not None:
        (run / "eval").mkdir()
        results = [{"task": t, "routing": r, "metric": m, "value": v, "n": 100} for t, r, m, v in evals]
        (run / "eval/final.json").write_text(json.dumps({"checkpoint": str(run / "export"), "results": results}))
    return run


def test_report_reads_runs_into_table_and_plots(tmp_path):
    van = fake_run(
        tmp_path,
        "van",
        "debug_vanilla",
        {5: 6.0, 9: 5.5},
        evals=[("piqa", None, "acc_norm", 0.6), ("piqa", None, "acc", 0.5), ("arc", None, "acc", 0.3)],
    )
    mor = fake_run(
        tmp_path,
        "mor",
        "debug_mor",
        {5: 5.9, 10: 5.25},
        evals=[("piqa", "topk", "acc", 0.7), ("piqa", "causal", "acc", 0.65), ("lambada", "topk", "ppl", 30.0)],
        flops_per_step=7e11,
        last_step=12,
        topk_gap=0.25,
    )
    short = fake_run(tmp_path, "van_short", "debug_vanilla", {3: 6.5})
    table, results = write_report([van, mor, short], tmp_path / "out")
    r = {x.name: x for x in results}
    assert r["van"].val_loss_causal == pytest.approx(5.5) and r["mor"].val_loss_causal == pytest.approx(5.25)
    assert r["van"].val_loss_topk == pytest.approx(5.5) and r["mor"].val_loss_topk == pytest.approx(5.0)
    assert r["van"].curve.steps == [5, 9] and r["van"].curve.val_loss_causal == pytest.approx([6.0, 5.5])
    assert r["mor"].curve.val_loss_topk == pytest.approx([5.65, 5.0])
    # Step 5 lies between counters logged at 4 and 6: interpolated.
    assert r["van"].curve.flops == pytest.approx([5e12, 9e12]) and r["mor"].flops == pytest.approx(12 * 7e11)
    assert r["van"].tokens == 9 * 1024 and r["van"].train_loss == pytest.approx(10.0 - 0.9)
    assert r["van"].eval_acc == {"-": pytest.approx((0.6 + 0.3) / 2)}  # acc_norm preferred, ppl ignored
    assert r["mor"].eval_acc == {"topk": pytest.approx(0.7), "causal": pytest.approx(0.65)}
    assert r["van_short"].eval_acc == {}
    assert (r["van"].family, r["mor"].family) == ("vanilla", "mor")
    assert (r["van"].variant, r["mor"].variant) == ("vanilla", "MoR expert-topk Nr=3")
    assert r["van"].params > r["mor"].params > 0  # the recursive model shares its middle layers
    assert 0 <= r["van"].wall_s < 60
    lines = table.splitlines()
    head = next(line for line in lines if line.startswith("| model | variant |"))
    assert "| val loss (causal) | val loss (top-k) |" in head
    assert "| few-shot avg (causal) | few-shot avg (top-k) |" in head
    row = next(line for line in lines if line.startswith("| mor |"))
    assert "| 5.2500 (step 10) | 5.0000 |" in row and "| 65.0% | 70.0% |" in row
    row = next(line for line in lines if line.startswith("| van |"))
    assert "| 5.5000 | 5.5000 |" in row and "| 45.0% | 45.0% |" in row  # no routing: one average, both columns
    # Per budget: van spent 9e12 and mor 8.4e12, 7% apart, more than runs of one budget: three tables.
    assert [line for line in lines if line.startswith("### ")] == [
        "### 3e+12 FLOPs (paper convention)",
        "### 8.4e+12 FLOPs (paper convention)",
        "### 9e+12 FLOPs (paper convention)",
    ]
    per_budget = lines[lines.index("## Per budget") :]
    van_row = next(line for line in per_budget if line.startswith("| van |"))
    assert van_row.endswith("| 9 | 5.5000 | 5.5000 | 45.0% | 45.0% |")  # no routing: one average, both columns
    mor_row = next(line for line in per_budget if line.startswith("| mor |"))
    assert mor_row.endswith("| 12 | 5.2500 | 5.0000 | 65.0% | 70.0% |")
    assert (tmp_path / "out/results.md").read_text().strip() == table
    assert json.loads((tmp_path / "out/results.json").read_text())[0]["name"] == "van"
    import matplotlib.image

    for png in ("val_loss_vs_flops.png", "val_loss_vs_tokens.png"):
        img = matplotlib.image.imread(tmp_path / "out" / png)
        assert img.shape[0] > 300 and img.shape[1] > 500
        assert img[..., :3].std() > 0.05  # something was drawn


def test_report_names_what_is_missing(tmp_path, capsys):
    run = fake_run(tmp_path, "r", "debug_vanilla", {2: 6.0})
    (run / "eval").mkdir()
    (run / "eval/bad.json").write_text('{"results": [{"task": "piqa"}]}')
    with pytest.raises(ValueError, match="bad.json"):
        read_run(run)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/config.toml").write_text((run / "config.toml").read_text())
    with pytest.raises(FileNotFoundError, match="empty"):
        read_run(tmp_path / "empty")
    assert isoflop_cli("report", tmp_path / "missing") == 2
    assert "missing" in capsys.readouterr().err


def test_variants_tell_the_mor_configs_apart():
    def variant(name, *overrides):
        return model_variant(cfg_of(name, *overrides).model)

    assert variant("vanilla_360m") == "vanilla" and variant("recursive_360m") == "recursive Nr=3"
    assert variant("mor_360m") == "MoR expert-topk Nr=3"
    assert variant("mor_360m", "--model.router=token", "--model.num_recursions=2", "--model.n_layers=30") == (
        "MoR token Nr=2"
    )
    assert variant("mor_360m", "--model.kv_mode=share") == "MoR expert-topk Nr=3 (KV share)"
    assert variant("mor_360m", "--model.expert_rule=threshold", "--model.router_alpha=1") == (
        "MoR expert-threshold Nr=3 (alpha 1)"
    )
    # Expert choice that keeps every token routes nothing: the recursive family, with MoR's gate.
    gate_only = cfg_of("mor_360m", "--model.capacities=[1.0, 1.0, 1.0]").model
    assert (
        model_variant(gate_only) == "recursive Nr=3 (expert-topk router gate)"
        and model_family(gate_only) == "recursive"
    )
    assert variant("recursive_360m", "--model.recursion_gate=0.05") == "recursive Nr=3 (gate 0.05)"
    assert variant("recursive_360m", "--model.residual_scale=0.5") == "recursive Nr=3 (residual scale 0.5)"
    assert variant("mor_360m", "--model.expert_rule=random") == "MoR expert-random Nr=3"


def test_suite_average_is_the_papers():
    """acc for LAMBADA, WinoGrande and MMLU, acc_norm for the rest, ARC one task (Easy and Challenge
    averaged), per routing mode; other metrics ignored."""

    def res(task, metric, value, routing="causal"):
        return {"task": task, "routing": routing, "metric": metric, "value": value}

    results = [
        res("lambada", "acc", 0.10), res("lambada", "acc_norm", 0.99), res("lambada", "ppl", 40.0),
        res("winogrande", "acc", 0.50), res("mmlu", "acc", 0.25),
        res("hellaswag", "acc", 0.99), res("hellaswag", "acc_norm", 0.30),
        res("arc_easy", "acc_norm", 0.40), res("arc_challenge", "acc_norm", 0.20), res("arc_challenge", "acc", 0.99),
        res("piqa", "acc", 0.60),  # no acc_norm reported: acc
        res("piqa", "acc", 0.70, "topk"),
    ]  # fmt: skip
    averages, tasks = suite_average(results)
    assert tasks == 6  # lambada, winogrande, mmlu, hellaswag, arc, piqa
    assert averages["causal"] == pytest.approx((0.10 + 0.50 + 0.25 + 0.30 + 0.30 + 0.60) / 6)
    assert averages["topk"] == pytest.approx(0.70)
    assert suite_average([res("lambada", "ppl", 3.0)]) == ({}, 0)


def test_runs_of_one_budget_share_a_table(tmp_path):
    runs = [fake_run(tmp_path, f"r{i}", "debug_vanilla", {4: 6.0}, flops_per_step=f) for i, f in
            enumerate([1e12, 1.02e12, 2e12, 1.98e12, 4e12])]  # fmt: skip
    groups = budget_groups([read_run(r) for r in runs])
    assert [sorted(r.name for r in g) for g in groups] == [["r0", "r1"], ["r2", "r3"], ["r4"]]


def test_study_configs_differ_only_in_the_model():
    """train_configs/study (docs/RESULTS.md): one width, 8 applied layers, the same training, data and
    schedule, three budgets 4x apart with the smaller two as cooldowns."""
    paths = sorted((ROOT / "train_configs/study").glob("*.toml"))
    cfgs = {p.stem: load_config(p, ["--model.vocab_size=8192"]) for p in paths}
    assert sorted(cfgs) == [
        "mor_expert_nr2",
        "mor_expert_nr2_alpha1",
        "mor_expert_nr3",
        "mor_threshold_nr2",
        "mor_token_nr3",
        "recursive_nr2",
        "recursive_nr2_gate",
        "recursive_nr2_router_gate",
        "vanilla",
    ]
    base = cfgs["vanilla"]
    for cfg in cfgs.values():
        assert (cfg.training, cfg.optimizer, cfg.data) == (base.training, base.optimizer, base.data)
        assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.sharing) == (256, 8, "middle_cycle")
        assert cfg.data.tokenizer == "data/tokenizer/corpus8k.model"
    assert {k: model_variant(c.model) for k, c in cfgs.items()} == {
        "vanilla": "vanilla",
        "recursive_nr2": "recursive Nr=2",
        "mor_expert_nr2": "MoR expert-topk Nr=2",
        "mor_expert_nr3": "MoR expert-topk Nr=3",
        "mor_token_nr3": "MoR token Nr=3",
        "mor_expert_nr2_alpha1": "MoR expert-topk Nr=2 (alpha 1)",
        "mor_threshold_nr2": "MoR expert-threshold Nr=2",
        "recursive_nr2_gate": "recursive Nr=2 (gate 0.05)",
        "recursive_nr2_router_gate": "recursive Nr=2 (expert-topk router gate)",
    }
    runs = {k: plan_config(c, k, [2.4e13, 1.2e13, 6e12]) for k, c in cfgs.items()}
    params = {k: r[0].non_embedding_params for k, r in runs.items()}
    assert 1.5 < params["vanilla"] / params["recursive_nr2"] < 1.7  # 8 unique layers against 5
    assert params["recursive_nr2"] < params["mor_expert_nr2"] < params["recursive_nr2"] * 1.01  # + a router
    for plan in runs.values():
        assert [r.branch_from for r in plan] == [None, plan[0].name, plan[0].name]  # trapezoid cooldowns
        assert all(r.flops_paper == pytest.approx(r.budget, rel=0.01) for r in plan)


def test_seeded_plans_name_and_seed_every_run(tmp_path):
    cfgs = [("v", cfg_of("vanilla_360m")), ("m", cfg_of("mor_360m"))]
    runs = plan_sweep(cfgs, [16.5e18, 6e18], seeds=[0, 3])
    names = [r.name for r in runs]
    assert len(set(names)) == 8 and names[:2] == ["vanilla_360m_s0_1.65e19", "vanilla_360m_s0_6e18"]
    assert [r.seed for r in runs] == [0, 0, 0, 0, 3, 3, 3, 3]
    assert all(r.branch_from is None or f"_s{r.seed}_" in r.branch_from for r in runs)  # each seed's own trunk
    write_plan(tmp_path, runs, dict(cfgs))
    for r in load_plan(tmp_path):
        assert load_config(tmp_path / r.config).training.seed == r.seed
    assert [r.name for r in plan_sweep(cfgs[:1], [6e18])] == ["vanilla_360m_6e18"]  # no seeds: names unchanged
    for bad in ([], [1, 1], [-1]):
        with pytest.raises(ValueError, match="seeds"):
            plan_sweep(cfgs, [6e18], seeds=bad)


def test_a_learning_rate_sweep_names_and_sets_each_rate(tmp_path):
    cfgs = [("r", cfg_of("recursive_135m")), ("m", cfg_of("mor_135m"))]
    runs = plan_sweep(cfgs, [2e18], seeds=[0, 1], lrs=[1e-3, 0.01])
    assert [r.name for r in runs[:4]] == [
        "recursive_135m_lr0.001_s0_2e18",
        "recursive_135m_lr0.01_s0_2e18",
        "mor_135m_lr0.001_s0_2e18",
        "mor_135m_lr0.01_s0_2e18",
    ]
    assert len(runs) == 8 and arm_name(runs[-1].name, 1) == "mor_135m_lr0.01"
    write_plan(tmp_path, runs, dict(cfgs))
    assert [load_config(tmp_path / r.config).optimizer.lr for r in load_plan(tmp_path)][:2] == [1e-3, 0.01]
    assert cfg_of("mor_135m").optimizer.lr == 3e-3  # the source config is left as it was
    for bad in ([], [1e-3, 1e-3], [0.0], [-1e-3]):
        with pytest.raises(ValueError, match="learning rates"):
            plan_sweep(cfgs, [2e18], lrs=bad)


def test_seed_table_gives_mean_spread_and_n_per_variant_and_budget(tmp_path):
    runs = [
        fake_run(tmp_path, "rec_s0", "debug_vanilla", {4: 6.0}, flops_per_step=1e12),
        fake_run(tmp_path, "rec_s1", "debug_vanilla", {4: 6.2}, flops_per_step=1e12),
        fake_run(tmp_path, "rec_s2", "debug_vanilla", {4: 6.4}, flops_per_step=1e12),
        fake_run(tmp_path, "mor_s0", "debug_mor", {4: 5.0}, flops_per_step=1e12),
        fake_run(tmp_path, "big", "debug_vanilla", {4: 4.0}, flops_per_step=4e12),
    ]
    results = [read_run(r) for r in runs]
    table = seed_tables(results)
    vanilla = [line for line in table.splitlines() if line.startswith("| vanilla | 3 ")]
    assert len(vanilla) == 1 and "| 6.2000 | 0.2000 | 6.0000 | 6.4000 |" in vanilla[0]
    assert any(line.startswith("| vanilla | 1 |") for line in table.splitlines())  # the other budget, alone
    assert seed_tables([results[0], results[3]]) == ""  # no variant ran twice: no table
    report, _ = write_report(runs, None)
    assert "over seeds" in report


def test_paired_configs_differ_only_where_they_say_and_warm_up_for_20_steps():
    cfgs = {
        p.stem: load_config(p, ["--model.vocab_size=8192"])
        for p in (ROOT / "train_configs/study/paired").glob("*.toml")
    }
    base = load_config(ROOT / "train_configs/study/recursive_nr2.toml", ["--model.vocab_size=8192"])
    assert len(cfgs) == 8
    for name, cfg in cfgs.items():
        assert cfg.name == "paired_" + name.replace("-", "")
        assert (cfg.training, cfg.data) == (base.training, base.data)
        assert cfg.optimizer.lr == (1e-3 if name.endswith("lr1e-3") else 3e-3)
        (run,) = plan_config(cfg, name, [6e12])
        assert run.warmup_steps == 20, name
        m = dataclasses.replace(cfg.model, router="none", expert_rule="topk", recursion_gate=0.0, residual_scale=0.0)
        assert m == base.model, name
    assert {k: model_variant(c.model) for k, c in cfgs.items()} == {
        "recursive": "recursive Nr=2",
        "recursive_lr1e-3": "recursive Nr=2",
        "gate": "recursive Nr=2 (gate 0.05)",
        "gate_lr1e-3": "recursive Nr=2 (gate 0.05)",
        "eps": "recursive Nr=2 (residual scale 0.5)",
        "mor_topk": "MoR expert-topk Nr=2",
        "mor_random": "MoR expert-random Nr=2",
        "mor_threshold": "MoR expert-threshold Nr=2",
    }


def test_arm_names_drop_the_seed_and_budget_that_plans_add():
    assert arm_name("paired_gate_lr1e3_s3_6e12", 3) == "paired_gate_lr1e3"
    with pytest.raises(ValueError, match="_s2_<budget>"):
        arm_name("paired_gate_6e12", 2)


def test_bootstrap_interval_covers_seed_and_window_noise():
    import numpy as np

    rng = np.random.default_rng(1)
    same = np.full((3, 50), 4.0)
    assert bootstrap_mean(same) == (4.0, 4.0, 4.0)
    # Window noise only (every seed the same): about mean +- 1.96 sd / sqrt(windows).
    windows = np.tile(rng.normal(5.0, 0.5, 400), (4, 1))
    mean, lo, hi = bootstrap_mean(windows)
    half = 1.96 * windows[0].std() / 20
    assert mean == pytest.approx(windows.mean()) and (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    # Seeds that differ widen it: the seed spread is part of the interval.
    seeds = windows + np.array([[-0.3], [-0.1], [0.1], [0.3]])
    _, lo2, hi2 = bootstrap_mean(seeds)
    assert hi2 - lo2 > 3 * (hi - lo)
    assert bootstrap_mean(seeds, seed=5) != bootstrap_mean(seeds, seed=6) and bootstrap_mean(seeds) == (
        bootstrap_mean(seeds)
    )
    with pytest.raises(ValueError, match="seeds, windows"):
        bootstrap_mean([1.0, 2.0])


def test_t_interval_and_the_verdict_read_from_the_wider_interval():
    lo, hi = t_interval([1.0, 2.0, 3.0])
    assert (lo + hi) / 2 == pytest.approx(2.0) and (hi - lo) / 2 == pytest.approx(4.302653 / math.sqrt(3))
    assert all(math.isnan(x) for x in t_interval([1.0]))

    def run(arm, seed, loss):
        return ArmRun(arm, seed, "", "", 3e-3, 20, 1e5, [loss + w for w in (0.0, 0.5, 1.0, 1.5)], None, {}, 0.0)

    # Three seeds whose differences scatter (-0.3, -0.05, -0.01): every resample of the three stays below 0,
    # the t interval over three seeds does not, so the comparison is not resolved.
    runs = [run("a", s, 6.0 + d) for s, d in enumerate([-0.3, -0.05, -0.01])] + [run("b", s, 6.0) for s in range(3)]
    (c,) = compare_arms(runs, [("a", "b")], 0.05)
    assert c.hi < 0 < c.t_hi and c.verdict == "not resolved"
    assert c.mean == pytest.approx(-0.36 / 3) and c.seeds == [0, 1, 2]
    (one,) = compare_arms(runs[:1] + runs[3:4], [("a", "b")], 0.05)  # one seed: the bootstrap's alone
    assert math.isnan(one.t_lo) and one.verdict == "lower by more than 0.05"
    with pytest.raises(ValueError, match="share no seed"):
        compare_arms([runs[0], run("b", 7, 6.0)], [("a", "b")], 0.05)


def test_verdicts_read_the_interval_against_the_margin():
    assert verdict(-0.03, 0.04, 0.05) == "the same (within +-0.05)"
    assert verdict(-0.3, -0.1, 0.05) == "lower by more than 0.05"
    assert verdict(-0.08, -0.01, 0.05) == "lower"
    assert verdict(0.01, 0.2, 0.05) == "higher"
    assert verdict(-0.2, 0.1, 0.05) == "not resolved"


def windows_run(root, name, config, windows, gates=None, val=None):
    run = fake_run(root, name, config, {4: val or 6.0})
    (run / "eval").mkdir(exist_ok=True)
    rows = [{"task": "val", "routing": "causal", "window": i, "tokens": 64, "loss": v} for i, v in enumerate(windows)]
    rows += [{"task": "val", "routing": "topk", "window": i, "tokens": 64, "loss": 0.0} for i in range(len(windows))]
    (run / "eval/val_windows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if gates:
        from torch.utils.tensorboard import SummaryWriter

        w = SummaryWriter(str(run / "tb"))
        for tag, v in gates.items():
            w.add_scalar(f"routing/{tag}", v, 4)
        w.close()
    return run


def test_paired_report_compares_arms_seed_by_seed(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    text = rng.normal(5.0, 0.4, 64)  # how hard each window is: shared by every run
    dirs = []
    for seed, offset in enumerate([0.1, -0.1, 0.05]):  # seed effects, shared by the arms' runs of that seed
        a = text + offset + rng.normal(0, 0.01, 64)
        b = a - 0.2 + rng.normal(0, 0.01, 64)  # b is 0.2 lower on the same seed
        c = a + rng.normal(0, 0.01, 64)  # c is a, within noise
        gates = {"gate_mean/0": 0.05, "gate_std/0": 0.01, "gate_mean/1": 0.07, "gate_std/1": 0.02}
        dirs.append(windows_run(tmp_path, f"arm_a_s{seed}_6e12", "debug_vanilla", a))
        dirs.append(windows_run(tmp_path, f"arm_b_s{seed}_6e12", "debug_mor", b, gates=gates))
        if seed < 2:
            dirs.append(windows_run(tmp_path, f"arm_c_s{seed}_6e12", "debug_vanilla", c))
    for d in dirs:  # the runs' configs carry their seed, as the plan writes them
        cfg = load_config(d / "config.toml")
        cfg.training.seed = int(d.name.split("_s")[1].split("_")[0])
        (d / "config.toml").write_text(dump_toml(cfg))
    rc = isoflop_cli("compare", *dirs, "--pair", "arm_a:arm_b", "--pair", "arm_a:arm_c", "--out", tmp_path / "rep")
    assert rc == 0
    out = capsys.readouterr().out
    rows = {
        line.split("|")[1].strip() + line.split("|")[2].strip(): line for line in out.splitlines() if "| arm_" in line
    }
    ab, ac = rows["arm_aarm_b"], rows["arm_aarm_c"]
    assert "| 3 (0, 1, 2) |" in ab and "higher by more than 0.05" in ab
    assert "| 2 (0, 1) |" in ac and "the same (within +-0.05)" in ac
    # The arm table: n, seeds, the seed spread and the gate per step.
    arm_b = next(line for line in out.splitlines() if line.startswith("| arm_b |"))
    assert "| 3 | 0, 1, 2 |" in arm_b and "0.050 / 0.010; 0.070 / 0.020" in arm_b
    data = json.loads((tmp_path / "rep/paired.json").read_text())
    assert len(data["runs"]) == 8 and len(data["runs"][0]["windows"]) == 64 and data["margin"] == 0.05
    # The paired interval is far narrower than the seeds' spread: the seed effect cancels.
    c = next(c for c in data["comparisons"] if c["b"] == "arm_b")
    assert c["mean"] == pytest.approx(0.2, abs=0.01) and c["lo"] < c["mean"] < c["hi"] and c["hi"] - c["lo"] < 0.02
    assert isoflop_cli("compare", *dirs, "--pair", "arm_a:nope") == 2
    assert "no runs of arm nope" in capsys.readouterr().err
    assert isoflop_cli("compare", *dirs, "--pair", "arm_a") == 2
    assert "ARM_A:ARM_B" in capsys.readouterr().err


def test_the_gpu_experiments_arms_are_the_135m_configs_with_one_change_each():
    folder = ROOT / "train_configs/study/paired_135m"
    cfgs = {p.stem: load_config(p) for p in folder.glob("*.toml")}
    rec, mor = cfg_of("recursive_135m"), cfg_of("mor_135m")
    assert sorted(cfgs) == ["gate", "mor_random", "mor_topk", "recursive"]
    for name, cfg in cfgs.items():
        source = mor if name.startswith("mor") else rec
        assert cfg.name == f"paired135m_{name}"
        assert (cfg.training, cfg.optimizer, cfg.data, cfg.parallelism) == (
            source.training,
            source.optimizer,
            source.data,
            source.parallelism,
        )
    assert cfgs["recursive"].model == rec.model and cfgs["mor_topk"].model == mor.model
    assert cfgs["gate"].model == dataclasses.replace(rec.model, recursion_gate=0.05)
    assert cfgs["mor_random"].model == dataclasses.replace(mor.model, expert_rule="random")
