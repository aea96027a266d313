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
