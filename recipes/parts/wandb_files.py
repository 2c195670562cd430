"""Read what a W&B offline run wrote (``<run dir>/wandb/offline-run-*/run-*.wandb``), without the W&B service.

The file is W&B's record log: a 7-byte header (``:W&B``, key, version), then LevelDB-log blocks of 32 KiB holding
protobuf ``Record`` messages, split into chunks (full / first / middle / last) with a 7-byte header each (CRC,
length, type). A resumed run reads the last history step of the files before it (:func:`last_step`), so its own
steps continue the axis; the tests read the history keys and config a run sent (:func:`history_rows`,
:func:`run_config`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32768
FILE_HEADER = 7
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> Iterator[object]:
    """Every protobuf ``Record`` in the ``.wandb`` file ``path``, in order; a truncated tail (a killed run) ends
    the iteration."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (no ':W&B' header)")
    pos, pending = FILE_HEADER, b""
    while pos + CHUNK_HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK_HEADER:  # block trailer: zero padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        chunk = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        if kind == 0 or len(chunk) < length:  # zero fill or a cut-off chunk
            return
        pos += CHUNK_HEADER + length
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def run_files(run_dir: str | Path) -> list[Path]:
    """The ``.wandb`` files of the W&B offline runs under ``run_dir`` (``<run dir>/wandb/offline-run-*``), oldest
    first."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)


def history_rows(path: str | Path) -> list[dict]:
    """The history rows of one run file: ``{key: value}`` with ``_step``; values JSON-decoded."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def run_config(path: str | Path) -> dict:
    """The config keys a run file holds (the last value of each), JSON-decoded."""
    config = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return config


def last_step(run_dir: str | Path) -> int | None:
    """The highest history ``_step`` the offline runs under ``run_dir`` wrote, or ``None`` when they wrote none."""
    steps = [row["_step"] for path in run_files(run_dir) for row in history_rows(path) if "_step" in row]
    return max(steps, default=None)
