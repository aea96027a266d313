import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from mor_pretrain.folders import load_exported, save_exported


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
    from mor_pretrain.folders import tokenizer_file

    (tmp_path / "e").mkdir()
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "m.model").write_bytes(default_tokenizer_path().read_bytes())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "e" / "tokenizer.model").write_bytes(b"x")
    assert tokenizer_file("tokenizer.model", tmp_path / "e") == tmp_path / "e" / "tokenizer.model"
    assert tokenizer_file("default", tmp_path / "e") == default_tokenizer_path()
    # A config.json from anyone must not make a reader open any file of the machine.
    for spec in ("/etc/passwd", "../tok/m.model", "tok/m.model", ".."):
        with pytest.raises(ValueError, match=r"config.json names the tokenizer .* must be a file of that folder"):
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
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = tiny_model()
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    with pytest.raises(ValueError, match=r"the weights to export to .*/e: tensor norm.weight holds NaN or inf"):
        save_exported(tmp_path / "e", model.args, model.state_dict())
    assert not (tmp_path / "e" / "model.safetensors").exists()
    # A file written by other means, under the header a save gives it: the loader refuses it too.
    good = tiny_model()
    weights = save_exported(tmp_path / "e", good.args, good.state_dict()) / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        header = f.metadata()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights), metadata=header)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor norm.weight holds NaN or inf"):
        load_exported(tmp_path / "e")


# ---------------------------------------------------------------------------------------------------------------
# Sizes, paths and writes a folder cannot be trusted with (hostile audit)


def _forbid_allocation(monkeypatch):
    def no_allocation(*args, **kwargs):
        raise AssertionError("the model was allocated before its sizes were checked")

    monkeypatch.setattr(torch.nn.Module, "to_empty", no_allocation)


@pytest.mark.parametrize("max_seq_len", [10**9, 10**7])
def test_a_max_seq_len_the_weights_do_not_back_is_refused_before_allocating(tmp_path, monkeypatch, max_seq_len):
    """max_seq_len sizes the RoPE table and no weight pins it: 10**9 asked for 128 GB, 10**7 for 5 GB."""
    import json

    model = tiny_model()
    save_exported(tmp_path / "e", model.args, model.state_dict())
    cfg = tmp_path / "e" / "config.json"
    meta = json.loads(cfg.read_text())
    meta["model"]["max_seq_len"] = max_seq_len
    cfg.write_text(json.dumps(meta))
    _forbid_allocation(monkeypatch)
    with pytest.raises(ValueError, match=rf"config.json: max_seq_len {max_seq_len} would need a .* RoPE table") as e:
        load_exported(tmp_path / "e")
    assert "\n" not in str(e.value)


def test_a_config_that_does_not_validate_is_one_error(tmp_path):
    import json

    model = tiny_model()
    save_exported(tmp_path / "e", model.args, model.state_dict())
    cfg = tmp_path / "e" / "config.json"
    meta = json.loads(cfg.read_text())
    meta["model"]["n_heads"] = 0  # head_dim = d_model // n_heads
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"config.json: model.n_heads: must be >= 1"):
        load_exported(tmp_path / "e")


def _outside_tokenizer(tmp_path: Path) -> Path:
    """A valid SentencePiece model outside any model folder (a reader must not open it through one)."""
    from mor_pretrain.data.tokenizer import default_tokenizer_path

    outside = tmp_path / "elsewhere" / "secret.model"
    outside.parent.mkdir()
    outside.write_bytes(default_tokenizer_path().read_bytes())
    return outside


@pytest.mark.parametrize("name", ["tokenizer.model", "config.json", "model.safetensors"])
def test_an_export_file_that_links_out_of_its_folder_is_refused(tmp_path, name):
    from mor_pretrain.evaluate import load_any_tokenizer, load_for_eval

    model = tiny_model()
    export = save_exported(tmp_path / "e", model.args, model.state_dict(), extra={"tokenizer": "default"})
    outside = _outside_tokenizer(tmp_path)
    if name != "tokenizer.model":  # the real file, moved out of the folder and linked back in
        outside = tmp_path / "elsewhere" / name
        (export / name).rename(outside)
    (export / name).unlink(missing_ok=True)
    (export / name).symlink_to(outside)
    found = rf"refusing {re.escape(str(export / name))}: it resolves to {re.escape(str(outside.resolve()))}, outside"
    with pytest.raises(ValueError, match=found):
        load_for_eval(export)
    if name == "tokenizer.model":
        with pytest.raises(ValueError, match="outside its folder"):
            load_any_tokenizer("tokenizer.model", export)
    # A link that stays inside the folder is fine.
    (export / name).unlink()
    outside.rename(export / f"real-{name}")
    (export / name).symlink_to(export / f"real-{name}")
    if name == "tokenizer.model":
        assert load_any_tokenizer("tokenizer.model", export).vocab_size > 0
    else:
        load_for_eval(export)


