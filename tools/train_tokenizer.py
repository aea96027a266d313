"""Train a SentencePiece BPE or unigram tokenizer on text, jsonl or parquet sources.

    python tools/train_tokenizer.py data/corpus/train --out data/tokenizer/corpus8k --vocab-size 8000

writes data/tokenizer/corpus8k.model (use it as data.tokenizer) and .vocab. Documents are fed line by line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

# The package (and torch with it) loads where used: --help answers at once.


def sentences(specs: list[str], fmt: str, text_field: str, doc_separator: str, limit: int) -> list[str]:
    """Non-empty lines of every document, up to `limit`, with a progress bar over documents."""
    from mor_pretrain.data.sources import DataError, Skips, iter_texts, open_source

    out: list[str] = []
    skips = Skips()
    with tqdm(unit=" docs", desc="reading") as bar:
        for spec in specs:
            source = open_source(spec, fmt, text_field, doc_separator)
            if source.format == "tokens":
                raise DataError(f"{spec!r} is pre-tokenized; train on text")
            docs: Iterator[str] = iter_texts(source, 0, 1, skips)
            for doc in docs:
                out.extend(line for line in doc.splitlines() if line.strip())
                bar.update(1)
                if len(out) >= limit:
                    return out[:limit]
    return out


def train(
    specs: list[str],
    output: str,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    fmt: str = "auto",
    text_field: str = "text",
    doc_separator: str = "",
    max_sentences: int = 5_000_000,
) -> Path:
    """Train and write `<output>.model`; refuses input without any text."""
    import sentencepiece as spm

    from mor_pretrain.data.sources import DataError

    lines = sentences(specs, fmt, text_field, doc_separator, max_sentences)
    if not lines:
        raise DataError(f"no text to train a tokenizer on in {specs}")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tqdm(lines, unit=" lines", desc="training")),
        model_prefix=output,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=3,
        num_threads=2,
        minloglevel=2,
    )
    return Path(output + ".model")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="files, globs or directories")
    parser.add_argument("--out", required=True, help="model prefix: writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=8000, help="pieces in the model")
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"], help="SentencePiece algorithm")
    parser.add_argument(
        "--character-coverage", type=float, default=0.9995, help="share of characters the pieces must cover"
    )
    parser.add_argument(
        "--byte-fallback",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="encode unknown characters as bytes",
    )
    parser.add_argument(
        "--format", default="auto", choices=["auto", "text", "jsonl", "parquet"], help="source format; auto = by suffix"
    )
    parser.add_argument("--text-field", default="text", help="jsonl field / parquet column")
    parser.add_argument("--doc-separator", default="", help="text files: line that separates documents")
    parser.add_argument("--max-sentences", type=int, default=5_000_000, help="lines kept for training")
    args = parser.parse_args(argv)
    from mor_pretrain.data.sources import DataError

    try:
        path = train(
            args.sources,
            args.out,
            args.vocab_size,
            args.model_type,
            args.character_coverage,
            args.byte_fallback,
            args.format,
            args.text_field,
            args.doc_separator,
            args.max_sentences,
        )
    except (DataError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
