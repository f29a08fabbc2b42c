"""Reads the records of a wandb run file (``run-<id>.wandb``) as the real wandb package wrote
them: a 7-byte header (``:W&B``, magic 0xBEE1, version 0) and then LevelDB-log framing (32 KiB
blocks; each chunk has a CRC-32C, a 2-byte little-endian length and a type: full, first, middle,
last) around ``wandb_internal_pb2.Record`` protobuf messages. Used by tests to check what a run
logged without a wandb server."""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise ValueError(f"{path} is not a wandb run file")
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # the rest of a block too small for a chunk header is padding
            pos += room
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, FIRST):
            pending = chunk
        elif kind in (MIDDLE, LAST):
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history_rows(path: Path) -> list[dict]:
    """Every ``wandb.log`` row of the (finished) run file, as ``{key: value}``."""
    rows = []
    for record in finished_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def run_id(path: Path) -> str:
    for record in finished_records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run.run_id
    raise ValueError(f"{path} holds no run record")


def finished_records(path: Path, timeout_s: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """The records once the run file ends with the ``exit`` record that ``finish()`` writes:
    wandb's writer (a separate process) may still be flushing when ``finish()`` returns."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = read_records(path)
        except (ValueError, struct.error, DecodeError):  # not even the header, or a record half written
            records = []
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no exit record after {timeout_s:.0f} s (the run did not finish)")
        time.sleep(0.2)
