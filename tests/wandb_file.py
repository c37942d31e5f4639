"""Read back what W&B recorded for an offline run, from its ``run-<id>.wandb`` file (a test helper).

wandb 0.31 ships no Python reader for its run files (`wandb leet` and `wandb sync` read them inside wandb-core),
so this decodes the container itself: a LevelDB-style log (a 7-byte file header ``:W&B`` + magic + version, then
32 KiB blocks of records, each with a 7-byte header: CRC32, length, type FULL / FIRST / MIDDLE / LAST) whose
payloads are wandb's own protobuf ``Record`` messages (``wandb.proto.wandb_internal_pb2``). The values are read
with wandb's protobuf classes; only the framing is done here.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path):
    """Every protobuf Record in a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, f"{path} is not a W&B run file"
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:  # block trailer: zero padding
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if length == 0 and kind == 0:  # zero fill at the end of a block or of a file being written
            pos += left_in_block
            continue
        if pos + _HEADER + length > len(data):  # a record still being written
            return
        body = data[pos + _HEADER : pos + _HEADER + length]
        assert zlib.crc32(bytes([kind]) + body) & 0xFFFFFFFF == crc, f"bad checksum at byte {pos} of {path}"
        pos += _HEADER + length
        if kind == _FULL:
            chunk = body
        elif kind == _FIRST:
            pending = body
            continue
        elif kind == _MIDDLE:
            pending += body
            continue
        else:
            assert kind == _LAST, kind
            chunk, pending = pending + body, b""
        rec = pb.Record()
        rec.ParseFromString(chunk)
        yield rec


def _put(into: dict, item) -> None:
    """Store an item's value; a nested key (["plots/rho", "format"], as media values are recorded) as nested dicts."""
    path = list(item.nested_key) or [item.key]
    for part in path[:-1]:
        into = into.setdefault(part, {})
    into[path[-1]] = json.loads(item.value_json)


def _drop(into: dict, item) -> None:
    path = list(item.nested_key) or [item.key]
    for part in path[:-1]:
        into = into.get(part, {})
    into.pop(path[-1], None)


@dataclass
class Recorded:
    """One offline run as W&B recorded it."""

    run: object = None  # the RunRecord (id, group, job_type, display_name, tags, config)
    history: list = field(default_factory=list)  # one dict per history row (each W&B step), keys as logged
    summary: dict = field(default_factory=dict)  # the final summary (updates applied in order)
    metrics: dict = field(default_factory=dict)  # define_metric: name or glob -> step metric
    artifacts: list = field(default_factory=list)  # ArtifactRecords (type, name, aliases, manifest)
    config: dict = field(default_factory=dict)  # the run config (values decoded)
    exit_code: int | None = None

    def column(self, key: str) -> list:
        """The values of ``key`` in the history rows that hold it, in order."""
        return [row[key] for row in self.history if key in row]


def read_run(run_dir: Path, wait_s: float = 30.0) -> Recorded:
    """Decode ``run_dir`` (an ``offline-run-*`` folder, or a ``.wandb`` file). wandb-core writes the file
    behind ``run.finish()``; a run read in the process that made it is waited for until its exit record is
    there (at most ``wait_s``)."""
    run_dir = Path(run_dir)
    deadline = time.monotonic() + wait_s
    while True:
        out = _read(run_dir)
        if out.exit_code is not None or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _read(run_dir: Path) -> Recorded:
    (path,) = [run_dir] if run_dir.suffix == ".wandb" else list(run_dir.glob("*.wandb"))
    out = Recorded()
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.run = rec.run
            for item in rec.run.config.update:
                _put(out.config, item)
        elif kind == "config":
            for item in rec.config.update:
                _put(out.config, item)
        elif kind == "history":
            row: dict = {}
            for item in rec.history.item:
                _put(row, item)
            out.history.append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                _put(out.summary, item)
            for item in rec.summary.remove:
                _drop(out.summary, item)
        elif kind == "metric":
            name = rec.metric.name or rec.metric.glob_name
            out.metrics[name] = rec.metric.step_metric
        elif kind == "artifact":
            out.artifacts.append(rec.artifact)
        elif kind == "exit":
            out.exit_code = rec.exit.exit_code
    return out
