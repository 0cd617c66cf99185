"""Shared test helpers: run the real trainer as a subprocess, alone or under real torchrun."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import pickle
import socket
import subprocess
import tarfile
import sys
import threading
from pathlib import Path

import numpy as np
import pytest


ROOT = Path(__file__).resolve().parents[1]
# This team's machines keep the real CIFAR-10 (JPEG) beside the checkout; the product never looks
# there, and the tests only through `real_cifar` below
TEAM_TARBALL = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
OFFLINE_URL = "http://127.0.0.1:9/cifar-10-python.tar.gz"
os.environ["DIST_CIFAR_CIFAR10_URL"] = OFFLINE_URL  # in-process calls too
os.environ.setdefault("WANDB_MODE", "disabled")  # W&B is on by default; tests that want it say so


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE=env.get("WANDB_MODE", "disabled"),
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    env.pop("DIST_CIFAR_FAULT", None)
    # No test reaches the internet: the CIFAR-10 download goes to a loopback port nothing listens on
    # (refused at once) unless a test serves an archive itself.
    env.update(DIST_CIFAR_CIFAR10_URL=OFFLINE_URL)
    env.pop("DIST_CIFAR_CIFAR10_MD5", None)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(args: list[str], timeout: float = 240, env: dict | None = None, *, process: bool = False,
              **extra_env) -> subprocess.CompletedProcess:
    """`python -m dist_cifar.train ARGS`, bounded. It runs inside this process (the real entry
    point, `dist_cifar.train.main`, with this environment, cwd and captured output) unless the
    process itself is part of what is checked: `process=True`, a custom `env` (a PATH with a fake
    tool), a variable torch reads at import (TORCH_LOGS), or W&B (its service outlives a run). A new interpreter costs ~3 s of imports a run."""
    wandb = [a for i, a in enumerate(args) if i and args[i - 1] == "--wandb"] or ["auto"]
    read_at_import = [key for key in extra_env if not key.startswith(("DIST_CIFAR_", "WANDB_"))]  # TORCH_LOGS, ...
    if process or env is not None or read_at_import or wandb[-1] not in ("off", "auto") or \
            extra_env.get("WANDB_MODE", "disabled") not in ("disabled", "off"):
        return subprocess.run([sys.executable, "-m", "dist_cifar.train", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout, env=env or base_env(**extra_env))
    return run_in_process(args, timeout, base_env(**extra_env))


def run_in_process(args: list[str], timeout: float, env: dict[str, str]) -> subprocess.CompletedProcess:
    """dist_cifar.train.main(args) here, as `python -m dist_cifar.train` would run it: the same
    environment and cwd (restored after), stdout/stderr captured, an escaping exception a
    traceback on stderr with exit 1. A hang past `timeout` ends the test session with every
    thread's traceback (faulthandler), never a silent wait."""
    import contextlib
    import faulthandler
    import io
    import traceback
    import warnings
    from dist_cifar.train import main
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    faulthandler.dump_traceback_later(timeout, exit=True)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unable to enable fault handler")  # torchrun's @record
            try:
                code = main(list(args))
            except SystemExit as exc:  # --help, --version
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        faulthandler.cancel_dump_traceback_later()
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess([sys.executable, "-m", "dist_cifar.train", *args], code,
                                       out.getvalue(), err.getvalue())


def torchrun_cmd(nproc: int, args: list[str], launcher: list[str] | None = None, module: str = "dist_cifar.train") -> list[str]:
    launcher = launcher if launcher is not None else ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}",
            "-m", module, *args]


def run_torchrun(nproc: int, args: list[str], timeout: float = 300, launcher: list[str] | None = None,
                 module: str = "dist_cifar.train", **extra_env) -> subprocess.CompletedProcess:
    """A real torchrun job on gloo, CPU; bounded."""
    return subprocess.run(torchrun_cmd(nproc, args, launcher, module), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=base_env(**extra_env))