def test_a_bpe_tokenizer_config_that_links_out_of_its_folder_is_refused(tmp_path):
    from conftest import train_byte_bpe

    from mor_pretrain.evaluate import load_any_tokenizer

    tok = train_byte_bpe(["the router picks a depth"] * 20, tmp_path / "bpe.json")
    model = tiny_model(vocab_size=300)
    export = save_exported(tmp_path / "e", model.args, model.state_dict(), extra={"tokenizer": str(tok)})
    outside = tmp_path / "elsewhere.json"
    (export / "tokenizer_config.json").rename(outside)
    (export / "tokenizer_config.json").symlink_to(outside)
    with pytest.raises(ValueError, match=r"tokenizer_config.json: it resolves to .*elsewhere.json, outside"):
        load_any_tokenizer("tokenizer.json", export)


def _crash_while_writing_config(tmp_path: Path, out: Path, seed: int) -> None:
    """In a child process: export tiny_model(seed) to `out`, killed (SIGKILL) halfway through writing
    config.json, whichever way it is written (in place or beside it)."""
    import signal
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, pathlib, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import tiny_model
        from mor_pretrain.folders import save_exported

        def dying(write):
            def wrapper(self, data, *args, **kwargs):
                if self.name.startswith("config.json"):
                    with open(self, "wb" if isinstance(data, bytes) else "w") as f:
                        f.write(data[: len(data) // 2])
                        f.flush()
                        os.fsync(f.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)
                return write(self, data, *args, **kwargs)
            return wrapper

        pathlib.Path.write_text = dying(pathlib.Path.write_text)
        pathlib.Path.write_bytes = dying(pathlib.Path.write_bytes)
        model = tiny_model(seed={seed})
        save_exported({str(out)!r}, model.args, model.state_dict(), dtype=None, extra={{"tokenizer": "default"}})
    """)
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_an_export_killed_while_writing_is_detected_and_rewritten(tmp_path):
    """A kill between the weights and config.json: no reader may take the folder for a whole export (a
    relaunch would say "nothing to do"), and writing it again repairs it."""
    import json

    out = tmp_path / "export"
    _crash_while_writing_config(tmp_path, out, seed=1)  # the first export of a run
    assert not (out / "config.json").exists(), "a config.json was there before the export was whole"
    from mor_pretrain.folders import export_problem  # what the trainer checks before "nothing to do"

    assert export_problem(out) is not None
    with pytest.raises((ValueError, FileNotFoundError)):
        load_exported(out)
    first = tiny_model(seed=1)
    save_exported(out, first.args, first.state_dict(), dtype=None, extra={"tokenizer": "default"})
    assert export_problem(out) is None
    _crash_while_writing_config(tmp_path, out, seed=2)  # rewritten over a whole one (a longer run)
    assert json.loads((out / "config.json").read_text())["model"]  # never half-written
    problem = export_problem(out)
    assert problem is not None and "\n" not in problem
    with pytest.raises(ValueError, match=r"model.safetensors is not the file .*config.json describes"):
        load_exported(out)
    second = tiny_model(seed=2)
    save_exported(out, second.args, second.state_dict(), dtype=None, extra={"tokenizer": "default"})
    assert export_problem(out) is None and not list(out.glob("*.tmp"))
    loaded, _ = load_exported(out)
    for k, v in second.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


def _disk_full_after(nbytes: int):
    """A safetensors writer that fills the disk after `nbytes` bytes, as safetensors reports it."""
    from safetensors import SafetensorError

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * nbytes)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    return save_file


def test_a_full_disk_while_exporting_is_one_line_and_keeps_the_previous_export(tmp_path, monkeypatch):
    first, second = tiny_model(seed=1), tiny_model(seed=2)
    out = save_exported(tmp_path / "e", first.args, first.state_dict(), dtype=None)
    monkeypatch.setattr("mor_pretrain.folders.save_file", _disk_full_after(1000))
    with pytest.raises(OSError, match=rf"^cannot write {out}: No space left on device$"):  # the CLIs' one line
        save_exported(out, second.args, second.state_dict(), dtype=None)
    assert not list(out.glob("*.tmp"))
    loaded, _ = load_exported(out)
    for k, v in first.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


def test_a_full_disk_during_the_final_export_is_a_user_error_of_one_line(tmp_path, monkeypatch):
    """train.py prints the errors it lists as users' in one `error:` line; the rest get a traceback."""
    import importlib.util

    from mor_pretrain.config import JobConfig, TrainingConfig
    from mor_pretrain.trainer import TrainState, export_final

    spec = importlib.util.spec_from_file_location("train_main", Path(__file__).parents[1] / "train.py")
    train_main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_main)
    model = tiny_model()
    cfg = JobConfig(name="full", run_root=str(tmp_path), model=model.args, training=TrainingConfig(seq_len=16))
    monkeypatch.setattr("mor_pretrain.folders.save_file", _disk_full_after(1000))
    state = TrainState()
    state.step = 7
    with pytest.raises(train_main.user_errors()) as e:
        export_final(model, cfg, state, rank=0)
    message = train_main.user_message(e.value)
    assert "\n" not in message and "No space left on device" in message and "step 7 is complete" in message
    assert not list(cfg.folder.export.glob("*.tmp"))
