"""Fetch the official CIFAR-10 archive when --data-dir has none: streamed into a part file with a
per-read timeout, a whole-transfer deadline and a minimum rate, the MD5 checked before anything
is extracted, the archive renamed into place only when whole.

Clusters with a local mirror point DIST_CIFAR_CIFAR10_URL (and DIST_CIFAR_CIFAR10_MD5, when
the mirror's file differs) at it.
"""
from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

from . import files

ARCHIVE = "cifar-10-python.tar.gz"
DEFAULT_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
DEFAULT_MD5 = "c58f30108f718f92721af3b95e74349a"
URL_ENV, MD5_ENV = "DIST_CIFAR_CIFAR10_URL", "DIST_CIFAR_CIFAR10_MD5"
# A compute node without a route out must fail in seconds, not wait for TCP's minutes.
SOCKET_TIMEOUT_S = 30.0
# ...and a mirror that trickles must fail too: a deadline for the whole transfer and a floor on
# its average rate (170 MB at 20 KB/s would take 2.4 hours)
DEADLINE_ENV, DEFAULT_DEADLINE_S = "DIST_CIFAR_DOWNLOAD_TIMEOUT_S", 1800.0
MIN_RATE_BYTES_S, RATE_GRACE_S = 20e3, 60.0


class DownloadFailed(RuntimeError):
    """The archive could not be fetched (no network, unreachable mirror)."""


class ChecksumMismatch(RuntimeError):
    """The archive arrived but is not the one expected."""


def source() -> tuple[str, str]:
    return os.environ.get(URL_ENV) or DEFAULT_URL, os.environ.get(MD5_ENV) or DEFAULT_MD5


def transfer_limits() -> tuple[float, float]:
    """(whole-transfer deadline in s, slowest average rate in bytes/s tolerated after a minute)."""
    return (float(os.environ.get(DEADLINE_ENV) or DEFAULT_DEADLINE_S), MIN_RATE_BYTES_S)


# The official archive is 170,498,071 bytes; a mirror that announces or sends far more is not it,
# and must not fill the disk first.
MAX_BYTES = 1 << 30


def fetch_to(url: str, f) -> None:
    """Stream `url` into the open binary file `f`. Each read waits at most SOCKET_TIMEOUT_S; the
    whole transfer is bounded by the deadline and a minimum rate, so a mirror trickling a byte
    every few seconds (which no per-read timeout catches) fails too; a short body is called
    truncated, a body over MAX_BYTES is cut."""
    deadline_s, min_rate = transfer_limits()
    started = time.monotonic()
    request = urllib.request.Request(url, headers={"User-Agent": "dist_cifar"})
    with urllib.request.urlopen(request, timeout=SOCKET_TIMEOUT_S) as response:
        total = int(response.headers.get("Content-Length") or 0)
        if total > MAX_BYTES:
            raise DownloadFailed(f"the server announces {total:,} bytes, more than the {MAX_BYTES:,} a CIFAR-10 "
                                 f"archive can be: not the archive")
        got = 0
        while True:
            chunk = response.read1(1 << 20)  # returns what has arrived: the checks below run on time
            if not chunk:
                break
            f.write(chunk)
            got += len(chunk)
            if got > MAX_BYTES:
                raise DownloadFailed(f"more than {MAX_BYTES:,} bytes arrived: not the CIFAR-10 archive")
            elapsed = time.monotonic() - started
            if elapsed > deadline_s:
                raise DownloadFailed(f"not finished after {deadline_s:.0f} s ({got:,} of {total or '?'} bytes; "
                                     f"{DEADLINE_ENV} raises the limit)")
            if elapsed > RATE_GRACE_S and got / elapsed < min_rate:
                raise DownloadFailed(f"too slow: {got / elapsed / 1e3:.1f} KB/s after {elapsed:.0f} s")
    if total and got != total:
        raise DownloadFailed(f"the transfer ended after {got:,} of {total:,} bytes (connection cut)")


def download_archive(data_dir: Path) -> Path:
    """Download into a hidden part file beside the final name; verify; rename. Returns the archive."""
    from torchvision.datasets.utils import calculate_md5

    url, md5 = source()
    data_dir.mkdir(parents=True, exist_ok=True)
    archive = data_dir / ARCHIVE
    remove_stale_parts(data_dir)
    # an unpredictable, exclusively created name: a link planted in a shared folder is never written through
    fd, part = files.create_temp(archive)
    print(f"[dist_cifar] no CIFAR-10 in {data_dir}: downloading {url} (--no-download to skip)", flush=True)
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                fetch_to(url, f)
                f.flush()
                os.fsync(f.fileno())
        except DownloadFailed:
            raise
        except Exception as exc:  # URLError, timeouts, HTTP errors: all mean "not fetched"
            raise DownloadFailed(f"{type(exc).__name__}: {str(exc)[:120]}") from None
        got = calculate_md5(part)
        if got != md5:
            raise ChecksumMismatch(f"{url} gave a file with MD5 {got}, expected {md5}")
        files.publish(part, archive)
        print(f"[dist_cifar] downloaded {archive} ({archive.stat().st_size:,} bytes, MD5 checked)", flush=True)
        return archive
    finally:
        part.unlink(missing_ok=True)


def remove_stale_parts(data_dir: Path) -> None:
    """Part files of downloads killed midway: this user's own, untouched for 10 minutes (a fresher
    one may be another node's download in progress); never a link, never another user's."""
    for stale in data_dir.glob(f"{files.TMP_PREFIX}{ARCHIVE}-*"):
        try:
            st = stale.lstat()
        except OSError:
            continue
        if stale.is_file() and not stale.is_symlink() and st.st_uid == os.getuid() and time.time() - st.st_mtime > 600:
            stale.unlink(missing_ok=True)
