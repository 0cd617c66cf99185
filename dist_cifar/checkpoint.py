"""Checkpoints: what goes into one, written atomically in the background, found and loaded safely.

`CheckpointManager` owns a checkpoint's content: it asks each registered part (model,
optimizer, schedule, GradScaler) for its `state_dict`, adds every rank's RNG state and the
`RunState`, and restores them in reverse. It also writes `best.pt` (weights only) through the
same atomic path.

Saving does not stall training: the step loop waits only while the state is copied off the
training device into host buffers (reused, pinned buffers on CUDA; a copy on CPU, since training
goes on mutating the parameters in place). A background thread then serialises, writes, fsyncs,
renames and commits. At most one checkpoint write is in flight: a periodic save that finds one
still running is skipped (and said), the run's last save and a preemption save wait for it.
`close()` waits for every write on every exit path. The commit marker's sha256 is computed from
the bytes as they are written, so nothing is read back; loading still verifies it. A snapshot
whose weights are not all finite is never committed.

Layout in the out dir: `ckpt-e{epoch}-s{step}.pt` plus `ckpt-...pt.commit`. A write goes to a
temporary file, is fsynced, renamed into place, the folder fsynced, and only then is the commit
marker (size and sha256) written. A checkpoint without a marker, or whose size/hash disagree
with it, does not exist as far as `find_latest` is concerned. Older checkpoints are pruned only
after the new one is committed.

Sharded layouts (hybrid, fsdp at several ranks) write `ckpt-e{epoch}-s{step}.dcp/` instead, a
folder in which every rank writes its own shard (`shards.py`, torch.distributed.checkpoint): no
rank gathers the state, and every rank copies only its own share off the device. The folder is
committed the same way: written under a temporary name, fsynced, renamed, then its marker lists
every file with its size and sha256 (each rank hashes its own files, rank 0 gathers the hashes).
Either kind resumes under any design and world size; best.pt is always one consolidated file.

Files load with `torch.load(weights_only=True)`: tensors, numbers, strings and containers
only, so a checkpoint can never run code.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import random
import re
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import distributed as D
from . import files
from . import shards
from .engine import EpochSums, EpochStart

FORMAT = 2  # 2: RunState.sums replaced the anonymous carry tuple
NAME = re.compile(r"^ckpt-e(\d+)-s(\d+)\.(pt|dcp)$")
# What makes a run "the same run" for --resume: the model, the data and its split, the recipe and
# the seed. Speed and logging flags, the world size and a larger --epochs (with a constant
# schedule) may change; anything else is another run and is refused.
RUN_IDENTITY = ("model", "batchnorm", "dropout", "pooling", "sync_bn", "dataset", "data_dir", "split", "val_size",
                "max_train", "synthetic_size", "normalize", "augment", "optimizer", "lr", "weight_decay", "momentum",
                "schedule", "label_smoothing", "seed", "warmup_epochs", "warmup_lr",
                "clip_grad_norm", "ema")
SCHEDULED = ("onecycle", "cosine")  # schedules whose shape depends on --epochs


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming why and the fix."""


@dataclass
class RunState:
    """Progress that a checkpoint must carry besides weights and optimizer."""

    epoch: int = 0                    # epoch in progress (== epochs when finished)
    step: int = 0                     # steps done within `epoch`
    global_step: int = 0
    sums: EpochSums = field(default_factory=EpochSums)  # every rank's, of the steps done in `epoch`
    partial: bool = False             # the epoch's record cannot count each sample once (re-sharded mid-epoch)
    best_val_loss: float = math.inf
    best_epoch: int = -1
    time_to_best_s: float = 0.0
    train_time_s: float = 0.0         # summed over restarts
    wandb_id: str = ""
    target: dict = field(default_factory=dict)  # --target-accuracy: {"time_s", "epoch", "step"} once reached
    history: list = field(default_factory=list)  # per-epoch records, for metrics.jsonl and W&B

    def epoch_start(self) -> EpochStart:
        return EpochStart(self.epoch, self.step, self.global_step, EpochSums(**asdict(self.sums)))

    def to_state(self) -> dict[str, Any]:
        return asdict(self)

    def load_state(self, saved: dict[str, Any]) -> None:
        for key, value in saved.items():
            setattr(self, key, EpochSums(**value) if key == "sums" else value)


