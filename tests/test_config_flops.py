import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mor_pretrain.config import ConfigError, DataConfig, OptimizerConfig, dump_toml, load_config
from mor_pretrain.flops import budget, executed_flops_per_token, paper_flops_per_token
from mor_pretrain.models import MoRModel

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "train_configs").glob("*.toml"))
# Non-embedding parameters of the paper's base shapes (MOR_FACTS s1).
PAPER_NON_EMB = {"135m": 106e6, "360m": 315e6, "730m": 654e6, "1.7b": 1.61e9}


def test_paper_flop_check_values_and_step_counts():
    v = load_config(ROOT / "train_configs/vanilla_360m.toml").model
    m = load_config(ROOT / "train_configs/mor_360m.toml").model
    assert paper_flops_per_token(v, 2048) / 1e6 == pytest.approx(833.6, abs=0.05)
    assert paper_flops_per_token(m, 2048) / 1e6 == pytest.approx(555.6, abs=0.05)
    batch = 1024 * 2048
    assert budget(paper_flops_per_token(v, 2048), 16.5e18, batch, paper_rounding=True).steps == 9438
    assert budget(paper_flops_per_token(m, 2048), 16.5e18, batch, paper_rounding=True).steps == 14161


def test_executed_flops_count_the_real_work():
    v = load_config(ROOT / "train_configs/vanilla_360m.toml").model
    m = load_config(ROOT / "train_configs/mor_360m.toml").model
    rec = load_config(ROOT / "train_configs/recursive_360m.toml").model
    ev, em, er = (executed_flops_per_token(a, 2048) for a in (v, m, rec))
    # 6N-style lower bound for the vanilla model: 6 x non-embedding params + LM head.
    with torch.device("meta"):
        n = MoRModel(v).num_params(exclude_embedding=True)
    assert ev > 6 * n + 6 * 960 * 49152
    assert em < 0.8 * er  # MoR skips compute the fixed-depth recursion runs
    # KV sharing skips deeper K/V projections but attends over all step-0 keys: cheaper at short context
    # with full-width K/V, dearer at long context with GQA.
    short = ["--model.n_kv_heads=15", "--training.seq_len=128"]
    rw = load_config(ROOT / "train_configs/mor_360m.toml", short).model
    share = load_config(ROOT / "train_configs/mor_360m.toml", [*short, "--model.kv_mode=share"]).model
    assert executed_flops_per_token(share, 128) < executed_flops_per_token(rw, 128)
    share_long = load_config(ROOT / "train_configs/mor_360m.toml", ["--model.kv_mode=share"]).model
    assert executed_flops_per_token(share_long, 2048) > em
    tok = load_config(ROOT / "train_configs/mor_360m.toml", ["--model.router=token"]).model
    assert executed_flops_per_token(tok, 2048) > em  # masked token choice runs at full length


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_build_on_meta(path):
    cfg = load_config(path)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = 32000
    with torch.device("meta"):
        model = MoRModel(cfg.model)
    assert all(p.device.type == "meta" for p in model.parameters())
    size = path.stem.split("_")[1]
    if size in PAPER_NON_EMB and path.stem.startswith("vanilla"):
        assert model.num_params(exclude_embedding=True) == pytest.approx(PAPER_NON_EMB[size], rel=0.02)


def test_mor_360m_nr2_matches_paper_param_count():
    cfg = load_config(ROOT / "train_configs/mor_360m.toml", ["--model.num_recursions=2"])
    with torch.device("meta"):
        model = MoRModel(cfg.model)
    assert model.num_params(exclude_embedding=True) == pytest.approx(167e6, rel=0.02)


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text,overrides,match",
    [
        ("[model]\nd_modle = 3\n", [], "unknown key model.d_modle"),
        ("[modle]\n", [], "unknown key modle"),
        ("[model]\nd_model = 'big'\n", [], "model.d_model must be int"),
        ("[model]\nd_model = 100\nn_heads = 3\n", [], "model.n_heads"),
        (
            "[model]\nrouter = 'expert'\nnum_recursions = 3\nn_layers = 8\ncapacities = [1.0, 0.3, 0.6]\n",
            [],
            "model.capacities",
        ),
        ("[training]\nseq_len = 4096\n", [], "training.seq_len"),
        ("", ["--training.stepz=3"], "unknown key training.stepz"),
        ("", ["--optimizer.lr=-1"], "optimizer.lr"),
        ("", ["--parallelism.activation_checkpoint=most"], "parallelism.activation_checkpoint must be one of"),
        ("", ["--training.seed=-1"], r"training.seed must be >= 0, got -1"),
        ("[optimizer]\ngrad_clip = -1.0\n", [], r"optimizer.grad_clip must be >= 0"),
        ("", ["--optimizer.lr=inf"], "optimizer.lr must be a finite number, got inf"),
        ("[optimizer]\nlr = nan\n", [], "optimizer.lr must be a finite number, got nan"),
        ("[model]\nrouter_alpha = -inf\n", [], "model.router_alpha must be a finite number"),
        ("[data]\nsources = ['a', 'b']\nweights = [nan, 1.0]\n", [], r"data.weights\[0\] must be a finite number"),
        ("[data]\nsources = ['a', 'b']\nweights = [-1.0, 2.0]\n", [], "data.weights must all be finite numbers > 0"),
    ],
)
def test_bad_configs_name_key_and_file(tmp_path, text, overrides, match):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(p, overrides)
    assert str(p) in str(e.value)


def test_sections_built_in_code_refuse_non_finite_values():
    with pytest.raises(ConfigError, match=r"data.weights must all be finite numbers > 0, got \[nan, 1.0\]"):
        DataConfig(sources=["a", "b"], weights=[math.nan, 1.0]).validate()
    with pytest.raises(ConfigError, match="optimizer.lr must be a finite number > 0, got inf"):
        OptimizerConfig(lr=math.inf).validate()


def test_config_path_that_is_a_directory_or_missing_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a directory"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match=f"config file not found: {tmp_path / 'nope.toml'}"):
        load_config(tmp_path / "nope.toml")


def test_overrides_beat_file_and_round_trip(tmp_path):
    p = write(tmp_path, "[optimizer]\nlr = 1e-3\n[training]\nsteps = 7\n")
    cfg = load_config(p, ["--optimizer.lr=5e-4", "--name=run1", "--data.sources=['a.txt','b.txt']"])
    assert cfg.optimizer.lr == 5e-4 and cfg.training.steps == 7 and cfg.name == "run1"
    assert cfg.data.sources == ["a.txt", "b.txt"]
    again = load_config(write(tmp_path, dump_toml(cfg)))
    assert again == cfg


def test_flops_cli_json():
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/flops.py"),
            str(ROOT / "train_configs/mor_360m.toml"),
            "--budget",
            "16.5e18",
            "--global-batch-tokens",
            str(1024 * 2048),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    d = json.loads(out.stdout)
    assert d["paper_flops_per_token"] / 1e6 == pytest.approx(555.6, abs=0.05)
    assert d["steps"] == int(16.5e18 / d["paper_flops_per_token"] // (1024 * 2048))
    assert d["executed_flops_per_token"] > 3 * d["paper_flops_per_token"]
