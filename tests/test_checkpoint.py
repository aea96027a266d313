import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import GPU_LIKE_BACKEND, cpu_mesh, spawn, tiny_model

from mor_pretrain.checkpoint import Checkpointer, ModelState, OptimizerState
from mor_pretrain.config import CheckpointConfig, CheckpointError
from mor_pretrain.distributed import PreemptionWatcher, barrier
from mor_pretrain.folders import COMPLETE, complete_steps, step_dir


class Counter:
    """A minimal Stateful per-rank object (stands in for the data loader's state)."""

    def __init__(self, n: int = 0):
        self.n = n

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, sd):
        self.n = sd["n"]


def train_steps(model, opt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, 97, (2, 16), generator=g)
        model(x, x).loss.backward()
        opt.step()
        opt.zero_grad()


def make(seed=0):
    model = tiny_model(seed=seed, router="expert")
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def states(model, opt):
    return {"model": ModelState(model), "optimizer": OptimizerState(model, opt)}


def test_save_prune_and_exact_restore(tmp_path):
    model, opt = make()
    ck = Checkpointer(CheckpointConfig(interval=2, keep_latest=2), tmp_path, config_toml="x = 1\n")
    counter = Counter()
    for step in range(1, 7):
        train_steps(model, opt, 1, seed=step)
        counter.n = step
        if ck.should_save(step, last=False):
            ck.save(step, states(model, opt), {"dataloader": counter})
    assert complete_steps(tmp_path) == [4, 6]
    assert not step_dir(tmp_path, 2).exists()
    assert (step_dir(tmp_path, 6) / "config.toml").read_text() == "x = 1\n"
    fresh, fresh_opt = make(seed=1)
    c2 = Counter()
    step = ck.resolve_load_step()
    assert step == 6
    torch.manual_seed(999)
    ck.load(step_dir(tmp_path, step), states(fresh, fresh_opt), {"dataloader": c2}, check_config=lambda _: None)
    assert c2.n == 6
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    # Optimizer moments restored: one more identical step gives identical weights.
    train_steps(model, opt, 1, seed=50)
    train_steps(fresh, fresh_opt, 1, seed=50)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rng_state_round_trips(tmp_path):
    model, opt = make()
    ck = Checkpointer(CheckpointConfig(), tmp_path)
    torch.manual_seed(7)
    ck.save(1, states(model, opt), {})
    after = torch.rand(4)
    torch.manual_seed(0)
    ck.load(step_dir(tmp_path, 1), states(model, opt), {}, check_config=lambda _: None)
    torch.testing.assert_close(torch.rand(4), after)


def test_cuda_rng_state_is_the_current_devices_so_fewer_gpus_can_resume(monkeypatch):
    """A node with 8 visible GPUs saves; a task that sees one GPU (SLURM, a smaller node) restores. Only the
    current device's CUDA generator is saved and restored: the all-devices calls would fail on the resume."""
    from mor_pretrain.checkpoint import rng_state, set_rng_state

    restored = []

    def every_device(*_):
        raise AssertionError("the RNG state of every visible device is not portable to fewer devices")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.arange(16, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_device)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", every_device)
    state = json.loads(json.dumps(rng_state()))  # as the per-rank JSON file holds it
    set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], torch.arange(16, dtype=torch.uint8))


def test_explicit_load_step_must_exist_and_incomplete_is_ignored(tmp_path):
    model, opt = make()
    ck = Checkpointer(CheckpointConfig(keep_latest=5), tmp_path)
    ck.save(3, states(model, opt), {})
    (step_dir(tmp_path, 5)).mkdir()  # a crashed save: no COMPLETE marker
    assert ck.resolve_load_step() == 3
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ck.load(step_dir(tmp_path, 5), states(model, opt), {}, check_config=lambda _: None)
    bad = Checkpointer(CheckpointConfig(load_step=5), tmp_path)
    with pytest.raises(FileNotFoundError, match="load_step=5"):
        bad.resolve_load_step()


def test_config_check_sees_the_saved_config(tmp_path):
    model, opt = make()
    ck = Checkpointer(CheckpointConfig(), tmp_path, config_toml="[model]\nd_model = 32\n")
    ck.save(1, states(model, opt), {})

    def refuse(saved: str):
        raise ValueError(f"refused: {saved.strip()}")

    with pytest.raises(ValueError, match="d_model = 32"):
        ck.load(step_dir(tmp_path, 1), states(model, opt), {}, check_config=refuse)


