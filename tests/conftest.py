import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType

import pytest
import sentencepiece as spm
import torch
import torch.multiprocessing as mp

from mor_pretrain.models import ModelArgs, MoRModel

ROOT = Path(__file__).resolve().parents[1]


def tools_module(name: str) -> ModuleType:
    """A command line of tools/ (a script, not a package module), loaded from its file: nothing edits sys.path."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # where dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def smollm2_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M imported from its GGUF once per test session. Read-only: a test that changes it copies it."""
    from mor_pretrain.convert import gguf_to_export, smollm2_gguf_path

    return gguf_to_export(smollm2_gguf_path(), tmp_path_factory.mktemp("smollm2") / "export", progress=False)


def tiny_args(**kw) -> ModelArgs:
    base = dict(
        vocab_size=97,
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        d_ffn=64,
        max_seq_len=64,
        n_layers=8,
        num_recursions=3,
        sharing="middle_cycle",
    )
    base.update(kw)
    return ModelArgs(**base)


def tiny_model(seed: int = 0, **kw) -> MoRModel:
    torch.manual_seed(seed)
    model = MoRModel(tiny_args(**kw))
    model.init_weights()
    return model


def spread_thresholds(model: MoRModel, tokens: torch.Tensor) -> None:
    """Set an expert-threshold model's learned thresholds to each step's median score among the tokens that
    reach it, so its routing sends `tokens` to every depth (a fresh model's scores sit close together)."""
    stack, seen = model.stack, {}
    assert stack.expert_threshold is not None
    original = stack.expert_logits

    def spy(h, step, aux=False):
        seen[step] = original(h, step, aux).detach()
        return seen[step]

    stack.expert_logits = spy
    try:
        for r in range(1, model.args.num_recursions):
            with torch.no_grad():
                depth = model(tokens, routing="causal").depth
            stack.expert_threshold[r] = torch.sigmoid(seen[r][depth >= r]).median()
    finally:
        del stack.expert_logits


def train_bpe(texts: Iterable[str], prefix: Path, vocab_size: int, **options) -> Path:
    """Train a small SentencePiece BPE model on `texts` (about a second); returns the .model path."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        minloglevel=2,
        **options,
    )
    return prefix.with_suffix(".model")


def train_byte_bpe(texts: list[str], path: Path, specials: tuple[str, ...] = ("<|endoftext|>",)) -> Path:
    """A 300-token byte-level BPE (SmolLM2's tokenizer family) trained on `texts`, saved as tokenizer.json."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    t.train_from_iterator(texts, trainer)
    t.save(str(path))
    return path


# The default group's backend in multi-process tests: gloo for "cuda" tensors only, a backend map without a
# CPU entry, like nccl's. A collective that falls back on the default group (a CPU tensor, an object
# collective, a barrier) fails here as it would under nccl on a GPU; see mor_pretrain.distributed.
GPU_LIKE_BACKEND = "cuda:gloo"


def cpu_mesh(world: int):
    """A 1-D CPU mesh over `world` ranks with gloo groups of its own (the default group may serve CUDA only)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,), backend_override={0: "gloo"})


def spawn(fn: Callable[..., None], nprocs: int, *args) -> None:
    """mp.spawn(fn, args, nprocs) whose workers leave with os._exit(0) once fn(rank, *args) returns.

    After barrier() and destroy_process_group() the gloo backend's worker and transport threads are still
    running (FSDP2 and autograd keep the backend alive), and a spawned child exits through sys.exit: full
    interpreter teardown and C++ static destructors, which then race those threads and sometimes abort
    ("terminate called without an active exception"). os._exit skips the teardown, as fork children do.
    A worker that raises still reports its traceback through mp.spawn.
    """
    mp.spawn(_run_then_exit, args=(fn, args), nprocs=nprocs, join=True)


def _run_then_exit(rank: int, fn: Callable[..., None], args: tuple) -> None:
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny matmuls on a shared, busy CPU: OpenMP threads mostly wait on each other (up to 100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fp32_deterministic():
    torch.manual_seed(0)
    yield


# A mark expression that asks for `gpu` tests (and does not negate them), e.g. -m gpu or -m "gpu and not slow".
_ASKS_FOR_GPU = re.compile(r"(?<!not )\bgpu\b")


def pytest_configure(config: pytest.Config) -> None:
    """`-m gpu` without CUDA is an error: a GPU run must not pass by skipping everything."""
    if _ASKS_FOR_GPU.search(config.option.markexpr or "") and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"-m {config.option.markexpr!r} selects gpu tests, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda})"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu`-marked tests when no CUDA device is visible (the -ra summary lists them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu test: torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
