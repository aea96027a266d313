import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import spread_thresholds, tiny_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mor_pretrain.config import ConfigError, DataConfig, OptimizerConfig, dump_toml, load_config
from mor_pretrain.flops import budget, executed_flops, executed_flops_per_token, paper_flops_per_token
from mor_pretrain.isoflop import plan_config
from mor_pretrain.models import MoRModel
from mor_pretrain.models.mor import bucket_size

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
    assert budget(paper_flops_per_token(v, 2048), 16.5e18, batch).steps == 9438
    assert budget(paper_flops_per_token(m, 2048), 16.5e18, batch).steps == 14161


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
    # Token choice runs the depths its router picks: from the reported load, not a static guess.
    tok = load_config(ROOT / "train_configs/mor_360m.toml", ["--model.router=token"]).model
    shallow, deep = executed_flops_per_token(tok, 2048, [0, 8, 1, 1]), executed_flops_per_token(tok, 2048, [0, 1, 1, 8])
    assert shallow < executed_flops_per_token(tok, 2048) < deep < er
    with pytest.raises(ValueError, match="depth_counts"):
        executed_flops_per_token(tok, 2048, [1, 1, 1])


def test_token_choice_paper_flops_assume_balanced_depths():
    """The paper charges token choice like expert choice at capacities (Nr - r) / Nr."""
    for nr, layers in ((2, 32), (3, 32), (4, 34)):
        over = [f"--model.num_recursions={nr}", f"--model.n_layers={layers}"]
        expert = load_config(ROOT / "train_configs/mor_360m.toml", over).model
        token = load_config(ROOT / "train_configs/mor_360m.toml", [*over, "--model.router=token"]).model
        rec = load_config(ROOT / "train_configs/recursive_360m.toml", over).model
        assert paper_flops_per_token(token, 2048) == paper_flops_per_token(expert, 2048)
        assert paper_flops_per_token(token, 2048) < paper_flops_per_token(rec, 2048)


