"""scripts/sweep.sh: runs a written plan in order, skips finished runs, and a real two-run sweep on CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mor_pretrain.config import load_config
from mor_pretrain.flops import paper_flops_per_token
from mor_pretrain.isoflop import plan_sweep, read_scalars, write_plan, write_report

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "scripts/sweep.sh"


def sweep(plan_dir, *shard, **env):
    return subprocess.run(
        ["bash", str(SWEEP), str(plan_dir), *shard],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "NGPU": "1", **env},
        timeout=600,
    )


def debug_plan(tmp_path, budgets, *overrides):
    cfg = load_config(ROOT / "train_configs/debug_mor.toml", [f"--run_root={tmp_path / 'runs'}", *overrides])
    runs = plan_sweep([("debug_mor.toml", cfg)], budgets)
    write_plan(tmp_path / "plan", runs, {"debug_mor.toml": cfg})
    return runs


def test_sweep_skips_finished_runs_and_refuses_a_missing_branch_point(tmp_path):
    big, small = debug_plan(tmp_path, [2e11, 6e10], "--model.vocab_size=512")
    assert small.branch_from == big.name
    big_dir, small_dir = Path(big.run_dir), Path(small.run_dir)
    big_dir.mkdir(parents=True)
    (big_dir / "DONE").touch()  # finished, but saved no checkpoint at the branch step
    out = sweep(tmp_path / "plan")
    assert out.returncode == 1
    assert f"{big.name}: finished, skipped" in out.stdout
    assert f"step-{small.branch_step:08d}" in out.stderr and "not a complete checkpoint" in out.stderr
    (small_dir / "export").mkdir(parents=True)
    (small_dir / "export/config.json").write_text("{}")  # a complete export counts as finished
    out = sweep(tmp_path / "plan")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("finished, skipped") == 2 and "sweep finished" in out.stdout


def test_a_preempted_run_is_not_marked_done(tmp_path):
    """A preempted trainer saves and exits 0 without an export: the sweep stops there, leaves no DONE, and a
    second sweep trains the run again (here a stand-in for torchrun that exits 0 and writes nothing)."""
    (run,) = debug_plan(tmp_path, [2e11], "--model.vocab_size=512")
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\n[[ "$1 $2" == "-m torch.distributed.run" ]] && exit 0\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    for _ in range(2):
        out = sweep(tmp_path / "plan", PYTHON=str(fake))
        assert out.returncode == 1 and f"{run.name}: training" in out.stdout
        assert "stopped before its last step" in out.stderr and not (Path(run.run_dir) / "DONE").exists()


def test_a_shard_runs_every_nth_run_of_the_plan(tmp_path):
    cfg = load_config(
        ROOT / "train_configs/debug_mor.toml", [f"--run_root={tmp_path / 'runs'}", "--model.vocab_size=512"]
    )
    runs = plan_sweep([("debug_mor.toml", cfg)], [2e11], seeds=[0, 1, 2, 3, 4])
    write_plan(tmp_path / "plan", runs, {"debug_mor.toml": cfg})
    for r in runs:
        Path(r.run_dir).mkdir(parents=True)
        (Path(r.run_dir) / "DONE").touch()
    for shard, picked in (("0/2", [0, 2, 4]), ("1/2", [1, 3]), ("2/3", [2]), ("0/1", [0, 1, 2, 3, 4])):
        out = sweep(tmp_path / "plan", shard)
        assert out.returncode == 0, out.stderr
        assert [r.name for r in runs if f"{r.name}: finished, skipped" in out.stdout] == [runs[i].name for i in picked]
    for bad in ("2/2", "1", "0/0", "a/b"):
        out = sweep(tmp_path / "plan", bad)
        assert out.returncode == 2 and f"shard must be K/N with 0 <= K < N, got {bad}" in out.stderr


def test_sweep_without_a_plan_says_so(tmp_path):
    out = sweep(tmp_path)
    assert out.returncode != 0 and "plan.json" in out.stderr


def needs_trainer_and_corpus():
    if not (ROOT / "train.py").is_file() or not (ROOT / "data/corpus/train").is_dir():
        pytest.fail("needs train.py and the default corpus (bash scripts/setup.sh builds data/corpus)")


TINY = [
    "--training.global_batch_size=4",
    "--training.micro_batch_size=4",
    "--training.seq_len=64",
    "--training.val_interval=3",
    "--training.val_batches=2",
    "--metrics.log_interval=1",
    "--data.num_workers=0",
]


@pytest.mark.slow
def test_two_run_sweep_from_plan_to_report(tmp_path):
    needs_trainer_and_corpus()
    configs = {
        name: load_config(ROOT / f"train_configs/{name}.toml", [f"--run_root={tmp_path / 'runs'}", *TINY])
        for name in ("debug_vanilla", "debug_mor")
    }
    runs = plan_sweep(list(configs.items()), [6e9])
    write_plan(tmp_path / "plan", runs, configs)
    # Paper FLOPs per token at T=64: vanilla 8 x 442,368 = 3.54M, MoR 2.64M; 256 tokens per step.
    assert [r.steps for r in runs] == [round(6e9 / 3.5e6 / 256), round(6e9 / 2.6e6 / 256)] == [7, 9]
    out = sweep(tmp_path / "plan")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for r in runs:
        assert (Path(r.run_dir) / "DONE").is_file() and (Path(r.run_dir) / "export/config.json").is_file()
        assert f"{r.name}: finished in " in out.stdout
    again = sweep(tmp_path / "plan")  # an interrupted or repeated sweep skips what is finished
    assert again.returncode == 0 and again.stdout.count("finished, skipped") == 2
    table, results = write_report([r.run_dir for r in runs], tmp_path / "report")
    by_name = {x.name: x for x in results}
    for r in runs:
        res = by_name[r.name]
        assert res.step == r.steps and res.tokens == r.tokens
        assert res.flops == pytest.approx(r.steps * 256 * paper_flops_per_token(configs[r.source].model, 64))
        assert res.val_loss_causal is not None and 0 < res.val_loss_causal < 12  # below ln(32k) + a margin
        assert res.val_loss_topk is not None and 0 < res.val_loss_topk < 12
        assert res.curve.steps == sorted({*range(3, r.steps + 1, 3), r.steps})  # every 3 steps and the last
        assert f"| {r.name} | {r.variant} |" in table
    for png in ("val_loss_vs_flops.png", "val_loss_vs_tokens.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trapezoid(tmp_path_factory):
    """A big debug MoR run of 16 steps and an 8-step cooldown branched from it, swept for real."""
    needs_trainer_and_corpus()
    tmp = tmp_path_factory.mktemp("trapezoid")
    cfg = load_config(ROOT / "train_configs/debug_mor.toml", [f"--run_root={tmp / 'runs'}", *TINY])
    big, small = plan_sweep([("debug_mor", cfg)], [1.07e10, 5.35e9])  # 2.6M FLOPs/token x 256 tokens/step
    write_plan(tmp / "plan", [big, small], {"debug_mor": cfg})
    out = sweep(tmp / "plan")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return cfg, big, small, read_scalars(Path(small.run_dir) / "tb")


@pytest.mark.slow
def test_trapezoid_cooldown_starts_from_the_big_runs_checkpoint(trapezoid):
    cfg, big, small, scalars = trapezoid
    assert (big.steps, small.steps, small.branch_step, small.decay_steps) == (16, 8, 6, 2)
    assert (Path(big.run_dir) / "checkpoints/step-00000006/COMPLETE").is_file()  # kept for the branch
    assert min(scalars["train/loss"]) == small.branch_step + 1  # trained only the cooldown
    assert scalars["progress/tokens"][small.steps] == small.tokens  # counters carried over from the big run
    assert (Path(small.run_dir) / "export/config.json").is_file()


@pytest.mark.slow
def test_trapezoid_cooldown_follows_its_own_decay(trapezoid):
    cfg, big, small, scalars = trapezoid
    lr = scalars["train/lr"]  # the rate each step used
    peak = cfg.optimizer.lr
    assert [lr[s] for s in (7, 8)] == pytest.approx([peak / 2, 0.0], abs=1e-9)  # steps 7 and 8: 2-step decay
