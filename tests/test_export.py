from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from mor_pretrain.export import load_exported, save_exported


def test_export_round_trip_is_self_describing(tmp_path):
    model = tiny_model(router="expert", kv_mode="share", capacities=[1.0, 0.5, 0.25])
    save_exported(tmp_path / "e", model.args, model.state_dict(), dtype=None, extra={"tokenizer": "default"})
    loaded, meta = load_exported(tmp_path / "e")
    assert meta["model"]["capacities"] == [1.0, 0.5, 0.25] and meta["model"]["kv_mode"] == "share"
    # The tokenizer moves with the weights: copied beside them, its source recorded.
    assert (meta["tokenizer"], meta["tokenizer_source"]) == ("tokenizer.model", "default")
    assert (tmp_path / "e" / "tokenizer.model").is_file() and (tmp_path / "e" / "tokenizer_config.json").is_file()
    x = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_truncated_or_mismatched_export_is_refused(tmp_path):
    model = tiny_model(router="expert")
    save_exported(tmp_path / "e", model.args, model.state_dict())
    f = tmp_path / "e" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="cannot read"):
        load_exported(tmp_path / "e")
    other = tiny_model(router="none")
    save_exported(tmp_path / "m", model.args, other.state_dict())
    with pytest.raises(ValueError, match="does not match"):
        load_exported(tmp_path / "m")


def test_tokenizer_specs_resolve_in_the_export_then_the_working_directory(tmp_path, monkeypatch):
    from mor_pretrain.data.tokenizer import default_tokenizer_path
    from mor_pretrain.export import tokenizer_file

    (tmp_path / "e").mkdir()
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "m.model").write_bytes(default_tokenizer_path().read_bytes())
    monkeypatch.chdir(tmp_path)
    # An export written before tokenizers were copied recorded the training config's relative path.
    assert tokenizer_file("tok/m.model", tmp_path / "e") == Path("tok/m.model")
    (tmp_path / "e" / "tokenizer.model").write_bytes(b"x")
    assert tokenizer_file("tokenizer.model", tmp_path / "e") == tmp_path / "e" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        tokenizer_file("nope.model", tmp_path / "e")
