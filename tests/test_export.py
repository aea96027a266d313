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


def test_an_exports_tokenizer_must_be_a_file_of_its_own_folder(tmp_path, monkeypatch):
    from mor_pretrain.data.tokenizer import default_tokenizer_path
    from mor_pretrain.export import tokenizer_file

    (tmp_path / "e").mkdir()
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "m.model").write_bytes(default_tokenizer_path().read_bytes())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "e" / "tokenizer.model").write_bytes(b"x")
    assert tokenizer_file("tokenizer.model", tmp_path / "e") == tmp_path / "e" / "tokenizer.model"
    assert tokenizer_file("default", tmp_path / "e") == default_tokenizer_path()
    # A config.json from anyone must not make a reader open any file of the machine.
    for spec in ("/etc/passwd", "../tok/m.model", "tok/m.model", ".."):
        with pytest.raises(ValueError, match=r"config.json names the tokenizer .* must be a file of its own folder"):
            tokenizer_file(spec, tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        tokenizer_file("nope.model", tmp_path / "e")
    assert tokenizer_file("tok/m.model") == Path("tok/m.model")  # the training config's own path


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[1, 2]", r"config.json is not an export config"),
        ("{not json", r"config.json is not valid JSON"),
        (b"\xff\xfe{}", r"config.json is not valid JSON"),
        ('{"format": "x", "model": 3}', r"config.json is not an export config"),
    ],
)
def test_a_broken_export_config_is_one_error_naming_the_file(tmp_path, text, match):
    model = tiny_model()
    save_exported(tmp_path / "e", model.args, model.state_dict())
    cfg = tmp_path / "e" / "config.json"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=match):
        load_exported(tmp_path / "e")


def test_huge_sizes_in_an_export_config_are_refused_before_allocating(tmp_path, monkeypatch):
    import json

    model = tiny_model()
    save_exported(tmp_path / "e", model.args, model.state_dict())
    cfg = tmp_path / "e" / "config.json"
    meta = json.loads(cfg.read_text())
    meta["model"].update(d_model=10_000_000, n_heads=4, d_ffn=10_000_000)
    cfg.write_text(json.dumps(meta))

    def no_allocation(*args, **kwargs):
        raise AssertionError("the model was allocated before its shapes were checked")

    monkeypatch.setattr(torch.nn.Module, "to_empty", no_allocation)
    with pytest.raises(ValueError, match=r"does not match .*config.json.*wrong shapes .*10000000"):
        load_exported(tmp_path / "e")


def test_an_export_with_nan_weights_is_refused(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    save_exported(tmp_path / "e", model.args, model.state_dict())
    with pytest.raises(ValueError, match=r"tensor norm.weight holds NaN or inf"):
        load_exported(tmp_path / "e")
