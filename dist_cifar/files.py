"""The run folder's file names, and the only code that writes or reads them as files.

Every artefact is written atomically: a temporary file in the same folder, flushed and
fsynced, renamed over the target, then the folder fsynced, so a crash leaves the old file or
the new one, never half of one. JSON Lines files are read and written here too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

CONFIG = "config.json"
METRICS = "metrics.jsonl"
STEP_LOSSES = "step_losses.jsonl"
SUMMARY = "summary.json"
BEST = "best.pt"
BEST_MARKER = "best.pt.commit"
LOSS_CURVES = "loss_curves.png"
CONFUSION = "confusion_matrix.png"
WANDB_ID = "wandb_run_id.txt"
WANDB_DIR = "wandb"
TMP_PREFIX = ".tmp-"
# What a run writes besides its checkpoints; `--overwrite` removes exactly these.
ARTEFACTS = (CONFIG, METRICS, STEP_LOSSES, SUMMARY, BEST, BEST_MARKER, LOSS_CURVES, CONFUSION, WANDB_ID)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """A temporary name beside `path`, unique per process (stray ones start with TMP_PREFIX)."""
    return path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")


def publish(tmp: Path, path: Path) -> None:
    """Rename a fully written, fsynced `tmp` over `path` and make the rename durable."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    publish(tmp, path)


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, json.dumps(payload, indent=2).encode())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON Lines file ([] when it does not exist). A last line that does not
    parse is an append cut short (a kill, a full disk) and is dropped; a bad line elsewhere raises."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines) - 1:
                raise
    return records


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace the file with exactly these records, atomically."""
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with open(path, "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