def test_async_save_completes_and_reports_stall(tmp_path):
    model, opt = make()
    ck = Checkpointer(CheckpointConfig(async_save=True, keep_latest=1), tmp_path)
    rec = ck.save(1, states(model, opt), {"dataloader": Counter(1)})
    assert rec.stall_s >= 0
    train_steps(model, opt, 1)  # training goes on while the write finishes
    ck.save(2, states(model, opt), {"dataloader": Counter(2)})
    ck.close()
    assert complete_steps(tmp_path) == [2]
    assert all(r.total_s is not None and r.total_s >= r.stall_s for r in ck.records)


def _fsdp_worker(rank, world, ckdir, out, save):
    # A file rendezvous: no port to pick, so no race with other processes for one.
    init = f"file://{ckdir}/rendezvous-{'save' if save else 'load'}"
    dist.init_process_group(
        GPU_LIKE_BACKEND, init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    from torch.distributed.fsdp import fully_shard

    model, _ = make(seed=0)
    mesh = cpu_mesh(world)
    fully_shard(model.stack, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ck = Checkpointer(CheckpointConfig(), Path(ckdir))
    counter = Counter(rank)
    if save:
        train_steps(model, opt, 2)
        ck.save(2, states(model, opt), {"dataloader": counter})
    else:
        ck.load(step_dir(Path(ckdir), 2), states(model, opt), {"dataloader": counter}, check_config=lambda _: None)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({"model": full, "counter": counter.n}, out)
    barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_checkpoint_reshards_from_2_ranks_to_1(tmp_path):
    spawn(_fsdp_worker, 2, 2, str(tmp_path), "", True)
    spawn(_fsdp_worker, 1, 1, str(tmp_path), str(tmp_path / "full.pt"), False)
    got = torch.load(tmp_path / "full.pt")
    ref, opt = make(seed=0)
    train_steps(ref, opt, 2)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got["model"][k], v, rtol=1e-6, atol=1e-6, msg=k)
    assert got["counter"] == 0  # rank 0's per-rank state is the fallback for a new layout


def test_sigkill_mid_save_leaves_previous_checkpoint_loadable(tmp_path):
    """A process killed while writing step 2 leaves step 1 as the latest complete checkpoint."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch.distributed.checkpoint as dcp
        from test_checkpoint import make, states, train_steps
        from mor_pretrain.checkpoint import Checkpointer
        from mor_pretrain.config import CheckpointConfig
        model, opt = make()
        ck = Checkpointer(CheckpointConfig(keep_latest=3), {str(tmp_path)!r})
        ck.save(1, states(model, opt), {{}})
        orig = dcp.FileSystemWriter.write_data
        def slow_write(self, plan, planner):
            open({str(tmp_path / "writing")!r}, "w").close()
            time.sleep(60)
            return orig(self, plan, planner)
        dcp.FileSystemWriter.write_data = slow_write
        train_steps(model, opt, 1)
        ck.save(2, states(model, opt), {{}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not (tmp_path / "writing").exists():
        assert proc.poll() is None and time.time() < deadline, "child never reached the save"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert step_dir(tmp_path, 2).exists() and not (step_dir(tmp_path, 2) / COMPLETE).exists()
    ck = Checkpointer(CheckpointConfig(), tmp_path)
    assert ck.resolve_load_step() == 1
    model, opt = make(seed=5)
    ck.load(step_dir(tmp_path, 1), states(model, opt), {}, check_config=lambda _: None)
    ref, _ = make()
    torch.testing.assert_close(
        model.state_dict()["first.attention.wq.weight"], ref.state_dict()["first.attention.wq.weight"]
    )
    # The next save at step 2 replaces the partial folder and completes.
    ck.save(2, states(model, opt), {})
    assert complete_steps(tmp_path) == [1, 2]


def test_structural_config_changes_are_named_and_safe_ones_allowed():
    from mor_pretrain.checkpoint import config_differences
    from mor_pretrain.config import config_to_dict, dump_toml, load_config

    root = Path(__file__).resolve().parents[1]
    saved = load_config(root / "train_configs/debug_mor.toml")
    safe = load_config(root / "train_configs/debug_mor.toml", ["--optimizer.lr=1e-4", "--metrics.log_interval=1"])
    assert config_differences(dump_toml(saved), config_to_dict(safe)) == []
    bad = load_config(root / "train_configs/debug_mor.toml", ["--model.d_model=64", "--model.router=token"])
    diffs = config_differences(dump_toml(saved), config_to_dict(bad))
    assert any(d.startswith("model.d_model: checkpoint has 128, this run has 64") for d in diffs)
    assert any(d.startswith("model.router") for d in diffs) and len(diffs) == 2


def test_every_model_field_is_classified_structural_or_not():
    """A new ModelArgs field must be put in one of the two tuples: a forgotten one fails here."""
    import dataclasses

    from mor_pretrain.checkpoint import STRUCTURAL_KEYS
    from mor_pretrain.models import ModelArgs
    from mor_pretrain.models.mor import NON_STRUCTURAL_FIELDS, STRUCTURAL_FIELDS

    names = [f.name for f in dataclasses.fields(ModelArgs)]
    assert not set(STRUCTURAL_FIELDS) & set(NON_STRUCTURAL_FIELDS)
    assert sorted([*STRUCTURAL_FIELDS, *NON_STRUCTURAL_FIELDS]) == sorted(names)
    assert STRUCTURAL_KEYS["model"] == list(STRUCTURAL_FIELDS)
    # What the weights mean, by hand: a checkpoint of one of these resumed as another is a different model.
    meaning = {"vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ffn", "tie_embeddings", "sharing"}
    meaning |= {"num_recursions", "router", "router_arch", "aux_router", "expert_rule", "capacities", "kv_mode"}
    meaning |= {"recursion_gate", "residual_scale", "router_alpha", "router_activation", "rope_theta", "norm_eps"}
    assert meaning == set(STRUCTURAL_FIELDS)
    assert {"aux_loss_coef", "z_loss_coef", "balance_loss_coef", "init_std"} <= set(NON_STRUCTURAL_FIELDS)


@pytest.mark.parametrize(
    ("key", "saved", "resumed"),
    [("expert_rule", "topk", "threshold"), ("kv_mode", "recursion", "share"), ("router_alpha", 0.1, 1.0)],
)
def test_a_resume_under_another_structural_value_is_one_line_naming_it(tmp_path, key, saved, resumed):
    """A top-k checkpoint resumed as expert-threshold (or with another KV mode, gate scale) is refused before
    anything loads, in one line naming the field and both values."""
    import dataclasses

    from conftest import tiny_args

    from mor_pretrain.config import ConfigError, JobConfig, TrainingConfig, dump_toml
    from mor_pretrain.models import MoRModel
    from mor_pretrain.trainer import resume

    def job(value):
        cfg = JobConfig(model=tiny_args(router="expert", **{key: value}), training=TrainingConfig(seq_len=16))
        cfg.validate()
        return cfg

    old, new = job(saved), job(resumed)
    model = MoRModel(old.model)
    model.init_weights()
    Checkpointer(CheckpointConfig(), tmp_path, config_toml=dump_toml(old)).save(1, {"model": ModelState(model)}, {})
    fresh = MoRModel(new.model)
    with pytest.raises(ConfigError) as e:
        resume(Checkpointer(new.checkpoint, tmp_path), new, {"model": ModelState(fresh)}, {})
    msg = str(e.value)
    assert "\n" not in msg and f"cannot resume from {step_dir(tmp_path, 1)}" in msg
    assert msg.endswith(f"model.{key}: checkpoint has {saved!r}, this run has {resumed!r}"), msg
    # A field that changes only training (a loss coefficient, the threshold's update rate) is no difference.
    from mor_pretrain.checkpoint import config_differences
    from mor_pretrain.config import config_to_dict

    new.model = dataclasses.replace(old.model, aux_loss_coef=0.5, threshold_rate=0.5, causal_threshold=0.3)
    assert config_differences(dump_toml(old), config_to_dict(new)) == []


def test_preemption_signal_sets_flag_single_process():
    from mor_pretrain.distributed import PreemptionWatcher

    old = signal.getsignal(signal.SIGUSR1)
    try:
        w = PreemptionWatcher(signals=(signal.SIGUSR1,))
        assert not w.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert w.should_stop()
    finally:
        signal.signal(signal.SIGUSR1, old)


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _plant(ckpt: Path, name: str, data: bytes) -> None:
    """What an attacker does: replace a file and rewrite the manifest so that the checksums agree."""
    from mor_pretrain.folders import mark_complete

    (ckpt / name).write_bytes(data)
    mark_complete(ckpt, 1)


def _load(ck, path, model, opt, per_rank=None):
    ck.load(path, states(model, opt), per_rank or {}, check_config=lambda _: None)


@pytest.mark.parametrize("name", ["rank0.json", "rank0.pt"])
def test_pickle_payload_as_per_rank_state_is_refused(tmp_path, name):
    import pickle

    model, opt = make()
    ck = Checkpointer(CheckpointConfig(), tmp_path / "ck")
    ck.save(1, states(model, opt), {"dataloader": Counter(1)})
    ckpt = step_dir(tmp_path / "ck", 1)
    (ckpt / "rank0.json").unlink()
    marker = tmp_path / "pwned"
    _plant(ckpt, name, pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=rf"{name}.*(pickle|never loaded)|no per-rank state"):
        _load(ck, ckpt, model, opt, {"dataloader": Counter()})
    assert not marker.exists()


def test_hostile_or_garbled_dcp_metadata_is_refused_on_resume_and_conversion(tmp_path):
    import pickle

    from mor_pretrain.folders import load_dcp_model

    model, opt = make()
    ck = Checkpointer(CheckpointConfig(), tmp_path / "ck", config_toml="")
    ck.save(1, states(model, opt), {})
    ckpt = step_dir(tmp_path / "ck", 1)
    good = (ckpt / ".metadata").read_bytes()
    marker = tmp_path / "pwned"
    _plant(ckpt, ".metadata", pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=r"refusing to load .*\.metadata.*builtins\.exec"):
        _load(ck, ckpt, model, opt)
    with pytest.raises(CheckpointError, match=r"refusing to load .*\.metadata"):
        load_dcp_model(ckpt, config=tmp_path / "none.toml", progress=False)
    assert not marker.exists()
    _plant(ckpt, ".metadata", good[: len(good) // 2])  # truncated, with a consistent manifest
    with pytest.raises(CheckpointError, match=r"refusing to load .*step-00000001/\.metadata"):
        _load(ck, ckpt, model, opt)


class _PlantedState:
    """A non-tensor state item whose pickle runs code when read with weights_only=False: what a forger
    writes at a byte item's offset in a .distcp file (train state, scheduler, optimizer param groups)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def state_dict(self):
        return {"step": _Payload(self.marker)}

    def load_state_dict(self, sd):
        raise AssertionError("the planted item was read")


@pytest.mark.parametrize("key", ["train_state", "lr_scheduler", "optimizer"])
def test_pickle_in_a_dcp_byte_item_runs_nothing_and_names_the_file(tmp_path, key):
    model, opt = make()
    marker = tmp_path / "pwned"
    ck = Checkpointer(CheckpointConfig(), tmp_path / "ck")
    ck.save(1, {**states(model, opt), key: _PlantedState(marker)}, {})
    ckpt = step_dir(tmp_path / "ck", 1)
    with pytest.raises(CheckpointError, match=rf"^{ckpt}/__0_0\.distcp: item '{key}\.step' is not plain data") as e:
        ck.load(ckpt, {**states(model, opt), key: _PlantedState(marker)}, {}, check_config=lambda _: None)
    assert not marker.exists()
    message = str(e.value)  # one line: neither DCP's traceback text nor torch's page of advice
    assert "\n" not in message and "\x1b" not in message and "trust" not in message and len(message) < 400
    assert message.endswith("(UnpicklingError: Unsupported global: GLOBAL exec was not an allowed global by default)")


@pytest.mark.parametrize("target", ["../outside.distcp", "/etc/passwd", "sub/__0_0.distcp"])
def test_dcp_metadata_naming_a_file_outside_the_checkpoint_is_refused(tmp_path, target):
    import pickle

    model, opt = make()
    ck = Checkpointer(CheckpointConfig(), tmp_path / "ck")
    ck.save(1, states(model, opt), {})
    ckpt = step_dir(tmp_path / "ck", 1)
    meta = pickle.loads((ckpt / ".metadata").read_bytes())  # the test's own file: trusted
    for info in meta.storage_data.values():
        info.relative_path = target
    _plant(ckpt, ".metadata", pickle.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"storage entry names '{target}', not a file of"):
        _load(ck, ckpt, model, opt)


def test_a_full_disk_is_one_line_and_leaves_the_last_checkpoint(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    model, opt = make()
    ck = Checkpointer(CheckpointConfig(keep_latest=3), tmp_path)
    ck.save(1, states(model, opt), {})
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(CheckpointError, match=r"not saving step 2: No space left on device: .* nothing was written"):
        ck.save(2, states(model, opt), {})
    assert not step_dir(tmp_path, 2).exists()
    # Space runs out during the write: torch's error is about stream positions; ours names the cause.
    free = iter([10**12, 1000])
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**12, 0, next(free)))

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4374")

    monkeypatch.setattr("mor_pretrain.checkpoint.dcp.save", full)
    with pytest.raises(
        CheckpointError, match=r"step-00000002 failed: No space left on device; .*the last .*step-00000001"
    ):
        ck.save(2, states(model, opt), {})
    assert complete_steps(tmp_path) == [1]


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize(("code", "words"), [(28, "No space left on device"), (13, "Permission denied")])
def test_a_save_that_fails_mid_write_removes_its_folder_and_names_the_cause(
    tmp_path, monkeypatch, code, words, async_save
):
    """The writer fails after its first item (a disk that fills, a permission lost mid-save): one line naming
    the cause, the partial step folder removed, the last complete checkpoint kept, and the next save works."""
    import torch.distributed.checkpoint.filesystem as fs

    model, opt = make()
    ck = Checkpointer(CheckpointConfig(keep_latest=3, async_save=async_save), tmp_path)
    ck.save(1, states(model, opt), {}, wait=True)
    original, calls = fs._write_item, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(code, os.strerror(code))
        return original(*args, **kwargs)

    monkeypatch.setattr(fs, "_write_item", failing)
    with pytest.raises(CheckpointError) as e:
        ck.save(2, states(model, opt), {})
        ck.close()  # an async save fails when it is waited for
    assert len(calls) > 1  # it failed mid-write, not before
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"saving checkpoint {step_dir(tmp_path, 2)} failed: {words}")
    assert "partial folder was removed" in message and f"{step_dir(tmp_path, 1)}, is intact" in message
    assert not step_dir(tmp_path, 2).exists() and complete_steps(tmp_path) == [1]
    monkeypatch.setattr(fs, "_write_item", original)
    ck.save(2, states(model, opt), {}, wait=True)
    assert complete_steps(tmp_path) == [1, 2]


