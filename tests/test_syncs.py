"""Host syncs (the host waiting for the device) of every routing kind, counted on fake CUDA tensors without a
GPU: a training step, validation, cached generation and the serving engine. Each count must be the one that
mor_pretrain.estimate.DOCUMENTED_SYNCS states, and the dry run must count a training step's alike.

FakeTensorMode takes device="cuda" without a driver and raises on a mix of devices. What it cannot do:
- backward: the autograd engine needs a real CUDA device. The training step runs with a stub backward (zero
  gradients on the device), and the backward's syncs are counted apart, on fake CPU tensors;
- values: a fake tensor has none. The training step reads each as the dry run does (one, true); validation,
  generation and serving, whose loops run on what they read, replay the reads of a real CPU run.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed.device_mesh import init_device_mesh
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from mor_pretrain.config import JobConfig, load_config
from mor_pretrain.estimate import DOCUMENTED_SYNCS, HOST_SYNC_OPS, estimate, fake_world, host_sync
from mor_pretrain.generate import SamplingConfig, generate
from mor_pretrain.models import MoRModel
from mor_pretrain.optim import build_lr_scheduler, build_optimizer
from mor_pretrain.parallel import MESH_DIMS
from mor_pretrain.serving import DepthBatchEngine
from mor_pretrain.trainer import Parallel, size_vocabulary, train_step, validate

ROOT = Path(__file__).parents[1]
CUDA, CPU = torch.device("cuda"), torch.device("cpu")
pytestmark = pytest.mark.usefixtures("single_thread")

# Every router kind and rule the config allows, on the debug configs with fewer layers and shorter batches that
# keep their structure (unique first and last blocks, a shared layer, top-k below the sequence): syncs grow
# with neither, the test's time does. KV sharing for two of them.
SMALL = ("--training.micro_batch_size=2", "--training.seq_len=32")
MOR = ("debug_mor.toml", "--model.n_layers=5", *SMALL)
RECURSIVE = (
    "debug_vanilla.toml",
    "--model.n_layers=5",
    "--model.num_recursions=3",
    "--model.sharing=middle_cycle",
    *SMALL,
)
VARIANTS = {
    "vanilla": ("debug_vanilla.toml", "--model.n_layers=2", *SMALL),
    "recursive": RECURSIVE,
    "recursive_gate": (*RECURSIVE, "--model.recursion_gate=0.5"),
    "recursive_share": (*RECURSIVE, "--model.kv_mode=share"),
    "expert_topk": MOR,
    "expert_topk_share": (*MOR, "--model.kv_mode=share"),
    "expert_threshold": (*MOR, "--model.expert_rule=threshold"),
    "expert_random": (*MOR, "--model.expert_rule=random"),
    "token": (*MOR, "--model.router=token"),
}
PROMPT = [5, 6, 7, 8, 9]


def config(variant: str) -> JobConfig:
    name, *overrides = VARIANTS[variant]
    cfg = load_config(str(ROOT / "train_configs" / name), ["--data.tokenizer=default", *overrides])
    size_vocabulary(cfg)
    return cfg


def _value_dependent(func: Any, args: Any) -> bool:
    """Whether an op's result is a value, or has a size that depends on values: what a fake tensor lacks."""
    name = func._overloadpacket.__name__
    bool_index = name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1])
    return name in HOST_SYNC_OPS or bool_index


class _Syncs(TorchDispatchMode):
    """Counts the host syncs (estimate.host_sync) of code computing on `device`, and answers what a fake tensor
    cannot: from `replay`, the reads of a real run in order, or without one as the dry run does (one, true)."""

    def __init__(self, device: torch.device, replay: list[tuple[Any, Any]] | None = None):
        super().__init__()
        self.device, self.replay = device, replay
        self.count: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.replay is not None and _value_dependent(func, args):
            assert self.replay, f"{func} reads more than the real run did"
            recorded, answer = self.replay.pop(0)
            assert recorded == func, f"the replay is out of step: {func} where the real run read {recorded}"
            out = (
                torch.empty(answer[0], dtype=answer[1], device=args[0].device) if isinstance(answer, tuple) else answer
            )
        elif func == torch.ops.aten._local_scalar_dense.default:
            out = True if args[0].dtype == torch.bool else 1.0 if args[0].dtype.is_floating_point else 1
        else:
            out = func(*args, **kwargs)
        if sync := host_sync(func, args, kwargs, out, self.device):
            self.count[sync] += 1
        return out