def torchrun_jobs(nproc: int, jobs: list[dict], work: Path, timeout: float = 600) -> dict[str, dict]:
    """Several trainer jobs in ONE torchrun launch (tests/jobs_worker.py): each job is
    {"name", "argv", "env"}, run one after another through the real entry point on every rank,
    "{work}" in argv replaced by `work`. Returns name -> {"ranks": [{code, stdout, stderr,
    seconds} per rank]}. A launch costs ~5 s on 2 cores (interpreters, imports, rendezvous), a
    small job ~1 s: tests that need many small distributed runs share one launch."""
    jobs = [dict(job, argv=[a.replace("{work}", str(work)) for a in job["argv"]]) for job in jobs]
    (work / "jobs.json").write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "jobs_worker.py"), str(work / "jobs.json"), str(work)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=base_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_rank = [json.loads((work / f"rank{r}.json").read_text()) for r in range(nproc)]
    return {job["name"]: {"ranks": [ranks[i] for ranks in by_rank]} for i, job in enumerate(jobs)}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_official_cifar(folder: Path, per_batch: int = 20, n_test: int = 20, seed: int = 0, zero: bool = False) -> Path:
    """Write a small CIFAR-10 in the exact official layout: cifar-10-batches-py/ with
    data_batch_1..5 and test_batch (pickled dicts with bytes keys b'data' (N, 3072) uint8 and
    b'labels' list) and batches.meta (b'label_names'). `zero`: every image black, every label 0
    (what an attacker plants)."""
    rng = np.random.default_rng(seed)
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        batch = {b"batch_label": f"{name} of 5".encode(), b"labels": [0] * n if zero else rng.integers(0, 10, n).tolist(),
                 b"data": np.zeros((n, 3072), np.uint8) if zero else rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {b"label_names": [c.encode() for c in ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                                  "frog", "horse", "ship", "truck")],
            b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    with open(root / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return root


def make_tree(root: Path, per_class: int = 3, classes=("cat", "airplane", "dog")) -> Path:
    """An image-folder dataset: train/<class>/*.png and test/<class>/*.png, random pixels."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i:04d}.png")
    return root


def write_image_tarball(path: Path, per_class: int = 3, classes=("cat", "airplane", "dog")) -> Path:
    """The same tree packed as a .tar.gz (the shape of the JPEG CIFAR-10 tarball)."""
    import tarfile
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        tree = make_tree(Path(tmp) / "cifar", per_class, classes)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w:gz") as tar:
            tar.add(tree, arcname="cifar")
    return path


@pytest.fixture
def official_cifar(tmp_path) -> Path:
    write_official_cifar(tmp_path / "data")
    return tmp_path / "data"


def smoke_args(out: Path, extra: list[str] = ()) -> list[str]:
    """A seconds-long synthetic run into `out`; `extra` flags win (they come last)."""
    return ["--dataset", "synthetic", "--synthetic-size", "256", "--batch-size", "32", "--epochs", "1",
            "--model", "small_cnn", "--out-dir", str(out), "--eval-batch-size", "64", *extra]


def one_line(proc, code=2) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def official_archive(tmp_path, name="good") -> Path:
    src = write_official_cifar(tmp_path / f"src_{name}")
    archive = tmp_path / f"{name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    return archive


def official_archive_in_data(tmp_path: Path) -> Path:
    write_official_cifar(tmp_path / "src")
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive


def find_real_cifar() -> Path | None:
    """The real CIFAR-10 image tarball: $DIST_CIFAR_DATA, else one in the checkout's data/ (where
    the README puts it), else this team's copy beside the checkout."""
    from dist_cifar.data import local_image_set
    named = os.environ.get("DIST_CIFAR_DATA", "")
    if named and Path(named).is_file():
        return Path(named)
    in_data = local_image_set(ROOT / "data") if (ROOT / "data").is_dir() else None
    if in_data is not None and Path(in_data).is_file():
        return Path(in_data)
    return TEAM_TARBALL if TEAM_TARBALL.is_file() else None


@pytest.fixture(scope="session")
def real_cifar() -> Path:
    """The one way a test finds the real CIFAR-10 (skips, saying where to put it, when there is none)."""
    found = find_real_cifar()
    if found is None:
        pytest.skip("no real CIFAR-10: put cifar10-jpeg.tar.gz in data/ or name it with DIST_CIFAR_DATA")
    return found


@pytest.fixture
def cifar_mirror(tmp_path):
    """An archive in the official format (py2-style pickles under cifar-10-batches-py/) served by
    http.server on 127.0.0.1; yields (url, md5)."""
    site = tmp_path / "site"
    site.mkdir()
    src = write_official_cifar(tmp_path / "src", per_batch=40, n_test=40)
    archive = site / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield (f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz",
               hashlib.md5(archive.read_bytes()).hexdigest())
    finally:
        server.shutdown()
