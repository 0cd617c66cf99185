"""CIFAR-10 from its sources into uint8 tensors, cached on disk, split by protocol.

Every source ends as `RawData`: train/test images as uint8 (N, 32, 32, 3) and int64 labels.
Decoding happens once; the result is cached beside the data (or under ~/.cache/dist_cifar when
that folder is read-only) and reloaded in about a second. A cache whose fingerprint no longer
matches its source, or that fails to load, is rebuilt.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import download as cifar_download
from . import files

NUM_CLASSES = 10  # every model's output width (models.NUM_CLASSES)
STALE_TEMP_S = 3600  # a temporary file or folder untouched this long belongs to a dead process
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
HALF_MEAN, HALF_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
REPORT_TRAIN, REPORT_VAL, REPORT_TEST = 20_000, 5_000, 5_000  # docs/report_protocol.md's split, by index


def report_split_problem(n_pool: int, n_test: int, source: str) -> Optional[str]:
    """Why `--split report` cannot be cut from this many train-pool and test images (None: it can)."""
    if n_pool < REPORT_TRAIN + REPORT_VAL or n_test < REPORT_TEST:
        return (f"--split report takes train images 0..{REPORT_TRAIN + REPORT_VAL - 1} and test images "
                f"0..{REPORT_TEST - 1}, but {source} has {n_pool} and {n_test}: use --split full")
    return None
CACHE_VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm")


class DataError(RuntimeError):
    """Missing or unreadable data; the message is one line that names the fix."""


class DataMissing(DataError):
    """No data of this kind at the path at all (as opposed to data that is there but broken):
    the only error `--dataset auto` falls back from."""


class DownloadFailed(DataMissing):
    """Nothing local and no download (offline, unreachable mirror)."""


BATCH_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


@dataclass(kw_only=True)
class RawData:
    train_x: torch.Tensor  # uint8 (N, 32, 32, 3)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    source: str


@dataclass
class Split:
    x: torch.Tensor  # uint8 (N, 32, 32, 3)
    y: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Splits:
    train: Split
    val: Optional[Split]
    test: Split
    classes: tuple[str, ...]
    source: str


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return (HALF_MEAN, HALF_STD) if name == "half" else (CIFAR_MEAN, CIFAR_STD)


# ---------------------------------------------------------------------------- caching


def writable(folder: Path) -> bool:
    # mode bits too: root passes os.access on a folder laid out read-only on purpose
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def user_cache(anchor: Path, tag: str) -> Path:
    """A place in the user cache for derived files of `anchor` (keyed by its resolved path)."""
    key = hashlib.sha1(str(anchor.resolve()).encode()).hexdigest()[:16]
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dist_cifar" / f"{tag}_{key}"


def cache_path_for(anchor: Path, tag: str) -> Path:
    """$DIST_CIFAR_CACHE_DIR when set (keyed by the data's path), else beside the data when
    writable and no other user can replace files there (files.distrust), else in the user cache. The GPU suite sets it: a cache beside the tarball would
    travel with the checkout, 185 MB over what may travel."""
    chosen = os.environ.get("DIST_CIFAR_CACHE_DIR")
    if chosen:
        key = hashlib.sha1(str(anchor.resolve()).encode()).hexdigest()[:16]
        Path(chosen).mkdir(parents=True, exist_ok=True)
        return Path(chosen) / f".dist_cifar_cache_{tag}_{key}.pt"
    beside = anchor.parent if anchor.is_file() else anchor
    if writable(beside) and not files.distrust(beside):
        return beside / f".dist_cifar_cache_{tag}.pt"
    return user_cache(anchor, tag).with_suffix(".pt")


def fingerprint(paths: list[Path]) -> str:
    """Identity of the source files: path, size, inode and nanosecond mtime (a same-size rewrite
    within one second still changes it; so does replacing the file)."""
    items = sorted((str(p.resolve()), st.st_size, st.st_ino, st.st_mtime_ns) for p in paths for st in [p.stat()])
    return hashlib.sha1(json.dumps(items).encode()).hexdigest()


def remove_stale_temps(cache: Path) -> None:
    """Temp files of cache writes that were killed midway: this user's, another process's,
    untouched for an hour (a live writer of a large cache touches its file far more often)."""
    mine = f"{files.TMP_PREFIX}{cache.name}-{os.getpid()}-"
    earlier = list(cache.parent.glob(cache.name + ".tmp*"))  # the names dist_cifar 0.x used
    for stray in earlier + list(cache.parent.glob(f"{files.TMP_PREFIX}{cache.name}-*")):
        try:
            st = stray.lstat()
        except OSError:
            continue
        if (stray.is_file() and not stray.is_symlink() and st.st_uid == os.getuid() and not stray.name.startswith(mine)
                and time.time() - st.st_mtime > STALE_TEMP_S):
            stray.unlink(missing_ok=True)


def cache_shape_problem(raw: RawData) -> str:
    """What is wrong with a cache's arrays ('' when they are N x 32 x 32 x 3 uint8 images with
    one integer label each): a damaged cache must not surface later as a batch-size error."""
    for name, x, y in (("train", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)):
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or x.dtype != torch.uint8 \
                or tuple(x.shape[1:]) != (32, 32, 3) or y.ndim != 1 or len(y) != len(x) or len(x) == 0:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            return f"{name} images of shape {shape} and {len(y) if hasattr(y, '__len__') else '?'} labels"
    return ""


def load_cached(cache: Path, fp: str, build: Callable[[], RawData]) -> RawData:
    """The decoded images from `cache` when it matches fingerprint `fp`, else `build()` written
    there. A cache another user could have written (files.distrust) is never read: its
    fingerprint (path, size, inode, mtime) is easy to copy onto planted images."""
    if cache.exists() or cache.is_symlink():
        why = files.distrust(cache)
        if why:
            mine = user_cache(cache, "cache").with_suffix(".pt")
            print(f"[dist_cifar] ignoring cache {cache} ({why}); using {mine}")
            cache = mine
    if cache.parent.is_dir():
        remove_stale_temps(cache)
    if cache.exists():
        try:
            blob = torch.load(cache, weights_only=True)
            if blob.get("version") == CACHE_VERSION and blob.get("fingerprint") == fp:
                raw = RawData(train_x=blob["train_x"], train_y=blob["train_y"], test_x=blob["test_x"],
                              test_y=blob["test_y"], classes=tuple(blob["classes"]), source=blob["source"])
                problem = cache_shape_problem(raw)
                if not problem:
                    return raw
                print(f"[dist_cifar] cache {cache} holds {problem}, not decoded images; rebuilding it")
            else:
                print(f"[dist_cifar] cache {cache} is stale; rebuilding it")
        except Exception as exc:  # a torn or foreign file: rebuild rather than fail
            print(f"[dist_cifar] cache {cache} is unreadable ({type(exc).__name__}); rebuilding it")
    raw = build()
    blob = dict(version=CACHE_VERSION, fingerprint=fp, train_x=raw.train_x, train_y=raw.train_y,
                test_x=raw.test_x, test_y=raw.test_y, classes=list(raw.classes), source=raw.source)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with files.atomic_writer(cache) as f:  # readers see the old cache or the new one, never half of one
            torch.save(blob, f)
    except OSError as exc:
        print(f"[dist_cifar] could not write cache {cache}: {exc}")
    return raw


# ---------------------------------------------------------------------------- cifar10 pickles


class NumpyOnlyUnpickler(pickle.Unpickler):
    """The official batches hold dicts of bytes, lists and numpy arrays; nothing else may load."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}  # protocol-2 bytes

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    fix = "delete it and re-extract cifar-10-python.tar.gz (or delete the folder to download it again)"
    try:
        with open(path, "rb") as f:
            batch = NumpyOnlyUnpickler(f, encoding="bytes").load()
        raw = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as exc:
        raise DataError(f"corrupt CIFAR-10 batch file {path} ({type(exc).__name__}: "
                        f"{str(exc)[:80]}); {fix}") from None
    if raw.dtype != np.uint8:  # a cast would wrap values above 255 and zero a [0, 1] float image
        raise DataError(f"CIFAR-10 batch file {path} holds {raw.dtype} pixels, not uint8 0..255 as the official "
                        f"files do; convert them (round(x * 255) for [0, 1] floats) or {fix}")
    data = raw
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"corrupt CIFAR-10 batch file {path} (data {data.shape}, "
                        f"{len(labels)} labels; expected (N, 3072) and N labels); {fix}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"corrupt CIFAR-10 batch file {path} (labels outside 0..9); {fix}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def complete(folder: Path) -> bool:
    return all((folder / name).exists() for name in BATCH_FILES)


