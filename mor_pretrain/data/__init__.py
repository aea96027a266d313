"""Data pipeline: SentencePiece tokenizer, lazily read sources, packed windows, a resumable sharded loader."""

from mor_pretrain.data.loader import PackedLoader, build_dataloader
from mor_pretrain.data.sources import DataError
from mor_pretrain.data.tokenizer import Tokenizer, load_tokenizer, resolve_vocab_size

__all__ = ["DataError", "PackedLoader", "Tokenizer", "build_dataloader", "load_tokenizer", "resolve_vocab_size"]
