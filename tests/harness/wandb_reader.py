"""Read back what an offline W&B run wrote, from its ``run-<id>.wandb`` log (wandb ships no public reader).

Format: a 7-byte header (``:W&B``, 0xBEE1, version), then 32 KiB blocks of records; each record has a 7-byte header
(crc32, length, type: 1 whole, 2/3/4 first/middle/last fragment) and a block tail under 7 bytes is padding. A payload
is a protobuf ``Record``; ``history``/``summary``/``config`` records hold items with ``key`` or ``nested_key`` and
``value_json``. The CRC of every record is checked, so a misread fails loudly.
"""

from __future__ import annotations

import json
import struct
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


def read_run(run_dir: Path) -> WandbRun:
    from wandb.proto import wandb_internal_pb2

    (log_file,) = run_dir.glob("run-*.wandb")
    run = WandbRun(files=sorted(p for p in (run_dir / "files").rglob("*") if p.is_file()))
    for payload in _payloads(log_file.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
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