def ignoring(what: Path, why: str) -> None:
    print(f"[dist_cifar] ignoring {what}: {why}, so another user could have put it there "
          f"(--trust-shared reads it)", flush=True)


def batches_problem(folder: Path) -> str:
    """files.distrust of a batches folder or any of its batch files ('' when all are safe)."""
    return next((why for why in map(files.distrust, [folder, *(folder / n for n in BATCH_FILES)]) if why), "")


def official_archive(archive: Path) -> bool:
    """An archive whose MD5 is the official one (or the mirror's named in the environment): its
    content is CIFAR-10 whoever put it there."""
    from torchvision.datasets.utils import calculate_md5
    return calculate_md5(archive) == cifar_download.source()[1]


def find_cifar10(data_dir: Path, download: bool, trust: bool = False) -> Path:
    """The cifar-10-batches-py folder: found, extracted once from the archive, or downloaded.
    Batches another user could have planted are passed over (said once) unless `trust`; an
    archive is used when it is safe or its MD5 is the official one."""
    folder = data_dir / "cifar-10-batches-py"
    for candidate in (folder, data_dir):
        if complete(candidate):
            why = "" if trust else batches_problem(candidate)
            if not why:
                cifar_download.remove_stale_parts(data_dir)  # downloads that died before this one finished
                return candidate
            ignoring(candidate, why)
    archive = data_dir / cifar_download.ARCHIVE
    if archive.exists():
        why = "" if trust else files.distrust(archive)
        if not why or official_archive(archive):
            return extract_cifar10(archive, trust)
        ignoring(archive, f"{why} and it is not the official archive (MD5)")
    elif folder.is_dir() and (trust or not files.distrust(folder)):
        missing = [name for name in BATCH_FILES if not (folder / name).exists()]
        raise DataError(f"incomplete CIFAR-10 in {folder}: missing {', '.join(missing)}; put "
                        f"cifar-10-python.tar.gz beside it to re-extract (or delete the folder to download it again)")
    if download:
        return extract_cifar10(fetch_archive(download_home(data_dir, trust)), trust)
    raise DataMissing(f"no CIFAR-10 found in {data_dir.resolve()}: expected cifar-10-batches-py/ "
                      f"(data_batch_1..5, test_batch) or cifar-10-python.tar.gz there; drop --no-download "
                      f"to fetch it, or point --data-dir elsewhere")


