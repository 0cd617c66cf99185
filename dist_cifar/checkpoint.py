"""Checkpoints: the full training state, written atomically, found and loaded safely.

Layout in the out dir: `ckpt-e{epoch}-s{step}.pt` plus `ckpt-...pt.commit`. A save writes a
temporary file, fsyncs it, renames it into place, fsyncs the folder, and only then writes the
commit marker (holding the file's size and sha256). A checkpoint without a marker, or whose
size/hash disagree with it, does not exist as far as `find_latest` is concerned. Older
checkpoints are pruned only after the new one is committed.

Files load with `torch.load(weights_only=True)`: tensors, numbers, strings and containers
only, so a checkpoint can never run code.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

FORMAT = 1
NAME = re.compile(r"^ckpt-e(\d+)-s(\d+)\.pt$")
# Config fields that must match for a checkpoint to be resumable into this run.
MUST_MATCH = ("model", "batchnorm", "dropout", "pooling", "optimizer", "sync_bn")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming why and the fix."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_name(epoch: int, step: int) -> str:
    return f"ckpt-e{epoch:04d}-s{step:07d}.pt"


def save(out_dir: Path, state: dict[str, Any], epoch: int, step: int, keep_last: int) -> Path:
    """Write `state` as the checkpoint for (epoch, step done in it); prune to `keep_last`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / checkpoint_name(epoch, step)
    tmp = out_dir / f".tmp-{path.name}-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(out_dir)
    marker = {"file": path.name, "size": path.stat().st_size, "sha256": sha256_file(path),
              "epoch": epoch, "step": step}
    atomic_write_bytes(path.with_name(path.name + ".commit"), json.dumps(marker).encode())
    prune(out_dir, keep_last)
    return path


def committed(out_dir: Path) -> list[Path]:
    """Committed checkpoints, oldest first."""
    found = []
    for p in Path(out_dir).glob("ckpt-e*-s*.pt"):
        m = NAME.match(p.name)
        if m and p.with_name(p.name + ".commit").exists():
            found.append((int(m.group(1)), int(m.group(2)), p))
    return [p for _, _, p in sorted(found)]


def verify(path: Path) -> bool:
    try:
        marker = json.loads(path.with_name(path.name + ".commit").read_text())
        return marker["size"] == path.stat().st_size and marker["sha256"] == sha256_file(path)
    except (OSError, ValueError, KeyError):
        return False


def find_latest(out_dir: Path) -> Optional[Path]:
    """Newest checkpoint whose commit marker matches its bytes."""
    for path in reversed(committed(out_dir)):
        if verify(path):
            return path
        print(f"[dist_cifar] ignoring checkpoint {path.name}: it does not match its commit marker")
    return None


def prune(out_dir: Path, keep_last: int) -> None:
    for old in committed(out_dir)[:-keep_last]:
        old.with_name(old.name + ".commit").unlink(missing_ok=True)  # uncommit first
        old.unlink(missing_ok=True)
    for stray in Path(out_dir).glob(".tmp-ckpt-*"):
        stray.unlink(missing_ok=True)  # a save killed midway (only rank 0 ever writes here)


def load(path: Path) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about legacy pickles before refusing them
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"refusing checkpoint {path}: it does not load as plain tensors and "
                              f"data (weights_only): {first}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dist_cifar checkpoint (format {FORMAT}); "
                              f"pass --resume none to start fresh")
    return state


def check_compatible(state: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    saved = state.get("config", {})
    for key in MUST_MATCH:
        if saved.get(key) != config.get(key):
            raise CheckpointError(f"checkpoint {path.name} was written with {key}={saved.get(key)!r} but "
                                  f"this run has {key}={config.get(key)!r}: use a new --out-dir or "
                                  f"--resume none")


# ---------------------------------------------------------------------------- RNG state


def capture_rng() -> dict[str, Any]:
    """This process's RNG states, as tensors and ints (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]),
                   "gauss": py_state[2] if py_state[2] is None else float(py_state[2])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
