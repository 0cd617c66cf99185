"""The run folder's file names, and the one way this project creates a file.

Every artefact is written atomically: a temporary file in the same folder, flushed and
fsynced, renamed over the target, then the folder fsynced, so a crash leaves the old file or
the new one, never half of one. JSON Lines files are read and written here too.

Folders are often shared (a group scratch area, /tmp, a project's data/ with mode 2775), so a
name another user can predict must never be opened by name: a link planted there would make
the write land in a file of the victim's. Temporary files get unpredictable names from
`tempfile.mkstemp` (O_CREAT|O_EXCL: a planted path makes it pick another name), permissions are
set on the descriptor, appends and logs open with O_NOFOLLOW, and a rename replaces a planted
link rather than following it. `distrust` is the one rule for what is read (docs/reliability.md).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

CONFIG = "config.json"
METRICS = "metrics.jsonl"
STEP_LOSSES = "step_losses.jsonl"
STEP_METRICS = "step_metrics.jsonl"
SUMMARY = "summary.json"
BEST = "best.pt"
BEST_MARKER = "best.pt.commit"
LOSS_CURVES = "loss_curves.png"
CONFUSION = "confusion_matrix.png"
WANDB_ID = "wandb_run_id.txt"
WANDB_DIR = "wandb"
TMP_PREFIX = ".tmp-"
# What a run writes besides its checkpoints; `--overwrite` removes exactly these.
ARTEFACTS = (CONFIG, METRICS, STEP_LOSSES, STEP_METRICS, SUMMARY, BEST, BEST_MARKER, LOSS_CURVES, CONFUSION, WANDB_ID)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


FILE_MODE = 0o644  # readable by all, writable by the owner only, whatever the umask


def create_temp(path: Path, mode: int = FILE_MODE) -> tuple[int, Path]:
    """A new, empty file beside `path` under an unpredictable name (`.tmp-<name>-<pid>-<random>`:
    strays are recognisable, and whose they were), opened for writing with `mode` set on the
    descriptor. Returns (descriptor, path)."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}-{os.getpid()}-")
    os.fchmod(fd, mode)
    return fd, Path(name)


def create_temp_dir(path: Path, mode: int = 0o755) -> Path:
    """A new, empty folder beside `path` under an unpredictable name (as `create_temp`), made by
    this process alone (mkdtemp: 0700 until it is set to `mode` on its descriptor). Writers that
    name their own files (torch.distributed.checkpoint) write into it; `publish` renames it."""
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}-{os.getpid()}-"))
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return folder


def remove(path: Path) -> None:
    """Delete a file or a folder this project wrote (a link is removed, never followed)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sha256_file(path: Path) -> tuple[int, str]:
    """(size, sha256) of a file's bytes, read in 1 MB blocks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def publish(tmp: Path, path: Path) -> None:
    """Rename a fully written, fsynced `tmp` over `path` and make the rename durable (a link at
    `path` is replaced, never followed)."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_writer(path: Path, mode: int = FILE_MODE) -> Iterator[Any]:
    """A binary file that becomes `path` when the block ends without an exception (fsynced,
    renamed into place), and leaves nothing behind when it raises."""
    path = Path(path)
    fd, tmp = create_temp(path, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    with atomic_writer(path, mode) as f:
        f.write(data)


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, json.dumps(payload, indent=2).encode())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def make_dirs(path: Path, mode: int = 0o755) -> None:
    """mkdir -p whose new folders get `mode` whatever the umask (set on each folder's descriptor):
    a umask of 002 would leave them group-writable, which `distrust` then refuses."""
    path = Path(path)
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, mode)
        except FileExistsError:
            continue  # made meanwhile by another process
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def open_no_follow(path: Path, flags: int, mode: int = FILE_MODE) -> int:
    """os.open that refuses a symbolic link at `path` (ELOOP) and sets `mode` on what it creates."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        if flags & os.O_CREAT and os.fstat(fd).st_uid == os.getuid():
            os.fchmod(fd, mode)
    except OSError:
        os.close(fd)
        raise
    return fd


def open_append(path: Path, *, text: bool = True):
    return os.fdopen(open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a" if text else "ab")


def open_log(path: Path):
    """A log file started afresh: truncated only once it is known not to be a link."""
    return os.fdopen(open_no_follow(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w")


def distrust(path: Path) -> str:
    """Why `path` may hold what another local user put there ('' when it cannot): a symbolic
    link, an owner other than this user (or root), write permission for others, or a parent folder
    others may write to without the sticky bit (they could replace it). The one rule for what a
    run reads from a place it did not make alone."""
    path = Path(path)
    try:
        st = path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return ""  # nothing there to distrust
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if st.st_uid not in (os.getuid(), 0):
        return f"{path} is owned by uid {st.st_uid}, not you"
    if st.st_mode & 0o022 and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
        return f"other users may write to {path}"
    parent = path.absolute().parent
    pst = parent.stat()
    if pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX:
        return f"other users may replace files in {parent} (group/other-writable, not sticky)"
    return ""


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


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
    with open_append(path) as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