def download_home(data_dir: Path, trust: bool) -> Path:
    """Where the download goes: --data-dir, unless another user could replace files there (or
    already holds the archive's name); then this user's cache, said in one line."""
    why = "" if trust else files.distrust(data_dir) or files.distrust(data_dir / cifar_download.ARCHIVE)
    if not why:
        return data_dir
    home = user_cache(data_dir, "download")
    print(f"[dist_cifar] {data_dir} is shared ({why}): downloading into {home} instead", flush=True)
    return home


def fetch_archive(data_dir: Path) -> Path:
    """The official archive, downloaded; a failure is one line naming both ways out."""
    try:
        return cifar_download.download_archive(data_dir)
    except cifar_download.ChecksumMismatch as exc:
        raise DataError(f"CIFAR-10 download rejected: {exc}; fix {cifar_download.URL_ENV}/{cifar_download.MD5_ENV} or put "
                        f"{cifar_download.ARCHIVE} in {data_dir} by hand") from None
    except OSError as exc:
        if exc.filename is not None:  # the folder itself: read-only, a file in the way
            raise DataError(f"cannot write the CIFAR-10 download into {data_dir.resolve()} ({exc.strerror}): "
                            f"choose a writable --data-dir") from None
        raise DownloadFailed(f"CIFAR-10 download from {cifar_download.source()[0]} failed ({exc}): put {cifar_download.ARCHIVE} "
                             f"in {data_dir.resolve()}, or pass --no-download --dataset imagefolder "
                             f"--data-dir <your image tree>") from None
    except cifar_download.DownloadFailed as exc:
        raise DownloadFailed(f"CIFAR-10 download from {cifar_download.source()[0]} failed ({exc}): put {cifar_download.ARCHIVE} "
                             f"in {data_dir.resolve()}, or pass --no-download --dataset imagefolder "
                             f"--data-dir <your image tree>") from None


