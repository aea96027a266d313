"""scripts/sweep.sh: runs a written plan in order, skips finished runs, and a real two-run sweep on CPU."""

import os
import subprocess
import sys
from pathlib import Path

from mor_pretrain.config import load_config
from mor_pretrain.isoflop import plan_sweep, write_plan

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "scripts/sweep.sh"


def sweep(plan_dir, **env):
    return subprocess.run(
        ["bash", str(SWEEP), str(plan_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env},
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


def test_sweep_without_a_plan_says_so(tmp_path):
    out = sweep(tmp_path)
    assert out.returncode != 0 and "plan.json" in out.stderr
