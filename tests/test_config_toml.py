"""Every config that loads is written back (config.dump_toml: each run's config.toml, checkpoint configs) as
TOML that loads to an equal config: the relaunch and `tools/eval.py runs/...` read it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mor_pretrain.config import JobConfig, dump_toml, load_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "train_configs").rglob("*.toml"))


def round_trip(cfg: JobConfig, tmp_path: Path) -> JobConfig:
    path = tmp_path / "config.toml"
    path.write_text(dump_toml(cfg))
    tomllib.loads(path.read_text())  # a plain TOML parser reads it too (what RunFolder.at and resumes use)
    return load_config(path)


def test_there_are_shipped_configs():
    assert len(SHIPPED) > 5


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT / "train_configs")) for p in SHIPPED])
def test_every_shipped_config_round_trips(tmp_path, path):
    cfg = load_config(path)
    assert round_trip(cfg, tmp_path) == cfg


# Every control character TOML must escape (all but tab), the escapes TOML has names for, quotes, backslashes
# and non-ASCII text: the hand-written writer wrote the first kind raw, a file nothing could read back.
CONTROL = "".join(chr(c) for c in [*range(0x09), *range(0x0A, 0x20), 0x7F])
STRINGS = ["\n", "\r\n", "\t", CONTROL, 'a "quoted" \\ back\\slash', "'''", '"""', "é ü 漢字 \u2028", "\\n literal"]


@pytest.mark.parametrize("text", STRINGS, ids=[repr(s)[:20] for s in STRINGS])
def test_strings_with_control_characters_round_trip(tmp_path, text):
    cfg = load_config(ROOT / "train_configs/debug_mor.toml")
    cfg.data.doc_separator = text
    cfg.data.text_field = text
    cfg.data.sources = [f"data/{text}/*.jsonl", text]
    cfg.name = "run" + text.replace("/", "").replace("\\", "")  # no path separators in a run name
    cfg.checkpoint.init_from = text
    back = round_trip(cfg, tmp_path)
    assert back.data.doc_separator == text
    assert back == cfg


def test_an_override_with_a_newline_separator_writes_a_config_the_relaunch_reads(tmp_path):
    """--data.doc_separator="\\n": the command line of the bug report, through load_config's override parser."""
    cfg = load_config(ROOT / "train_configs/debug_mor.toml", ['--data.doc_separator="\\n"'])
    assert cfg.data.doc_separator == "\n"
    assert round_trip(cfg, tmp_path) == cfg


def test_numbers_and_lists_keep_their_values_and_types(tmp_path):
    cfg = load_config(ROOT / "train_configs/debug_mor.toml")
    cfg.optimizer.lr = 1e-300
    cfg.optimizer.eps = 0.1 + 0.2  # not a short decimal: repr-exact floats only
    cfg.model.capacities = [1.0, 2 / 3, 1 / 3]
    cfg.checkpoint.save_steps = [1, 2**40]
    back = round_trip(cfg, tmp_path)
    assert back == cfg
    assert type(back.model.router_alpha) is float and type(back.checkpoint.save_steps[1]) is int