def extract_cifar10(archive: Path, trust: bool = False) -> Path:
    """Extract into a temporary folder and rename the batches folder into place only when it is
    complete, so a truncated or foreign archive never leaves a half folder behind. Beside the
    archive when that folder is writable and no other user can replace files there (nor already
    holds the batches folder's name), else in the user cache."""
    parent = archive.parent
    if not writable(parent) or (not trust and (files.distrust(parent) or files.distrust(parent / "cifar-10-batches-py"))):
        parent = user_cache(archive, "cifar10")
    parent.mkdir(parents=True, exist_ok=True)
    target = parent / "cifar-10-batches-py"
    if complete(target) and (trust or not batches_problem(target)):
        return target  # extracted before (the user cache, for a read-only or shared --data-dir)
    for stale in parent.glob(".tmp-extract-*"):  # extractions killed midway; never a live one, never a link
        if stale.is_dir() and not stale.is_symlink() and time.time() - stale.stat().st_mtime > STALE_TEMP_S:
            shutil.rmtree(stale, ignore_errors=True)
    # O_EXCL with an unpredictable name: a path planted in a shared folder is never followed
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-extract-", dir=parent))
    try:
        try:
            with tarfile.open(archive) as tar:
                # only the batches folder: a foreign 60,000-image archive is refused after one read,
                # not after writing all its files
                wanted = [m for m in tar if m.name.split("/", 1)[0] == "cifar-10-batches-py"]
                tar.extractall(tmp, members=wanted, filter="data")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise DataError(f"corrupt archive {archive} ({type(exc).__name__}: {str(exc)[:80]}); download it "
                            f"again") from None
        extracted = tmp / "cifar-10-batches-py"
        if not complete(extracted):
            missing = [name for name in BATCH_FILES if not (extracted / name).exists()]
            raise DataError(f"{archive} is not the CIFAR-10 python archive: it lacks cifar-10-batches-py/"
                            f"{{{','.join(missing)}}}; download it again")
        if complete(target):
            return target  # another process (another node's first rank, an ablation array) finished first
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier extraction
        try:
            os.replace(extracted, target)
        except OSError:
            if not complete(target):  # lost a race to a process whose copy is complete: that is success
                raise
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_cifar10(data_dir: Path, download: bool = False, trust: bool = False) -> RawData:
    folder = find_cifar10(data_dir, download, trust)
    batch_files = [folder / name for name in BATCH_FILES]

    def build() -> RawData:
        parts = [read_batch(f) for f in batch_files]
        train_x = np.concatenate([p[0] for p in parts[:5]])
        train_y = np.concatenate([p[1] for p in parts[:5]])
        classes = CLASSES
        meta = folder / "batches.meta"
        if meta.exists():
            try:
                with open(meta, "rb") as f:
                    names = NumpyOnlyUnpickler(f, encoding="bytes").load()[b"label_names"]
                classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
            except Exception:
                raise DataError(f"corrupt CIFAR-10 metadata file {meta}; re-extract the archive") from None
            if len(classes) != NUM_CLASSES:  # an 11th name would add an empty class to every report
                raise DataError(f"CIFAR-10 metadata file {meta} names {len(classes)} classes, not {NUM_CLASSES}; "
                                f"re-extract the archive")
        return RawData(train_x=torch.from_numpy(train_x), train_y=torch.from_numpy(train_y),
                       test_x=torch.from_numpy(parts[5][0]), test_y=torch.from_numpy(parts[5][1]),
                       classes=classes, source=f"cifar10:{folder}")

    return load_cached(cache_path_for(folder, "cifar10"), fingerprint(batch_files), build)


