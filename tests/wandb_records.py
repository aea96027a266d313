"""Read W&B's offline run files back (tests only: wandb has no public reader for them).

A run file (<run>/wandb/offline-run-*/run-<id>.wandb) is a 7-byte header (":W&B", magic, version) and then a
leveldb log: 32 KiB blocks of chunks, each a 7-byte header (CRC-32 of the type byte and the data, little-endian
length, type: 1 full, 2 first, 3 middle, 4 last) and its data; a record is one full chunk or first, middles and
last, and holds a serialized wandb_internal_pb2.Record. The rest of a block too short for a chunk header is
padding. wandb writes whole blocks, and the last, partial one when the run finishes: a file cut by a crash
ends at a block boundary, or in a torn write, where reading stops.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7


def read_wandb_records(path: Path) -> list:
    """The records of one offline W&B run file, up to its end or its first damaged chunk."""
    from wandb.proto import wandb_internal_pb2

    data, records, pos, part = path.read_bytes(), [], HEADER, b""
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    while pos + HEADER <= len(data):
        if pos % BLOCK + HEADER > BLOCK:  # the rest of a block is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc = int.from_bytes(data[pos : pos + 4], "little")
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + HEADER : pos + HEADER + length]
        if kind == 0 or len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != crc:
            break  # zero padding at the end, or a torn write
        part += chunk
        pos += HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def history_rows(files: list[Path]) -> list[dict[str, Any]]:
    """Every history row ("_step" and the logged keys) of the given run files, in file order."""
    rows = []
    for f in files:
        for record in read_wandb_records(f):
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows
