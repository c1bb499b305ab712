"""Read back what an offline W&B run wrote, from its ``run-<id>.wandb`` log (wandb ships no public reader).

Format: a 7-byte header (``:W&B``, 0xBEE1, version), then 32 KiB blocks of records; each record has a 7-byte header
(crc32, length, type: 1 whole, 2/3/4 first/middle/last fragment) and a block tail under 7 bytes is padding. A payload
is a protobuf ``Record``; ``history``/``summary``/``config`` records hold items with ``key`` or ``nested_key`` and
``value_json``. The CRC of every record is checked, so a misread fails loudly.

``wandb.finish()`` of an offline run can return before wandb-core has flushed the log to disk (seen under load: a
log that held only its header when read). A whole log ends with the run's ``exit`` record, so ``read_run`` waits for
that record, and reads a half-written last record as "not yet", never as data.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")
RECORD = struct.Struct("<IHB")


@dataclass
class WandbRun:
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)  # define_metric calls: glob_name, step_metric, ...
    files: list[Path] = field(default_factory=list)

    def series(self, key: str) -> list[tuple[int, Any]]:
        """(trainer/global_step, value) of every history row that has ``key``."""
        return [(row.get("trainer/global_step"), row[key]) for row in self.history if key in row]


def find_run_dir(wandb_dir: Path) -> Path:
    (run_dir,) = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    return run_dir


def read_run(run_dir: Path, timeout_s: float = 60.0) -> WandbRun:
    """The finished run in ``run_dir``, once its log is whole (ends in the ``exit`` record)."""
    from wandb.proto import wandb_internal_pb2

    (log_file,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while True:
        records = []
        for payload in _payloads(log_file.read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            break
        assert time.monotonic() < deadline, f"{log_file.name}: no exit record after {timeout_s:g} s (run not over)"
        time.sleep(0.1)
    run = WandbRun(files=sorted(p for p in (run_dir / "files").rglob("*") if p.is_file()))
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "metric":
            from google.protobuf.json_format import MessageToDict

            run.metrics.append(MessageToDict(record.metric, preserving_proto_field_name=True))
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
    return run


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _payloads(data: bytes) -> list[bytes]:
    """Every whole record's payload; a record still being written at the end of ``data`` is left out."""
    if len(data) < HEADER.size:
        return []
    magic, _, _ = HEADER.unpack_from(data, 0)
    assert magic == b":W&B", f"not a W&B log (starts with {data[:4]!r})"
    offset, pending, payloads = HEADER.size, b"", []
    while offset + RECORD.size <= len(data):
        room = BLOCK - offset % BLOCK
        if room < RECORD.size:  # block tail padding
            offset += room
            continue
        crc, length, kind = RECORD.unpack_from(data, offset)
        body = data[offset + RECORD.size : offset + RECORD.size + length]
        if length == 0 and kind == 0:  # zero padding to the end of the block
            offset += room
            continue
        if len(body) < length:  # the writer is mid-record
            break
        expected = zlib.crc32(body, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF
        assert crc == expected, f"CRC mismatch at byte {offset}"
        offset += RECORD.size + length
        if kind == 1:
            payloads.append(body)
        elif kind == 2:
            pending = body
        elif kind == 3:
            pending += body
        elif kind == 4:
            payloads.append(pending + body)
            pending = b""
    return payloads