# ---------------------------------------------------------------------------- image folders


MAX_IMAGE_BYTES = 32 << 20  # a 32x32 image is a few KB; anything this large is not one


def decode_image(blob: bytes, name: str) -> np.ndarray:
    from PIL import Image
    try:
        img = Image.open(io.BytesIO(blob))
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit/int/float grey: scale, never clip to 255
            wide = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") else max(float(wide.max()), 1.0)
            img = Image.fromarray(np.clip(wide * 255.0 / top + 0.5, 0, 255).astype(np.uint8))
        img = img.convert("RGB")
    except Exception as exc:
        raise DataError(f"unreadable image {name} ({type(exc).__name__}); remove or replace it") from None
    if img.size != (32, 32):
        img = img.resize((32, 32), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def collect(entries: list[tuple[str, str, str, Callable[[], bytes]]]) -> RawData:
    """entries: (split, class, name, read) -> RawData. Classes sorted by name, as torchvision's
    ImageFolder does; images in a fixed class-mixed order (see `mix_order`)."""
    classes = tuple(sorted({c for s, c, _, _ in entries if s == "train"}))
    if not classes:
        raise DataError("no train/<class>/<image> files found in the image folder")
    if len(classes) > NUM_CLASSES:
        raise DataError(f"the image folder has {len(classes)} classes under train/ but the models have "
                        f"{NUM_CLASSES} outputs (CIFAR-10): keep {NUM_CLASSES} class folders")
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split in ("train", "test"):
        items = sorted((e for e in entries if e[0] == split), key=lambda e: (e[1], e[2]))
        unknown = {c for _, c, _, _ in items} - set(index)
        if unknown:
            raise DataError(f"test classes {sorted(unknown)} do not appear under train/")
        if not items:
            raise DataError(f"no {split}/<class>/<image> files found in the image folder")
        x = np.stack([decode_image(read(), f"{split}/{c}/{n}") for _, c, n, read in items])
        y = np.array([index[c] for _, c, _, _ in items], dtype=np.int64)
        order = mix_order(len(y))
        out[split] = (torch.from_numpy(x[order]), torch.from_numpy(y[order]))
    (train_x, train_y), (test_x, test_y) = out["train"], out["test"]
    return RawData(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=classes,
                   source="imagefolder")


def mix_order(n: int) -> np.ndarray:
    """A fixed permutation. The official pickles store images in a shuffled order, so the report's
    'images 0..19,999' are class-balanced; a class-sorted folder would not be."""
    return np.random.default_rng(20240101).permutation(n)


def split_member(path: str) -> Optional[tuple[str, str, str]]:
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-3] in ("train", "test") and path.lower().endswith(IMAGE_SUFFIXES):
        return parts[-3], parts[-2], parts[-1]
    return None


