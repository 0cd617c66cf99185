"""The out dir: choose it, refuse to clobber it, find what to resume from, keep logs consistent."""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Optional

from . import checkpoint as ckpt
from . import files, shards
from .config import ConfigError, TrainConfig


LOCK = ".lock"
_held_locks: list = []  # open lock files: held until the run ends (release_locks) or the process does


def default_out_dir(cfg: TrainConfig) -> Path:
    """runs/<model>-<timestamp>-<4 hex>: two runs started in the same second still differ."""
    return Path("runs") / f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def check_writable(out: Path) -> None:
    """Refuse an out dir the run could not write into, before any work."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--out-dir {out}: {probe} is not a writable folder; choose another --out-dir")
    try:
        files.make_dirs(out)  # ours alone whatever the umask (002 is common on clusters): see `check_trusted`
        with tempfile.NamedTemporaryFile(dir=out, prefix=files.TMP_PREFIX + "probe-"):
            pass
    except OSError as exc:
        raise ConfigError(f"--out-dir {out} is not writable ({exc.strerror}); choose another --out-dir") from None


def check_trusted(out: Path, cfg: TrainConfig) -> None:
    """An out dir another user owns or could write into could hold their links (written through)
    and forged checkpoints (resumed): refused with one line unless --trust-shared."""
    why = files.distrust(out)
    if why and not cfg.trust_shared:
        raise ConfigError(f"--out-dir {out}: {why}, so another user could plant links or forged checkpoints in "
                          f"it: choose a folder of your own, or pass --trust-shared")


def lock(out: Path) -> None:
    """An exclusive lock on the out dir for this process's life: a second run into the same folder
    gets one line instead of mixing its files with this one's. Opened without following a link
    and emptied only once the lock is held."""
    try:
        handle = os.fdopen(files.open_no_follow(out / LOCK, os.O_RDWR | os.O_CREAT), "r+")
    except OSError as exc:
        raise ConfigError(f"--out-dir {out}: cannot open its lock file {out / LOCK} ({exc.strerror}; a link there "
                          f"is refused): remove it, or choose another --out-dir") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read(200).strip() or "another process"
        handle.close()
        raise ConfigError(f"--out-dir {out} is in use by a running job ({holder}): wait for it to end, or "
                          f"choose another --out-dir") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
    except OSError as exc:  # a full disk: the lock is held all the same; its note is a courtesy
        print(f"[dist_cifar] could not write who holds {out / LOCK} ({exc.strerror})", flush=True)
    _held_locks.append(handle)


def release_locks() -> None:
    """Unlock every out dir this process locked: its run is over (a process that starts several
    runs in turn, a notebook or a test, reuses a folder only after this)."""
    while _held_locks:
        _held_locks.pop().close()


def holds_another_run(out: Path) -> bool:
    return out.is_dir() and any(p.name != LOCK for p in out.iterdir())


def prepare(cfg: TrainConfig) -> tuple[Path, Optional[Path]]:
    """(out dir, checkpoint to resume or None), with the out dir locked. Raises ConfigError (one
    line) when the out dir is unwritable, in use, or holds another run this one would overwrite
    or continue without being asked to."""
    out = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out-dir {out} exists and is not a folder")
    if out.exists():
        check_trusted(out, cfg)  # before anything is written into it
    check_writable(out)
    check_trusted(out, cfg)  # made now: its parent must not let others replace it either
    lock(out)
    if cfg.resume not in ("auto", "none"):
        return out, explicit_resume(cfg, out)
    if cfg.resume == "auto" and out.is_dir() and not cfg.overwrite:
        latest = ckpt.find_latest(out)
        if latest is not None:
            problem = ckpt.identity_problem((ckpt.read_marker(latest) or {}).get("identity", {}), cfg.to_dict())
            if problem:
                raise ConfigError(f"--out-dir {out} holds another run: its checkpoint {latest.name} {problem}; "
                                  f"resume it with the same settings, choose a new --out-dir, or pass --overwrite")
            return out, latest
    if holds_another_run(out):
        own = not cfg.overwrite and own_start_without_checkpoint(out, cfg)
        if not (cfg.overwrite or own):
            if cfg.resume == "none":
                raise ConfigError(f"--resume none: --out-dir {out} is not empty (another run's files): pass "
                                  f"--overwrite to replace them, or choose a new --out-dir")
            raise ConfigError(f"--out-dir {out} is not empty and holds no checkpoint to resume: pass "
                              f"--overwrite to replace its run, or choose a new --out-dir")
        if own:
            print(f"[dist_cifar] {out} holds only this run's own start, which stopped before its first checkpoint: "
                  f"starting it again", flush=True)
        clear(out)
    return out, None


def own_start_without_checkpoint(out: Path, cfg: TrainConfig) -> bool:
    """The folder holds nothing but what this same run (same identity in config.json, no summary)
    wrote before its first committed checkpoint: a crash, a kill or a NaN stop in the first
    interval. The same command (an elastic restart, a requeue) then starts it again."""
    try:
        saved = json.loads((out / files.CONFIG).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(saved, dict) or ckpt.identity_problem(ckpt.identity(saved), cfg.to_dict()) \
            or (out / files.SUMMARY).exists():
        return False
    known = set(files.ARTEFACTS) | {LOCK, files.WANDB_DIR}
    return all(p.name in known or p.name.startswith((files.TMP_PREFIX, "ckpt-")) for p in out.iterdir())


def explicit_resume(cfg: TrainConfig, out: Path) -> Path:
    """--resume PATH: a committed, intact checkpoint, continued in its own folder or an empty one."""
    path = Path(cfg.resume)
    if not (path.is_file() or (path.is_dir() and path.suffix == shards.SUFFIX)):
        raise ConfigError(f"--resume {path}: no such checkpoint file (or sharded checkpoint folder)")
    why = files.distrust(path) or files.distrust(path.parent)
    if why and not cfg.trust_shared:
        raise ConfigError(f"--resume {path}: {why}, so another user could have forged it: copy it into a folder of "
                          f"your own, or pass --trust-shared")
    if ckpt.marker_path(path).exists() and not ckpt.verify(path):
        raise ConfigError(f"--resume {path}: the file does not match its commit marker (corrupt or torn); "
                          f"resume from another checkpoint, or --resume auto to take the newest intact one")
    if path.resolve().parent != out.resolve() and holds_another_run(out):
        if not cfg.overwrite:
            raise ConfigError(f"--out-dir {out} holds another run: --resume {path} would overwrite it; choose an "
                              f"empty --out-dir (or {path.parent}), or pass --overwrite")
        clear(out)
    return path


def clear(out: Path) -> None:
    """Remove a previous run's artefacts (and nothing else the user may keep there)."""
    for name in files.ARTEFACTS:
        (out / name).unlink(missing_ok=True)
    for path in list(out.glob("ckpt-*")) + list(out.glob(files.TMP_PREFIX + "*")):
        files.remove(path)  # a sharded checkpoint is a folder
    shutil.rmtree(out / files.WANDB_DIR, ignore_errors=True)


class StepLossLog:
    """step_losses.jsonl: one line per training step, never duplicated across resumes."""

    def __init__(self, out: Path, enabled: bool):
        self.path, self.enabled = out / files.STEP_LOSSES, enabled
        self.written: dict[int, int] = {}  # epoch -> steps written

    def truncate_to(self, epoch: int, step: int) -> None:
        """Keep only entries before (epoch, step): the resumed run recomputes the rest."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in files.read_jsonl(self.path) if (r["epoch"], r["step"]) < (epoch, step)]
        files.write_jsonl(self.path, keep)
        self.written = {epoch: step}

    def write(self, epoch: int, start_step: int, losses: list[float]) -> None:
        if not self.enabled:
            return
        first = max(self.written.get(epoch, start_step), start_step)
        files.append_jsonl(self.path, ({"epoch": epoch, "step": start_step + i, "loss": loss}
                                       for i, loss in enumerate(losses) if start_step + i >= first))
        self.written[epoch] = start_step + len(losses)