class HashingWriter:
    """A binary file that hashes what passes through it (torch.save writes sequentially)."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def write_torch(path: Path, blob: dict[str, Any], *, before_publish=None) -> tuple[int, str]:
    """torch.save into a temporary file, fsync, rename into place, fsync the folder; returns the
    (size, sha256) of the bytes written. `before_publish` runs after the fsync (fault injection)."""
    fd, tmp = files.create_temp(path)  # an unpredictable name: never a planted link
    try:
        with os.fdopen(fd, "wb") as f:
            writer = HashingWriter(f)
            torch.save(blob, writer)
            f.flush()
            os.fsync(f.fileno())
    except OSError:  # a full disk: the partial file would keep it full (a kill leaves it: pruned later)
        tmp.unlink(missing_ok=True)
        raise
    if before_publish is not None:
        before_publish()
    files.publish(tmp, path)
    return writer.size, writer.sha256.hexdigest()


def sha256_file(path: Path) -> str:
    return files.sha256_file(path)[1]


def checkpoint_name(epoch: int, step: int, suffix: str = ".pt") -> str:
    return f"ckpt-e{epoch:04d}-s{step:07d}{suffix}"


def marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".commit")


def save(out_dir: Path, state: dict[str, Any], epoch: int, step: int, keep_last: int, *,
         before_publish=None) -> Path:
    """Write `state` as the checkpoint for (epoch, step done in it), commit it, prune to `keep_last`.
    The marker also carries the run's identity, so a rerun can be checked without loading 4 GB."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / checkpoint_name(epoch, step)
    size, sha256 = write_torch(path, state, before_publish=before_publish)
    marker = {"file": path.name, "size": size, "sha256": sha256, "epoch": epoch, "step": step,
              "identity": identity(state.get("config", {}))}
    files.atomic_write_bytes(marker_path(path), json.dumps(marker).encode())
    remember_verified(path)
    prune(out_dir, keep_last, just_written=path)
    return path


def commit_folder(out_dir: Path, tmp: Path, hashes: dict[str, tuple[int, str]], *, epoch: int, step: int,
                  config: dict[str, Any], keep_last: int, before_publish=None) -> Path:
    """Publish the fully written folder `tmp` as the sharded checkpoint of (epoch, step): every file
    in it must be accounted for in `hashes` (name -> (size, sha256), from the ranks that wrote
    them; a file nobody accounted for is hashed here). fsync, rename into place, marker, prune."""
    path = out_dir / checkpoint_name(epoch, step, shards.SUFFIX)
    listed = {p.name: p for p in tmp.iterdir()}
    unknown = set(hashes) - set(listed)
    if unknown or any(not p.is_file() or p.is_symlink() for p in listed.values()):
        raise OSError(f"the sharded checkpoint {tmp.name} does not hold the files its writers reported "
                      f"({', '.join(sorted(unknown)) or 'a folder or link among them'})")
    hashes = {**shards.file_hashes([p for name, p in listed.items() if name not in hashes]), **hashes}
    files.fsync_dir(tmp)
    if before_publish is not None:
        before_publish()
    if path.exists():  # the same position saved again (a preemption right after a periodic save)
        marker_path(path).unlink(missing_ok=True)
        files.remove(path)
    files.publish(tmp, path)
    marker = {"file": path.name, "files": {name: list(v) for name, v in sorted(hashes.items())},
              "size": sum(size for size, _ in hashes.values()), "epoch": epoch, "step": step,
              "identity": identity(config)}
    files.atomic_write_bytes(marker_path(path), json.dumps(marker).encode())
    remember_verified(path)
    prune(out_dir, keep_last, just_written=path)
    return path


def by_position(out_dir: Path) -> list[tuple[tuple[int, int], Path]]:
    """Every checkpoint file, committed or not, as ((epoch, step), path), oldest first."""
    found = []
    for p in Path(out_dir).glob("ckpt-e*-s*"):
        m = NAME.match(p.name)
        if m:
            found.append(((int(m.group(1)), int(m.group(2))), p))
    return sorted(found)


def committed(out_dir: Path) -> list[Path]:
    """Committed checkpoints, oldest first."""
    return [p for _, p in by_position(out_dir) if marker_path(p).exists()]


_VERIFIED: dict[str, tuple] = {}  # path -> (size, mtime_ns, inode) of files whose bytes matched their marker


def _stamp(path: Path) -> tuple:
    if path.is_dir():
        return tuple(sorted((p.name, *_stamp(p)) for p in path.iterdir()))
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def remember_verified(path: Path) -> None:
    _VERIFIED[str(path)] = _stamp(path)