def load_imagefolder(data_dir: Path, trust: bool = False) -> RawData:
    found = data_dir if data_dir.is_file() else local_image_set(data_dir, trust)
    why = "" if trust or found is None else files.distrust(found)
    if why:
        raise DataError(f"--data-dir {found}: {why}, so another user could have planted its images: copy it into a "
                        f"folder of your own, or pass --trust-shared to read it")
    if found is None:
        raise DataMissing(f"no image folder at {data_dir.resolve()}: expected train/<class>/*.jpg and "
                          f"test/<class>/*.jpg, or one .tar.gz of that tree (pass it as --data-dir)")
    archive = found if found.is_file() else None
    if archive is not None and zipfile.is_zipfile(archive):
        raise DataError(f"{archive} is a zip file; the image loader reads a .tar.gz of train/<class>/* and "
                        f"test/<class>/*: unzip it and pass the folder, or repack it with tar czf")
    if archive is not None:
        def build() -> RawData:
            entries = []
            try:
                with tarfile.open(archive, "r:*") as tar:
                    for member in tar:
                        where = split_member(member.name) if member.isfile() else None
                        if where:
                            if member.size > MAX_IMAGE_BYTES:  # read() would hold it all in memory
                                raise DataError(f"{archive}: member {member.name} is {member.size:,} bytes, not an "
                                                f"image this loader reads (at most {MAX_IMAGE_BYTES:,}); remove it")
                            blob = tar.extractfile(member).read()
                            entries.append((*where, lambda b=blob: b))
            except DataError:
                raise
            except Exception as exc:  # tarfile/gzip/zlib errors of a truncated or foreign file
                raise DataError(f"corrupt archive {archive} ({type(exc).__name__}); "
                                f"download or copy it again") from None
            return collect(entries)
        return load_cached(cache_path_for(archive, "imagefolder"), fingerprint([archive]), build)

    image_files = [p for p in data_dir.glob("*/*/*") if p.is_file() and split_member(str(p))]
    for split in ("train", "test"):
        for folder in sorted((data_dir / split).glob("*")) if (data_dir / split).is_dir() else []:
            if folder.is_dir() and not any(split_member(str(p)) for p in folder.iterdir() if p.is_file()):
                raise DataError(f"class folder {folder} holds no images: every later label would shift by one; "
                                f"remove the folder or add its images")
        deeper = [p for p in (data_dir / split).glob("*/*/**/*") if p.is_file() and
                  str(p).lower().endswith(IMAGE_SUFFIXES)] if (data_dir / split).is_dir() else []
        if deeper:
            print(f"[dist_cifar] ignoring {len(deeper)} image(s) deeper than {split}/<class>/<image>, e.g. "
                  f"{deeper[0]}", flush=True)

    def build_tree() -> RawData:
        return collect([(*split_member(str(p)), p.read_bytes) for p in image_files])

    return load_cached(cache_path_for(data_dir, "imagefolder"), fingerprint(image_files), build_tree)


# ---------------------------------------------------------------------------- synthetic