def test_damaged_or_missing_files_are_named_with_the_last_good_checkpoint(tmp_path):
    model, opt = make()
    ck = Checkpointer(CheckpointConfig(keep_latest=3), tmp_path)
    ck.save(1, states(model, opt), {"dataloader": Counter(1)})
    ck.save(2, states(model, opt), {"dataloader": Counter(2)})
    data = next(step_dir(tmp_path, 2).glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte, size unchanged
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{data.name} does not match its checksum.*verifies is .*step-00000001"):
        _load(ck, step_dir(tmp_path, 2), model, opt)
    (step_dir(tmp_path, 1) / "rank0.json").unlink()
    with pytest.raises(CheckpointError, match=r"step-00000001/rank0.json is missing"):
        _load(ck, step_dir(tmp_path, 1), model, opt, {"dataloader": Counter()})
    (step_dir(tmp_path, 1) / "rank0.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"rank0.json has \d+ bytes"):
        _load(ck, step_dir(tmp_path, 1), model, opt, {"dataloader": Counter()})


def test_rewinding_is_refused_and_a_complete_checkpoint_is_never_replaced(tmp_path):
    model, opt = make()
    ck = Checkpointer(CheckpointConfig(keep_latest=3), tmp_path)
    ck.save(3, states(model, opt), {})
    ck.save(6, states(model, opt), {})
    with pytest.raises(CheckpointError, match=r"load_step=3 would rewind over the later checkpoints \[6\].*init_from"):
        Checkpointer(CheckpointConfig(load_step=3), tmp_path).resolve_load_step()
    assert Checkpointer(CheckpointConfig(load_step=6), tmp_path).resolve_load_step() == 6
    before = (step_dir(tmp_path, 6) / COMPLETE).read_text()
    with pytest.raises(CheckpointError, match="refusing to overwrite the complete checkpoint"):
        ck.save(6, states(model, opt), {})
    assert (step_dir(tmp_path, 6) / COMPLETE).read_text() == before


def test_nonfinite_weights_are_never_saved(tmp_path):
    model, opt = make()
    ck = Checkpointer(CheckpointConfig(keep_latest=1), tmp_path)
    ck.save(1, states(model, opt), {})
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        ck.save(2, states(model, opt), {})
    assert complete_steps(tmp_path) == [1] and not step_dir(tmp_path, 2).exists()


def test_a_checkpoint_holding_nan_weights_is_never_resumed_from(tmp_path):
    """Written otherwise than by a save (which refuses them): a resume names the tensor and the last good one."""
    import torch.distributed.checkpoint as dcp

    from mor_pretrain.folders import mark_complete

    model, opt = make()
    ck = Checkpointer(CheckpointConfig(keep_latest=3), tmp_path)
    ck.save(1, states(model, opt), {})
    with torch.no_grad():
        model.norm.weight[3] = float("inf")
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(step_dir(tmp_path, 2)))
    mark_complete(step_dir(tmp_path, 2), 2)
    fresh, fresh_opt = make(seed=1)
    with pytest.raises(CheckpointError, match=r"step-00000002: tensor norm.weight holds NaN or inf.*step-00000001"):
        _load(ck, step_dir(tmp_path, 2), fresh, fresh_opt)


def test_skipped_checkpoint_folders_are_logged_with_the_reason(tmp_path, caplog):
    model, opt = make()
    ck = Checkpointer(CheckpointConfig(keep_latest=3), tmp_path)
    ck.save(1, states(model, opt), {})
    step_dir(tmp_path, 2).mkdir()
    (tmp_path / "step-x").mkdir()
    with caplog.at_level("WARNING", logger="mor_pretrain.folders"):
        assert ck.resolve_load_step() == 1
    assert "step-00000002: no COMPLETE marker" in caplog.text and "step-x: its name is not" in caplog.text


def test_run_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    from mor_pretrain.distributed import RunLock

    hold = (
        f"import time; from mor_pretrain.distributed import RunLock; RunLock({str(tmp_path)!r}); print(1, flush=True)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold + "; time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "1"
    with pytest.raises(CheckpointError, match=rf"in use by another job \(host \S+ pid {holder.pid}\)"):
        RunLock(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    RunLock(tmp_path).release()  # the kernel dropped the dead holder's lock


@pytest.mark.parametrize(
    ("name", "data", "match"),
    [
        ("config.toml", b"[model\nd_model = 3\n", r"config.toml is not a TOML job config"),
        ("config.toml", b"\xff\xfe[model]\n", r"config.toml is not a TOML job config"),
        ("config.toml", b"model = 3\n", r"config.toml: \[model\] must be a table, got int"),
        ("rank0.json", b'{"dataloader": {"n": "many"}, "rng": {}}', r"rank0.json: unusable per-rank state"),
        ("rank0.json", b'{"dataloader": {"n": 1}, "rng": {"torch": "AAAA"}}', r"rank0.json: unusable per-rank state"),
        ("rank0.json", b'{"dataloader": {"n": 1}}', r"rank0.json: unusable per-rank state \(KeyError: 'rng'\)"),
    ],
)
def test_hand_edited_state_with_a_matching_manifest_is_one_error_naming_the_file(tmp_path, name, data, match):
    class StrictCounter(Counter):
        def load_state_dict(self, sd):
            self.n = int(sd["n"])

    model, opt = make()
    ck = Checkpointer(CheckpointConfig(), tmp_path / "ck", config_toml="[model]\nd_model = 32\n")
    ck.save(1, states(model, opt), {"dataloader": Counter(1)})
    ckpt = step_dir(tmp_path / "ck", 1)
    _plant(ckpt, name, data)

    def check(saved):
        from mor_pretrain.checkpoint import config_differences

        config_differences(saved, {"model": {"d_model": 32}})

    with pytest.raises(CheckpointError, match=match):
        ck.load(ckpt, states(model, opt), {"dataloader": StrictCounter()}, check_config=check)


def test_a_worker_whose_launcher_died_stops_as_if_signalled(monkeypatch):
    """torchrun killed alone leaves its workers running; each step they check their parent is still it."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setattr(os, "getppid", lambda: 4242)
    w = PreemptionWatcher(signals=())
    assert not w.should_stop()
    monkeypatch.setattr(os, "getppid", lambda: 1)  # re-parented: the launcher is gone
    assert w.should_stop() and w.requested
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert not PreemptionWatcher(signals=()).should_stop()  # plain `python train.py`: no launcher to watch