def _counted(model, tokens):
    """Forward + backward matmul FLOPs by op, SDPA on its math kernel (which computes every pair)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        out = model(tokens, tokens)
        out.loss.backward()
    counts = fc.get_flop_counts()["Global"]
    return counts[torch.ops.aten.mm], counts[torch.ops.aten.bmm], out


FLOP_MODELS = {
    "vanilla": dict(num_recursions=1, sharing="cycle", n_layers=4),
    "recursive": dict(router="none"),
    "recursive_share": dict(router="none", kv_mode="share"),
    **{
        f"expert{nr}_{kv}": dict(router="expert", num_recursions=nr, n_layers=2 + 2 * nr, kv_mode=kv)
        for nr in (2, 3, 4)
        for kv in ("recursion", "share")
    },
    "expert_aux_mlp": dict(router="expert", aux_router=True, router_arch="mlp"),
    "token": dict(router="token"),
    "token_share": dict(router="token", kv_mode="share", router_activation="softmax"),
    "expert_threshold": dict(router="expert", expert_rule="threshold", init_std=0.1),
    "expert_random": dict(router="expert", expert_rule="random"),
    "recursive_eps": dict(router="none", residual_scale=0.5),
}


@pytest.mark.parametrize("name", list(FLOP_MODELS))
def test_executed_flops_match_flop_counter(name):
    """Linear FLOPs equal FlopCounterMode's count exactly. Attention: the math kernel multiplies every
    (query, key) pair of each step, the convention counts causal pairs only."""
    model = tiny_model(**FLOP_MODELS[name])
    a = model.args
    b, t = 3, 48
    x = torch.randint(0, 97, (b, t))
    if model.stack.expert_threshold is not None:
        spread_thresholds(model, x)
    mm, bmm, out = _counted(model, x)
    # Rows each recursion step runs per sequence: static top-k; token choice pads to a bucket.
    rows = [t] * a.num_recursions if a.router != "expert" else a.tokens_per_step(t)
    load = None
    if a.router != "none" and not a.topk_routing:  # decided per token: bucketed rows
        busiest = [int((out.depth > r).sum(1).max()) for r in range(a.num_recursions)]
        rows = [t] + [bucket_size(n, t) for n in busiest[1:]]
        load = [0] + [rows[i] - (rows[i + 1] if i + 1 < len(rows) else 0) for i in range(len(rows))]
    count = executed_flops(a, t, load)
    assert count.linear * b * t == mm
    pair = 3 * 4 * a.n_heads * a.head_dim  # QK^T and AV, forward + backward
    steps = [(n, rows[0] if a.kv_mode == "share" and r else n) for r, n in enumerate(rows)]
    edges = [(t, t)] * 2 if a.middle else []
    square = sum(n_q * n_k for n_q, n_k in edges) + a.num_shared * sum(n_q * n_k for n_q, n_k in steps)
    assert bmm == pair * b * square
    causal = sum(n * (n + 1) / 2 for n, _ in edges) + a.num_shared * sum(
        n_q * (n_q + 1) / 2 if n_q == n_k else n_q * (n_k + 1) / 2 for n_q, n_k in steps
    )
    assert count.attention * t == pytest.approx(pair * causal)


def test_flops_cli_and_isoflop_plan_round_alike():
    """One rounding rule: tools/flops.py, `isoflop plan` and the README give the same step counts."""
    cfg = load_config(ROOT / "train_configs/mor_360m.toml", ["--training.global_batch_size=1024"])
    (run,) = plan_config(cfg, "mor_360m.toml", [16.5e18])
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools/flops.py"), str(ROOT / "train_configs/mor_360m.toml"), "--budget=16.5e18"]
        + ["--global-batch-tokens", str(1024 * 2048), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["steps"] == run.steps == 14161
    assert "14,161 for MoR Nr=3" in (ROOT / "README.md").read_text()


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
        # values that used to train garbage (or make runs/ itself the run folder) without a word
        ("", ["--model.init_std=-1"], r"model.init_std: must be a finite number > 0, got -1"),
        ("", ["--model.norm_eps=0"], r"model.norm_eps: must be a finite number > 0, got 0"),
        ("", ["--model.router_alpha=-1"], r"model.router_alpha: must be a finite number > 0"),
        ("", ["--model.rope_theta=0"], r"model.rope_theta: must be a finite number > 0"),
        ("", ["--model.aux_loss_coef=-0.1"], r"model.aux_loss_coef: must be a finite number >= 0"),
        ("", ["--checkpoint.load_step=-5"], r"checkpoint.load_step must be a step >= 0, or -1 for the latest"),
        ("", ["--checkpoint.folder=../elsewhere"], r"checkpoint.folder must be a folder name inside"),
        ("", ["--name="], r"name must be a run folder name .* got ''"),
        ("", ["--name=a/b"], r"name must be a run folder name"),
    ],
)
def test_bad_configs_name_key_and_where_the_value_came_from(tmp_path, text, overrides, match):
    """The file that holds the bad value, or, when an override set it, that override instead of the file."""
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(p, overrides)
    if overrides:
        assert str(e.value).startswith(f"override {overrides[0]}: ") and str(p) not in str(e.value)
    else:
        assert str(e.value).startswith(f"{p}: ")


@pytest.mark.parametrize(
    ("text", "overrides", "source"),
    [
        # the message names the overridden key; the other override is not blamed
        ("", ["--name=run1", "--optimizer.weight_decay=-0.1"], "override --optimizer.weight_decay=-0.1"),
        # a value from the file is wrong: the file, though overrides were given
        ("[optimizer]\nweight_decay = -0.1\n", ["--name=run1", "--optimizer.lr=1e-3"], "{p}"),
        # the override broke a combination whose message names another key: the file alone was fine
        ("[model]\nd_model = 96\n", ["--model.n_heads=5"], "override --model.n_heads=5"),
        ("[training]\nseq_len = 1024\n", ["--model.max_seq_len=512"], "override --model.max_seq_len=512"),
        (
            "",
            ["--training.seq_len=1024", "--model.max_seq_len=512"],
            "overrides --training.seq_len=1024 --model.max_seq_len=512",
        ),
        # "name" is also a word in messages about other keys
        ("[checkpoint]\nfolder = '../x'\n", ["--name=run1"], "{p}"),
        ("", ["--name=a/b"], "override --name=a/b"),
        ("", ["--model.d_model=-128"], "override --model.d_model=-128"),
    ],
)
def test_a_config_error_names_the_override_that_set_the_bad_value(tmp_path, text, overrides, source):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p, overrides)
    assert str(e.value).startswith(source.format(p=p) + ": "), str(e.value)


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
    assert d["steps"] == round(16.5e18 / round(d["paper_flops_per_token"], -5) / (1024 * 2048))
    assert d["executed_flops_per_token"] > 3 * d["paper_flops_per_token"]