def make_synthetic(n_train: int, seed: int = 1234) -> RawData:
    """Learnable but not trivial: each class is a smooth colour pattern; every image is its
    class pattern, shifted by a few pixels, mixed with smooth noise and pixel noise."""
    g = torch.Generator().manual_seed(seed)
    n_pool, n_test = n_train + n_train // 4, max(n_train // 4, 1)

    def smooth(k: int, grid: int) -> torch.Tensor:
        coarse = torch.rand(k, 3, grid, grid, generator=g)
        return torch.nn.functional.interpolate(coarse, size=(40, 40), mode="bilinear", align_corners=False)

    protos = smooth(10, 4)

    def images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=g)
        dx, dy = torch.randint(0, 9, (2, n), generator=g)
        rows = (dy[:, None] + torch.arange(32))[:, :, None]
        cols = (dx[:, None] + torch.arange(32))[:, None, :]
        base = protos[y].permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols]
        noise = smooth(n, 8).permute(0, 2, 3, 1)[:, 4:36, 4:36]
        x = 0.35 * base + 0.65 * noise + 0.15 * torch.randn(n, 32, 32, 3, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    train_x, train_y = images(n_pool)
    test_x, test_y = images(n_test)
    return RawData(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=CLASSES,
                   source=f"synthetic:{n_train}")


# ---------------------------------------------------------------------------- entry points


def local_image_set(root: Path, trust: bool = False) -> Optional[Path]:
    """An image tree (train/) or the one image tarball in `root` (not the official archive); one
    another user could have put there is passed over (said once) unless `trust`."""
    if not root.is_dir():
        return None
    trees = [root] if (root / "train").is_dir() else []
    tars = [p for p in sorted(root.glob("*.tar.gz")) + sorted(root.glob("*.tgz")) if p.name != cifar_download.ARCHIVE]
    usable = []
    for found in trees + tars:
        why = "" if trust else (files.distrust(found / "train") or files.distrust(found) if found in trees
                                else files.distrust(found))
        if why:
            ignoring(found, why)
        else:
            usable.append(found)
    if trees and trees[0] in usable:
        return root
    tars = [p for p in usable if p in tars]
    return tars[0] if len(tars) == 1 else None


def load_local_or_download(root: Path, download: bool, trust: bool = False) -> RawData:
    """The official files (or archive) in `root`, else a CIFAR image tree or tarball already there
    (said once), else, when allowed, the official download. Data that is there but broken is an
    error, never a fallback; with nothing there, the official loader's one line says what to do."""
    try:
        return load_cifar10(root, False, trust)
    except DataMissing as missing:
        official = missing
    images = local_image_set(root, trust)
    if images is None:
        if not download:
            raise official from None
        return load_cifar10(root, True, trust)
    if os.environ.get("RANK", "0") == "0":
        print(f"[dist_cifar] no official CIFAR-10 files in {root}; reading the image set {images} instead "
              f"(--dataset imagefolder --data-dir {images} says so explicitly)", flush=True)
    return load_imagefolder(images, trust)


def load_source(dataset: str, data_dir: str, download: bool = False, synthetic_size: int = 2000,
                trust: bool = False) -> RawData:
    """`trust`: read data another user could have placed (--trust-shared; files.distrust)."""
    root = Path(data_dir)
    if dataset == "cifar10":
        return load_local_or_download(root, download, trust)
    if dataset == "imagefolder":
        return load_imagefolder(root, trust)
    if dataset == "synthetic":
        return make_synthetic(synthetic_size)
    if dataset == "auto":  # an image tarball given as the path, else what cifar10 reads, then (loudly) synthetic
        try:
            return load_imagefolder(root, trust) if root.is_file() else load_local_or_download(root, download, trust)
        except DataMissing as exc:
            last = exc
        banner = "!" * 78
        print(f"{banner}\n[dist_cifar] NO CIFAR-10 ({last}).\n[dist_cifar] TRAINING ON "
              f"SYNTHETIC DATA: the accuracies below say nothing about CIFAR-10.\n{banner}", flush=True)
        return make_synthetic(synthetic_size)
    raise DataError(f"--dataset {dataset!r} is not one of cifar10, imagefolder, synthetic, auto")


def default_val_size(n_pool: int, source: str) -> int:
    """CIFAR-10's customary 5,000 for CIFAR-10-sized pools, 10% of smaller image sets, and a
    fifth of a synthetic pool."""
    if source.startswith("synthetic"):
        return n_pool // 5
    return 5_000 if n_pool >= 50_000 else max(1, n_pool // 10)


def make_splits(raw: RawData, split: str, val_size: int = -1, max_train: int = 0) -> Splits:
    """The report protocol (by index) or the full one (random hold-out with a fixed seed)."""
    n_pool, n_test = len(raw.train_y), len(raw.test_y)
    if split == "report":
        n_tr, n_val, n_te = REPORT_TRAIN, REPORT_VAL, REPORT_TEST
        problem = report_split_problem(n_pool, n_test, raw.source)
        if problem:
            raise DataError(problem)
        train_idx = torch.arange(n_tr)
        val_idx = torch.arange(n_tr, n_tr + n_val)
        test = Split(raw.test_x[:n_te], raw.test_y[:n_te])
    else:
        if val_size < 0:
            val_size = default_val_size(n_pool, raw.source)
        if val_size >= n_pool:
            raise DataError(f"--val-size {val_size} leaves no training images out of {n_pool}")
        perm = torch.randperm(n_pool, generator=torch.Generator().manual_seed(0))
        val_idx = perm[:val_size].sort().values
        train_idx = perm[val_size:].sort().values
        test = Split(raw.test_x, raw.test_y)
    if max_train:
        train_idx = train_idx[:max_train]
    val = Split(raw.train_x[val_idx], raw.train_y[val_idx]) if len(val_idx) else None
    return Splits(Split(raw.train_x[train_idx], raw.train_y[train_idx]), val, test, raw.classes, raw.source)