def read_marker(path: Path) -> Optional[dict[str, Any]]:
    """The commit marker as a dict; None when it is missing, unreadable or not an object."""
    try:
        marker = json.loads(marker_path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def verify(path: Path) -> bool:
    """The file's bytes match its commit marker (hashed once per process while unchanged)."""
    try:
        if _VERIFIED.get(str(path)) == _stamp(path):
            return True
        marker = read_marker(path)
        # the marker names the file and (for checkpoints) its position: a renamed file, one whose name
        # claims a later epoch than it holds, would otherwise stay "newest" for ever
        m = NAME.match(path.name)
        ok = (bool(marker) and marker.get("file", path.name) == path.name
              and (m is None or (marker.get("epoch", int(m.group(1))), marker.get("step", int(m.group(2))))
                   == (int(m.group(1)), int(m.group(2))))
              and (folder_matches(path, marker["files"]) if path.is_dir() and not path.is_symlink()
                   else marker["size"] == path.stat().st_size and marker["sha256"] == sha256_file(path)))
    except (OSError, KeyError, TypeError, ValueError):  # a hostile marker: wrong types, not an object
        return False
    if ok:
        remember_verified(path)
    return ok


def folder_matches(folder: Path, listed: dict[str, Any]) -> bool:
    """The folder holds exactly the marker's files, each with its size and sha256."""
    present = {p.name: p for p in folder.iterdir()}
    if set(present) != set(listed) or any(p.is_symlink() or not p.is_file() for p in present.values()):
        return False
    return shards.file_hashes(list(present.values())) == {name: tuple(v) for name, v in listed.items()}


def find_latest(out_dir: Path) -> Optional[Path]:
    """Newest checkpoint whose commit marker matches its bytes."""
    found = None
    for path in reversed(committed(out_dir)):
        if verify(path):
            found = path
            break
        print(f"[dist_cifar] ignoring checkpoint {path.name}: it does not match its commit marker")
    positions = by_position(out_dir)
    newest = next((at for at, p in positions if p == found), None)
    for at, path in positions:
        if not marker_path(path).exists() and (newest is None or at > newest):
            print(f"[dist_cifar] ignoring checkpoint {path.name}: it has no commit marker (its write was cut short)")
    return found


def prune(out_dir: Path, keep_last: int, *, just_written: Optional[Path] = None) -> None:
    """Keep the newest `keep_last` checkpoints that verify against their markers (the one just
    written counts as verified: it was hashed as it was written); delete the older ones. A
    corrupt newer file is neither counted nor deleted, so a good checkpoint is never pruned in
    its favour and the folder never loses its last verified checkpoint."""
    kept = 0
    for path in reversed(committed(out_dir)):
        if kept >= keep_last and path != just_written:
            marker_path(path).unlink(missing_ok=True)  # uncommit first
            files.remove(path)
        elif path == just_written or verify(path):
            kept += 1
    for stray in Path(out_dir).glob(files.TMP_PREFIX + "ckpt-*"):
        files.remove(stray)  # a save killed midway (no other save is in flight while this one commits)
    for stray in Path(out_dir).glob(f"{files.TMP_PREFIX}{files.BEST}-*"):
        if not stray.name.startswith(f"{files.TMP_PREFIX}{files.BEST}-{os.getpid()}-"):  # a dead process's write
            stray.unlink(missing_ok=True)
    if just_written is not None:
        positions = by_position(out_dir)
        newest = next(at for at, p in positions if p == just_written)
        for at, path in positions:  # renamed, never committed, and now superseded
            if at < newest and not marker_path(path).exists():
                files.remove(path)


def best_problem(best: Path, epoch: int) -> str:
    """Why best.pt cannot be the weights of `epoch` ('' when it can)."""
    if not best.exists():
        return f"is missing (the best weights were from epoch {epoch})"
    if not verify(best):
        return "does not match its commit marker (corrupt, torn, or written before markers existed)"
    marked = (read_marker(best) or {}).get("epoch")
    if marked != epoch:
        return f"holds epoch {marked}'s weights but the best validation loss was at epoch {epoch}"
    return ""


def load(path: Path) -> dict[str, Any]:
    """A single-file checkpoint's state, or a sharded one's state.pt (everything but its tensors)."""
    if path.is_dir():
        path = path / shards.STATE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about legacy pickles before refusing them
            # mmap: every rank of a node reads the same file through the page cache, shared, instead
            # of each holding a private copy of the whole state (8 ranks x 4 GB for vgg16_cifar)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"refusing checkpoint {path}: it does not load as plain tensors and "
                              f"data (weights_only): {first}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        what = f"written by another dist_cifar version (format {found}; this one reads {FORMAT})" \
            if found is not None else f"not a dist_cifar checkpoint (format {FORMAT})"
        raise CheckpointError(f"{path} is {what}: choose a new --out-dir, or pass --overwrite to replace that run")
    return state


def plain_model_state(path: Path) -> dict[str, Any]:
    """The plain model state_dict of either kind of checkpoint (a sharded one read whole)."""
    return shards.read_plain(path) if path.is_dir() else load(path)["model"]


def identity(config: dict[str, Any]) -> dict[str, Any]:
    return {key: config.get(key) for key in RUN_IDENTITY + ("epochs",)}


def identity_problem(saved: dict[str, Any], config: dict[str, Any]) -> Optional[str]:
    """Why a run with `config` is not the run that wrote a checkpoint with `saved` (None: it is)."""
    for key in RUN_IDENTITY:
        if key in saved and saved.get(key) != config.get(key):
            return f"was written with {key}={saved.get(key)!r} but this command has {key}={config.get(key)!r}"
    old, new = saved.get("epochs"), config.get("epochs")
    if old is not None and new != old and config.get("schedule") in SCHEDULED:
        return (f"ran a {config.get('schedule')} schedule over --epochs {old}; --epochs {new} would change the "
                f"schedule it already followed")
    return None


def check_compatible(state: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    if "state_dict" in state and "run" not in state:
        raise CheckpointError(f"{path.name} holds weights only (for evaluation or fine-tuning), not a training "
                              f"state: resume from a ckpt-*.pt file, or --resume auto")
    problem = identity_problem(state.get("config", {}), config)
    if problem:
        raise CheckpointError(f"checkpoint {path.name} {problem}: resume with the same settings, choose a new "
                              f"--out-dir, or pass --overwrite to replace that run")


def check_progress(blob: dict[str, Any], config: dict[str, Any], path: Path, *, world_size: int,
                   global_batch_size: int, steps_per_epoch: int) -> None:
    """What the identity cannot say alone: at the same world size the batch must not change (the
    run would silently continue another recipe), and the run must not already be past the
    command's --epochs or, mid-epoch, past its --steps-per-epoch."""
    run = blob.get("run", {})
    fix = "resume with the run's own settings, choose a new --out-dir, or pass --overwrite"
    if blob.get("world_size") == world_size and blob.get("global_batch_size") != global_batch_size:
        raise CheckpointError(f"checkpoint {path.name} trained a global batch of {blob.get('global_batch_size')} "
                              f"on {world_size} processes; this command gives {global_batch_size} (--batch-size / "
                              f"--global-batch-size): {fix}")
    if run.get("epoch", 0) > config.get("epochs", 0):
        raise CheckpointError(f"checkpoint {path.name} has finished {run['epoch']} epochs, more than --epochs "
                              f"{config.get('epochs')}: {fix}")
    same = blob.get("world_size") == world_size and blob.get("global_batch_size") == global_batch_size
    if same and run.get("step", 0) > steps_per_epoch:
        raise CheckpointError(f"checkpoint {path.name} stopped at step {run['step']} of epoch {run.get('epoch')}, past "
                              f"this command's {steps_per_epoch} steps per epoch (--steps-per-epoch): {fix}")


class HostSnapshot:
    """Copies a nested state (dicts, lists, tensors) off the training device, reusing its host
    buffers from one save to the next (pinned on CUDA, so the copy runs at full bandwidth)."""

    def __init__(self):
        self.buffers: list[torch.Tensor] = []

    def take(self, state: Any) -> Any:
        index = [0]
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        out = self._copy(state, index, copies)
        if any(src.is_cuda for src, _ in copies):
            torch.cuda.synchronize()  # the non_blocking copies have landed
        return out

    def _copy(self, obj: Any, index: list, copies: list) -> Any:
        if isinstance(obj, torch.Tensor):
            i = index[0]
            index[0] += 1
            src = obj.detach()
            if i >= len(self.buffers):
                self.buffers.append(torch.empty(0))
            buf = self.buffers[i]
            if buf.shape != src.shape or buf.dtype != src.dtype:
                buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)
                self.buffers[i] = buf
            buf.copy_(src, non_blocking=src.is_cuda)
            copies.append((src, buf))
            return buf
        if isinstance(obj, dict):
            return {k: self._copy(v, index, copies) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._copy(v, index, copies) for v in obj)
        return obj


def all_finite(state_dict: dict[str, Any]) -> bool:
    return all(torch.isfinite(t).all() for t in state_dict.values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())


class CheckpointManager:
    """Saves and restores one run's full training state. Every rank calls `save` and `restore`
    at the same point (RNG states are gathered); only rank 0 writes, in a background thread."""

    def __init__(self, out_dir: Path, info: D.DistInfo, *, config: dict[str, Any], parts: dict[str, Any],
                 keep_last: int, global_batch_size: int, faults=None, sharded: Optional[shards.ShardedState] = None):
        self.out_dir, self.info, self.config = out_dir, info, config
        self.parts = parts            # name -> object with state_dict() / load_state_dict()
        # the live tensors under their plain names: resumes a sharded checkpoint under any layout,
        # and saves one when the layout made it a checkpoint group (the model is sharded)
        self.sharded = sharded
        self.keep_last, self.global_batch_size = keep_last, global_batch_size
        self.faults = faults
        self.snapshots = {"checkpoint": HostSnapshot(), "best": HostSnapshot()}
        self.threads: dict[str, Optional[threading.Thread]] = {"checkpoint": None, "best": None}
        self.errors: list[BaseException] = []
        self.blocked_s = 0.0          # step loop stood still for checkpoints, since take_times()
        self.write_s = 0.0            # background writes finished since take_times()
        self.lock = threading.Lock()
        self.last_commit = time.monotonic()

    # -- timing, for the per-epoch record --------------------------------------------
    def take_times(self) -> tuple[float, float]:
        with self.lock:
            times, self.blocked_s, self.write_s = (self.blocked_s, self.write_s), 0.0, 0.0
        return times

    def minutes_since_last_save(self) -> float:
        return (time.monotonic() - self.last_commit) / 60.0

    # -- saving ----------------------------------------------------------------------
    @property
    def saves_sharded(self) -> bool:
        return self.sharded is not None and self.sharded.writes

    def capture(self, state: RunState) -> dict[str, Any]:
        rngs = D.all_gather_objects(self.info, capture_rng())
        return {"format": FORMAT, **{name: part.state_dict() for name, part in self.parts.items()},
                "run": state.to_state(), "rng": rngs, "config": self.config,
                "world_size": self.info.world_size, "global_batch_size": self.global_batch_size}

    def _save_sharded(self, state: RunState) -> None:
        """Every rank copies its own tensors off the device (the only stall), then writes them in
        the background; rank 0 adds state.pt and commits once every rank's files are in."""
        # the replicated tensors as rank 0 holds them (BatchNorm statistics are each rank's own
        # between evaluations; the run's are rank 0's): only rank 0 writes them, every rank its slices
        view = {key: (t, where) for key, (t, where) in self.sharded.tensors().items()
                if where is not None or self.info.is_main}
        copies = self.snapshots["checkpoint"].take({key: t for key, (t, _) in view.items()})
        tensors = shards.placed({key: (copies[key], where) for key, (_, where) in view.items()})
        epoch, step = state.epoch, state.step
        tmp = None
        if self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            tmp = files.create_temp_dir(self.out_dir / checkpoint_name(epoch, step, shards.SUFFIX))
        # one collective: every rank's RNG and rank 0's folder
        every = D.all_gather_objects(self.info, (capture_rng(), str(tmp) if tmp else None))
        tmp = Path(every[0][1])
        blob = None
        if self.info.is_main:
            blob = {"format": FORMAT, **{name: self.parts[name].state_dict() for name in ("scheduler", "scaler")
                                         if name in self.parts},
                    **self.sharded.extra(), "run": state.to_state(), "rng": [rng for rng, _ in every],
                    "config": self.config, "world_size": self.info.world_size,
                    "global_batch_size": self.global_batch_size, "layout": self.sharded.plan.name}
        delay = self.faults.save_delay(state.global_step) if self.faults else 0.0
        fails = bool(self.faults) and self.faults.save_fails(state.global_step)
        self._start("checkpoint", lambda: self._write_sharded(tmp, tensors, blob, epoch=epoch, step=step,
                                                                 delay_s=delay, fails=fails))

    def save(self, state: RunState, *, wait: bool = True) -> bool:
        """Checkpoint `state`. wait=False (periodic saves): skipped, and said, while the previous
        write is still running; wait=True (end of run, preemption): waits for it. Returns whether
        a save was started. Every rank must make the same call."""
        t0 = time.perf_counter()
        self.raise_failed_writes()
        busy = self.info.is_main and self._running("checkpoint")
        if self.info.distributed:  # every rank takes rank 0's decision (its write commits the checkpoint)
            busy = D.broadcast_object(self.info, busy)
        if busy and not wait:
            self._note(f"checkpoint at epoch {state.epoch} step {state.step} skipped: the previous one "
                       f"is still being written")
            return False
        if self.saves_sharded:
            self._join("checkpoint")  # every rank writes: each waits for its own previous write
            self._save_sharded(state)
            with self.lock:
                self.blocked_s += time.perf_counter() - t0
            return True
        blob = self.capture(state)  # collective: every rank, same point
        if self.info.is_main:
            self._join("checkpoint")
            snapshot = self.snapshots["checkpoint"].take(blob)
            delay = self.faults.save_delay(state.global_step) if self.faults else 0.0
            fails = bool(self.faults) and self.faults.save_fails(state.global_step)
            epoch, step = state.epoch, state.step
            self._start("checkpoint", lambda: self._write_checkpoint(snapshot, epoch, step, delay, fails))
        with self.lock:
            self.blocked_s += time.perf_counter() - t0
        return True

    def save_best(self, *, epoch: int, val_loss: Optional[float]) -> None:
        """best.pt: the plain weights alone (evaluation, fine-tuning), in the background. Every
        rank calls it (a sharded model is consolidated on rank 0); rank 0 writes."""
        t0 = time.perf_counter()
        if self.info.is_main:
            self._join("best")
        state = self.parts["model"].state_dict()
        if not self.info.is_main:
            return
        weights = self.snapshots["best"].take(state)
        blob = {"format": FORMAT, "model_name": self.config["model"], "epoch": epoch, "val_loss": val_loss,
                "state_dict": weights, "config": self.config}
        self._start("best", lambda: self._write_best(blob))
        with self.lock:
            self.blocked_s += time.perf_counter() - t0

    def raise_failed_writes(self) -> None:
        """Every rank raises the same one-line CheckpointError when a background write of rank 0's
        has failed (a full disk, an unwritable folder): training does not go on without them."""
        failed = str(self.errors[0]) if self.info.is_main and self.errors else ""
        failed = D.broadcast_object(self.info, failed)
        if failed:
            self.errors = []
            raise CheckpointError(f"a checkpoint write in {self.out_dir} failed ({failed[:200]}); the newest "
                                  f"committed one is kept: free space or fix the folder, then rerun to resume")

    def save_preempted(self, state: RunState) -> str:
        """The save on preemption, inside torchrun's 30 s grace: when a write is still in flight it
        is finished and kept (a second 4 GB write would not fit in the grace, and the kill would
        lose both); otherwise `state` is saved. Returns what was kept; raises if nothing was."""
        busy = D.broadcast_object(self.info, self.info.is_main and self._running("checkpoint"))
        if not busy:
            self.save(state, wait=True)
        self.commit()
        latest = D.broadcast_object(self.info, (find_latest(self.out_dir) or Path("none")).name
                                    if self.info.is_main else None)
        return (f"the checkpoint in flight ({latest}) was finished and kept; steps after it will be redone"
                if busy else f"checkpoint {latest} written")

    def commit(self) -> None:
        """Wait until the checkpoint just saved is committed (preemption: before saying so); raises
        on every rank when it was not."""
        if self.info.is_main or self.saves_sharded:
            self._join("checkpoint")
        self.raise_failed_writes()

    def close(self, *, raise_errors: bool = True) -> None:
        """Wait for every write in flight; raise the first background error, if any."""
        for kind in self.threads:
            self._join(kind)
        if self.errors and raise_errors:
            error, self.errors = self.errors[0], []
            raise error

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # every exit path (done, preempted, non-finite, Ctrl-C) waits for the writes in flight;
        # an exception already on its way out is not replaced by a background one
        self.close(raise_errors=exc_type is None)

    # -- background ------------------------------------------------------------------
    def _running(self, kind: str) -> bool:
        thread = self.threads[kind]
        return thread is not None and thread.is_alive()

    def _join(self, kind: str) -> None:
        thread = self.threads[kind]
        if thread is not None:
            thread.join()
            self.threads[kind] = None

    def _start(self, kind: str, write) -> None:
        def run():
            t0 = time.perf_counter()
            try:
                write()
            except BaseException as exc:  # said now; the next save, commit or close() fails the job
                self.errors.append(exc)
                print(f"[dist_cifar] error: the {kind} write failed: {type(exc).__name__}: {str(exc)[:200]}",
                      file=sys.stderr, flush=True)
            with self.lock:
                self.write_s += time.perf_counter() - t0
        # not a daemon: the interpreter waits for a write in flight even on an unexpected exit
        self.threads[kind] = threading.Thread(target=run, name=f"dist_cifar-{kind}-writer")
        self.threads[kind].start()

    def _write_checkpoint(self, snapshot: dict[str, Any], epoch: int, step: int, delay_s: float,
                          fails: bool = False) -> None:
        if not all_finite(snapshot["model"]):
            self._note(f"checkpoint at epoch {epoch} step {step} NOT committed: its weights are not finite")
            return
        if fails:  # fault injection: what a full disk does to the write
            raise OSError(errno.ENOSPC, "No space left on device (DIST_CIFAR_FAULT)",
                          str(self.out_dir / checkpoint_name(epoch, step)))
        save(self.out_dir, snapshot, epoch, step, self.keep_last,
             before_publish=(lambda: time.sleep(delay_s)) if delay_s else None)
        self.last_commit = time.monotonic()

    def _write_sharded(self, tmp: Path, tensors: dict[str, torch.Tensor], blob: Optional[dict[str, Any]], *,
                       epoch: int, step: int, delay_s: float, fails: bool) -> None:
        """On every rank, in its writer thread: DCP writes this rank's shard (its collectives on the
        checkpoint group), the rank hashes its own files, rank 0 gathers the hashes and commits.
        Every rank reaches every collective, whatever failed, so no rank waits for a dead one."""
        group = self.sharded.group
        # the weights' finiteness, checked here rather than in the step loop's stall, and agreed
        finite = all_finite({k: v for k, v in tensors.items() if k.startswith("model.")})
        agreed = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(agreed, finite, group=group)
        if not all(agreed):
            if self.info.is_main:
                files.remove(tmp)
            self._note(f"checkpoint at epoch {epoch} step {step} NOT committed: its weights are not finite")
            return
        problem = ""
        try:
            if fails:  # fault injection: a full disk, on every rank (DCP's own failures reach every rank too)
                raise OSError(errno.ENOSPC, "No space left on device (DIST_CIFAR_FAULT)", str(tmp))
            shards.write(tmp, tensors, group)
            mine = shards.file_hashes(shards.own_files(tmp, torch.distributed.get_rank(group)))
        except Exception as exc:
            problem, mine = f"{type(exc).__name__}: {exc}", {}
        reports = [None] * torch.distributed.get_world_size(group) if self.info.is_main else None
        torch.distributed.gather_object((problem, mine), reports, dst=0, group=group)
        if not self.info.is_main:
            if problem:
                raise OSError(problem)
            return
        try:
            failed = [p for p, _ in reports if p]
            if failed:
                raise OSError(failed[0])
            hashes = {name: v for _, theirs in reports for name, v in theirs.items()}
            hashes[shards.STATE] = write_torch(tmp / shards.STATE, blob)
            commit_folder(self.out_dir, tmp, hashes, epoch=epoch, step=step, config=self.config,
                          keep_last=self.keep_last, before_publish=(lambda: time.sleep(delay_s)) if delay_s else None)
        except BaseException:
            files.remove(tmp)  # no half-written folder stays behind
            raise
        self.last_commit = time.monotonic()

    def _write_best(self, blob: dict[str, Any]) -> None:
        if all_finite(blob["state_dict"]):
            best = self.out_dir / files.BEST
            marker_path(best).unlink(missing_ok=True)  # uncommitted while it is replaced
            size, sha256 = write_torch(best, blob)
            files.atomic_write_bytes(marker_path(best), json.dumps(
                {"file": best.name, "size": size, "sha256": sha256, "epoch": blob["epoch"]}).encode())
            remember_verified(best)

    def _note(self, message: str) -> None:
        if self.info.is_main:
            print(f"[dist_cifar] {message}", flush=True)

    # -- loading ---------------------------------------------------------------------
    def load_best(self, best_epoch: int) -> None:
        """Every rank loads best.pt (the weights of epoch `best_epoch`) into the model, each keeping
        its slice of a sharded one. A missing, corrupt or other-epoch best.pt is refused with one
        line: the last weights are never reported as the best ones. Every rank must call it."""
        if self.info.is_main:
            self._join("best")
        best = self.out_dir / files.BEST
        problem = D.broadcast_object(self.info, best_problem(best, best_epoch) if self.info.is_main else None)
        if problem:
            raise CheckpointError(f"{best} {problem}; the summary is left as it was: rerun with --no-save-best to "
                                  f"evaluate the last weights, or --overwrite to train again")
        try:
            self.parts["model"].load_state_dict(torch.load(best, map_location="cpu", weights_only=True,
                                                           mmap=True)["state_dict"])
        except (RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as exc:  # another model's weights
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise CheckpointError(f"{best} does not hold this model's weights ({first}); the summary is left as it "
                                  f"was: rerun with --no-save-best to evaluate the last weights, or --overwrite to "
                                  f"train again") from None

    @staticmethod
    def _misfit(path: Path, name: str, exc: BaseException) -> CheckpointError:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        return CheckpointError(f"checkpoint {path.name}: its {name} state does not fit this run ({first}); "
                               f"resume from another checkpoint, or --overwrite to train again")

    def _read_shards(self, folder: Path, blob: dict[str, Any]) -> None:
        """Load a sharded checkpoint's tensors straight into this rank's live parameters, optimizer
        state and EMA, each rank reading only the chunks of its own slices (any layout, any world
        size); then the optimizer's hyper-parameters from state.pt. Every rank calls it."""
        try:
            saved = shards.saved_keys(folder)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exc:
            raise self._misfit(folder, "index", exc) from None
        has_ema = any(key.startswith("ema.") for key in saved)
        if "ema" in self.parts and not has_ema:  # --ema added on resume: average from here
            self.parts["ema"].reset()
        self.sharded.prepare_load()
        tensors = shards.placed(self.sharded.tensors(with_ema=has_ema))
        absent = sorted(key for key in tensors if key not in saved)
        if absent:
            raise self._misfit(folder, absent[0].split(".")[0], KeyError(f"it has no {absent[0]}"))
        try:
            shards.read(folder, tensors, self.sharded.group)
        except Exception as exc:  # DCP wraps a rank's failure in a CheckpointException on every rank
            raise self._misfit(folder, "tensor", exc) from None
        try:
            self.sharded.load_extra(blob)
        except (KeyError, ValueError, TypeError) as exc:
            raise self._misfit(folder, "optimizer", exc) from None

    def restore(self, path: Path, state: RunState, *, steps_per_epoch: int, seed: int) -> list[str]:
        """Load `path` into the parts and `state`; returns what to tell the user."""
        blob = load(path)
        check_compatible(blob, self.config, path)
        check_progress(blob, self.config, path, world_size=self.info.world_size,
                       global_batch_size=self.global_batch_size, steps_per_epoch=steps_per_epoch)
        same_sharding = (blob["world_size"] == self.info.world_size
                         and blob["global_batch_size"] == self.global_batch_size)
        sharded = path.is_dir()
        wanted = ("run",) if sharded else ("model", "optimizer", "run")
        missing = [name for name in wanted if not isinstance(blob.get(name), dict)]
        if missing:  # resuming would silently start from fresh weights or a fresh optimizer
            raise CheckpointError(f"checkpoint {path.name} lacks its {', '.join(missing)} state: resume from another "
                                  f"checkpoint (--resume PATH), or --overwrite to train again")
        if sharded:
            self._read_shards(path, blob)
        elif "ema" in self.parts and not blob.get("ema"):  # --ema added on resume: average from here
            self.parts["ema"].reset()
        for name, part in self.parts.items():  # a sharded state.pt holds no model, optimizer or ema
            if blob.get(name) and (name != "scheduler" or same_sharding):
                try:
                    part.load_state_dict(blob[name])
                except (RuntimeError, KeyError, ValueError, TypeError) as exc:
                    raise self._misfit(path, name, exc) from None
        state.load_state(blob["run"])
        if not self.info.is_main:  # the saved sums are every rank's already: count them once
            state.sums = EpochSums()
        notes = []
        if same_sharding:
            restore_rng(blob["rng"][self.info.rank])
        else:
            # Different sharding: continue the epoch after the same number of samples (the sampler's
            # permutation does not depend on the world size, so the samples already counted are
            # exactly the first ones), rebuild the schedule for the new step count. Exact replay of
            # the batches is impossible; say so. A position that does not divide into the new
            # global batch repeats a few samples: that epoch's record says partial.
            old_world, old_global = blob["world_size"], blob["global_batch_size"]
            samples_done = state.step * old_global
            state.step = min(samples_done // self.global_batch_size, steps_per_epoch)
            if samples_done != state.step * self.global_batch_size:
                state.partial = True
            state.global_step = state.epoch * steps_per_epoch + state.step
            with warnings.catch_warnings():  # replaying the schedule: no optimizer step is due, torch warns anyway
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                for _ in range(state.global_step):
                    self.parts["scheduler"].step()
            torch.manual_seed(seed + 1000 * state.epoch + self.info.rank)
            notes.append(f"world size changed {old_world} -> {self.info.world_size} (global batch {old_global} -> "
                         f"{self.global_batch_size}): data re-sharded, resuming epoch {state.epoch} "
                         f"at step {state.step}")
        notes.append(f"resumed from {path} at epoch {state.epoch} step {state.step}")
        return notes


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
