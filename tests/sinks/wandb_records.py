"""Read the records of an offline W&B run file (``run-<id>.wandb``) without a server.

The file is a LevelDB-style log (a 7-byte W&B header, then 32 KiB blocks of chunks with a
7-byte header: checksum, length, type) whose records are ``wandb_internal_pb2.Record``
protobufs; the Python reader for it left the wandb package, so the tests carry this one.
"""

from __future__ import annotations

import json
from pathlib import Path

from wandb.proto.wandb_internal_pb2 import Record

_BLOCK = 32768
_FULL, _FIRST, _LAST = 1, 2, 4


def records(path: Path) -> list[Record]:
    """Every record in the file, in order."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (_FULL, _FIRST) else buf + chunk
        if kind in (_FULL, _LAST):
            rec = Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def history(path: Path) -> list[dict[str, object]]:
    """The run's history rows as dicts of key -> decoded JSON value."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({
                (item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in rec.history.item
            })
    return rows


def metric_definitions(path: Path) -> dict[str, str]:
    """``define_metric`` records: metric name (or glob) -> its step metric."""
    out = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") == "metric":
            out[rec.metric.name or rec.metric.glob_name] = rec.metric.step_metric
    return out
