"""Read a W&B offline `run-<id>.wandb` file back, without wandb's (absent) reader: which epochs a
run's offline folders already hold (and up to which step), so that a resume replays exactly the missing ones (the
service can die with the job's signal before it saved the last rows), and for the tests.

Layout: a 7-byte W&B header, then LevelDB log framing in 32 KiB blocks: each chunk has a 7-byte
header (crc32, little-endian uint16 length, uint8 type FULL=1/FIRST=2/MIDDLE=3/LAST=4); a block
tail shorter than a chunk header is zero padding. Each reassembled payload is a
`wandb_internal_pb2.Record`."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER, FILE_HEADER = 32 * 1024, 7, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def payloads(path: Path) -> list[bytes]:
    """Every complete record; a file cut short by a killed writer ends at its last whole one."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    out, pending, pos = [], b"", FILE_HEADER
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        if len(chunk) < length:
            break  # the writer was killed mid-record
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue  # zero padding at the end of a block
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            out.append(pending + chunk)
            pending = b""
    return out


def records(path: Path):
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2
    for blob in payloads(path):
        rec = wandb_internal_pb2.Record()
        try:
            rec.ParseFromString(blob)
        except DecodeError:
            continue
        yield rec


def key_of(item) -> str:
    return item.key or "/".join(item.nested_key)


def history(path: Path) -> list[dict]:
    """One dict per logged history row: {'_step': n, key: value, ...}."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            row = {"_step": rec.history.step.num}
            row.update({key_of(i): json.loads(i.value_json) for i in rec.history.item})
            rows.append(row)
    return rows


def config(path: Path) -> dict:
    """The run config: the run record's initial config plus any later config updates."""
    cfg = {}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        items = rec.run.config.update if kind == "run" else rec.config.update if kind == "config" else []
        for item in items:
            cfg[key_of(item)] = json.loads(item.value_json)
    return cfg


def run_id(path: Path) -> str:
    for rec in records(path):
        if rec.WhichOneof("record_type") == "run":
            return rec.run.run_id
    return ""


def run_files(out_dir: Path, run_id: str) -> list[Path]:
    """The offline files of one run in an out dir, one per start of the job, oldest first."""
    return sorted(Path(out_dir).glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))


def logged(out_dir: Path, run_id: str, *, skip: tuple[Path, ...] = ()) -> tuple[set[int], int]:
    """(the epochs whose records the run's offline files in `out_dir` hold, the last global step
    of their step rows, -1 if none); unreadable files count as empty (their epochs are logged
    again)."""
    epochs, last_step = set(), -1
    for path in run_files(out_dir, run_id):
        if any(path.parent == s for s in skip):
            continue
        try:
            rows = history(path)
        except (OSError, ValueError):
            continue
        epochs.update(int(row["epoch"]) for row in epoch_rows(rows))
        last_step = max([last_step, *(int(row["global_step"]) for row in rows if "global_step" in row)])
    return epochs, last_step


def epoch_rows(rows: list[dict]) -> list[dict]:
    """The per-epoch records among a run's history rows (the others are per-step figures)."""
    return [row for row in rows if "train_loss" in row]


def step_rows(rows: list[dict]) -> list[dict]:
    return [row for row in rows if "global_step" in row]