class _Record(TorchDispatchMode):
    """The reads of a real run, in order, for _Syncs to replay: values, and (size, dtype) of results."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[Any, Any]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if _value_dependent(func, args):
            self.reads.append((func, (out.shape, out.dtype) if isinstance(out, torch.Tensor) else out))
        return out


class _ReadAsFake(TorchFunctionMode):
    """The real run reads as the fake one does, so that both runs' reads line up: a real tensor's tolist()
    reads its memory without an op, a fake one reads element by element (unbind, then .item() each); one_hot
    checks its classes on the host for a CPU tensor only (not for a CUDA or a fake one)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.Tensor.tolist:
            return FakeTensor.tolist(args[0])
        if func is F.one_hot:
            with _disable_current_modes():
                return func(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _zero_model(cfg: JobConfig) -> MoRModel:
    """A model whose weights and buffers are all zero, but token choice's bias towards the deepest depth:
    every router logit is 0, a score of 0.5 that clears every threshold, so each token runs every recursion
    step and the counts depend on no weights."""
    with torch.device("meta"):
        model = MoRModel(cfg.model)
    model.to_empty(device=CPU)
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            t.zero_()
        model.stack.depth_bias[-1:] = 1.0
    return _zero_scores(model)


def _zero_scores(model: MoRModel) -> MoRModel:
    """Random scores (expert-random) drawn as logit 0 too, like every zero router's, so they route alike."""
    if model.args.expert_rule == "random":
        real = model.stack.expert_logits
        model.stack.expert_logits = lambda h, step, aux=False: torch.zeros_like(real(h, step, aux))  # type: ignore[method-assign]
    return model


def _replayed(cfg: JobConfig, run: Callable[[MoRModel, torch.device], object]) -> Counter[str]:
    """Host syncs of `run(model, device)` on fake CUDA, replaying the reads of a real CPU run (each token
    runs every recursion step)."""
    model = _zero_model(cfg)
    with _ReadAsFake(), _Record() as record:
        run(model, CPU)
    with FakeTensorMode():
        with torch.device(CUDA):
            fake = _zero_scores(MoRModel(cfg.model))
        with _Syncs(CUDA, record.reads) as syncs:
            run(fake, CUDA)
    assert not record.reads, f"the fake run read less than the real run: {record.reads[:3]}"
    return syncs.count


def _train(cfg: JobConfig, micro_batches: int, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Host syncs of the second train_step over `micro_batches` micro-batches on fake CUDA (the first one
    creates the optimizer state), with the backward a stub."""
    t = cfg.training
    with fake_world(1):
        mesh = init_device_mesh("cpu", (1, 1, 1), mesh_dim_names=MESH_DIMS)
        with FakeTensorMode(), monkeypatch.context() as patch:
            with torch.device(CUDA):
                model = MoRModel(cfg.model)

            def backward(*_: Any, **__: Any) -> None:
                for p in model.parameters():
                    p.grad = torch.zeros_like(p) if p.grad is None else p.grad

            patch.setattr(torch.Tensor, "backward", backward)
            optimizer = build_optimizer(model, cfg.optimizer)  # fused on CUDA, as a run's
            scheduler = build_lr_scheduler(optimizer, cfg.optimizer, t.steps)
            par = Parallel(CUDA, mesh, 0, 1, 1)
            # The loader's batches, already moved: pinned and copied non_blocking, they do not sync (and a fake
            # tensor cannot be pinned).
            ids = torch.zeros(t.micro_batch_size, t.seq_len, dtype=torch.long, device=CUDA)
            batches = [{"input": ids, "labels": ids}] * micro_batches
            with _Syncs(CUDA):
                train_step(model, optimizer, scheduler, batches, par, cfg)
            with _Syncs(CUDA) as syncs:
                train_step(model, optimizer, scheduler, batches, par, cfg)
    return syncs.count


def _backward(cfg: JobConfig) -> Counter[str]:
    """Host syncs of one micro-batch's backward, on fake CPU tensors (what the stub leaves out)."""
    t = cfg.training
    with FakeTensorMode():
        model = MoRModel(cfg.model)
        ids = torch.zeros(t.micro_batch_size, t.seq_len, dtype=torch.long)
        with _Syncs(CPU):
            out = model(ids, ids, return_logits=False)
        assert out.loss is not None
        with _Syncs(CPU) as syncs:
            out.loss.backward()
    return syncs.count


def _per_unit(run: Callable[[int], Counter[str]]) -> tuple[Counter[str], Counter[str]]:
    """(per unit, once per call) host syncs from runs over one and two units."""
    one, two = run(1), run(2)
    return two - one, one - (two - one)


def _assert_documented(cfg: JobConfig, phase: str, each: Counter[str], once: Counter[str]) -> None:
    documented = DOCUMENTED_SYNCS[cfg.model.router_kind, cfg.model.kv_mode][phase]
    assert (each.total(), once.total()) == documented, f"{phase}: {dict(each)} per unit, {dict(once)} once"


def _dry_run_syncs(cfg: JobConfig) -> Counter[str]:
    return estimate(cfg, 1).step.host_syncs


@pytest.fixture(scope="module")
def fresh_process() -> Any:
    """One interpreter for the dry runs of this module: process groups that earlier tests of a full run made
    and destroyed leave device-mesh state behind that the dry run's fake group can trip over."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        yield pool


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_step(variant, monkeypatch, fresh_process):
    """train_step's syncs per micro-batch and per step, and the dry run's count of a step: the same (its CPU
    trace sees a tensor made from Python data on the device as the copy it is on a GPU)."""
    cfg = config(variant)
    micro, step = _per_unit(lambda n: _train(cfg, n, monkeypatch))
    micro += _backward(cfg)
    _assert_documented(cfg, "train", micro, step)
    # The dry run at one micro-batch per step: one trace, not two.
    one = dataclasses.replace(cfg.training, global_batch_size=cfg.training.micro_batch_size)
    assert fresh_process.apply(_dry_run_syncs, (dataclasses.replace(cfg, training=one),)) == micro + step


@pytest.mark.parametrize("variant", VARIANTS)
def test_validation(variant):
    """validate(): syncs per batch (its forwards, causal and top-k where they differ) and per call."""
    cfg = config(variant)
    t = cfg.training

    def run(batches: int) -> Counter[str]:
        def val(model: MoRModel, device: torch.device) -> None:
            ids = torch.zeros(t.micro_batch_size, t.seq_len, dtype=torch.long)  # the loader's, on the host
            validate(model, [{"input": ids, "labels": ids}] * batches, batches, Parallel(device, mesh, 0, 1, 1))

        return _replayed(cfg, val)

    with fake_world(1):
        mesh = init_device_mesh("cpu", (1, 1, 1), mesh_dim_names=MESH_DIMS)
        _assert_documented(cfg, "validate", *_per_unit(run))


@pytest.mark.parametrize("variant", VARIANTS)
def test_generation(variant):
    """generate(), one prompt, greedy: syncs per generated token after the first, and per call."""
    cfg = config(variant)

    def run(tokens: int) -> Counter[str]:
        return _replayed(cfg, lambda model, _: generate(model, [PROMPT], SamplingConfig(max_new_tokens=tokens + 1)))

    _assert_documented(cfg, "generate", *_per_unit(run))


@pytest.mark.parametrize("variant", VARIANTS)
def test_serving(variant):
    """The serving engine, one slot, one request, greedy: syncs per generated token after the first, and per
    request."""
    cfg = config(variant)

    def run(tokens: int) -> Counter[str]:
        def serve(model: MoRModel, _: torch.device) -> None:
            engine = DepthBatchEngine(model, slots=1, max_len=32)
            engine.submit(PROMPT, max_new_tokens=tokens + 1)
            engine.run()

        return _replayed(cfg, serve)

    _assert_documented(cfg, "serve", *_per_unit(run))
