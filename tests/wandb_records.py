"""Read back what an offline W&B run wrote, for tests.

wandb 0.31 ships no Python reader of its record log (the old ``wandb.sdk.internal.datastore`` is
gone), so this is a small one. An offline run directory ``<dir>/wandb/offline-run-<ts>-<id>/``
holds ``run-<id>.wandb``, a LevelDB-style log:

- a 7-byte file header: ``b":W&B"``, magic ``0xBEE1`` (uint16 LE), version ``0`` (uint8);
- then 32 KiB blocks (the first one counts the file header) of chunks, each with a 7-byte header
  ``crc32 (uint32 LE), length (uint16 LE), type (uint8)`` followed by ``length`` bytes of data;
  type 1 = FULL record, 2 = FIRST, 3 = MIDDLE, 4 = LAST piece of a record split across blocks;
  a block tail shorter than a chunk header is zero padding;
- the crc is IEEE CRC-32 of the type byte followed by the data (checked here: it is cheap);
- each reassembled record is a ``wandb.proto.wandb_internal_pb2.Record``.

History, summary and config values are JSON strings (``value_json``) under a key or a nested
key path (``nested_key``).
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2

BLOCK_LEN = 32 * 1024
HEADER_LEN = 7  # both the file header and each chunk header
FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
IDENT, MAGIC, VERSION = b":W&B", 0xBEE1, 0
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def find_offline_run(directory: str | Path, wait_s: float = 30.0) -> Path:
    """The single ``run-<id>.wandb`` file under ``directory`` (searched recursively), once it is
    complete: ``run.finish()`` can return before wandb's service process has written the last
    records, so this waits (up to ``wait_s``) for the closing exit record."""
    found = sorted(Path(directory).rglob("run-*.wandb"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb under {directory}, found {found}")
    deadline = time.monotonic() + wait_s
    while not _ends_with_exit(found[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found[0]


def _ends_with_exit(run_file: Path) -> bool:
    last = None
    for last in iter_records(run_file):
        pass
    return last is not None and last.WhichOneof("record_type") == "exit"


def iter_records(run_file: str | Path) -> Iterator[wandb_internal_pb2.Record]:
    """Every record of the log, in write order."""
    data = Path(run_file).read_bytes()
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if (ident, magic, version) != (IDENT, MAGIC, VERSION):
        raise ValueError(f"{run_file}: not a W&B record log (header {ident!r}, {magic:#x}, {version})")
    pos, pieces = HEADER_LEN, []
    while pos + HEADER_LEN <= len(data):
        block_left = BLOCK_LEN - pos % BLOCK_LEN
        if block_left < HEADER_LEN:  # zero padding at the end of a block
            pos += block_left
            continue
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        if length == 0 and kind == 0:  # pre-allocated / unwritten tail
            break
        chunk = data[pos + HEADER_LEN : pos + HEADER_LEN + length]
        if len(chunk) < length:
            break  # a torn final write: stop at the last complete record
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{run_file}: crc mismatch in the chunk at byte {pos}")
        pos += HEADER_LEN + length
        if kind == FULL:
            pieces = [chunk]
        elif kind == FIRST:
            pieces = [chunk]
            continue
        elif kind == MIDDLE:
            pieces.append(chunk)
            continue
        elif kind == LAST:
            pieces.append(chunk)
        else:
            raise ValueError(f"{run_file}: unknown chunk type {kind} at byte {pos}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(b"".join(pieces))
        pieces = []
        yield record


def _set_item(out: dict, item: Any) -> None:
    """Store one ``key``/``nested_key`` + ``value_json`` item into ``out``."""
    path = list(item.nested_key) or [item.key]
    target = out
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = json.loads(item.value_json)


def read_history(run_file: str | Path) -> list[dict]:
    """One dict per logged history row (``_step``, ``_timestamp``, ... included)."""
    rows = []
    for record in iter_records(run_file):
        if record.WhichOneof("record_type") == "history":
            row: dict = {}
            for item in record.history.item:
                _set_item(row, item)
            rows.append(row)
    return rows


def read_config(run_file: str | Path) -> dict:
    """The run config (wandb's own ``_wandb`` entry included), updates applied in order."""
    config: dict = {}
    for record in iter_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            items, removed = record.run.config.update, record.run.config.remove
        elif kind == "config":
            items, removed = record.config.update, record.config.remove
        else:
            continue
        for item in items:
            _set_item(config, item)
        for item in removed:
            config.pop(item.key, None)
    return config


def read_summary(run_file: str | Path) -> dict:
    """The final run summary (explicit ``run.summary`` updates and the last logged values)."""
    summary: dict = {}
    for record in iter_records(run_file):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                _set_item(summary, item)
            for item in record.summary.remove:
                summary.pop(item.key, None)
    return summary


def read_run_info(run_file: str | Path) -> dict:
    """The run's identity as the W&B UI shows it: project, group, display name and tags."""
    for record in iter_records(run_file):
        if record.WhichOneof("record_type") == "run":
            run = record.run
            return {"project": run.project, "group": run.run_group, "name": run.display_name, "tags": list(run.tags)}
    raise ValueError(f"{run_file}: no run record")


def find_offline_runs(directory: str | Path, wait_s: float = 30.0) -> list[Path]:
    """Every ``run-<id>.wandb`` file under ``directory``: those moved into ``replaced/`` by a resume
    first, then the current one(s), in the order they were started. The last one is awaited as in
    ``find_offline_run``; earlier ones may lack the exit record (a killed attempt)."""
    found = sorted(Path(directory).rglob("run-*.wandb"), key=lambda p: (p.parent.parent.name != "replaced", p.parent.name))
    if not found:
        raise FileNotFoundError(f"no run-*.wandb under {directory}")
    deadline = time.monotonic() + wait_s
    while not _ends_with_exit(found[-1]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found
