"""Shared by the benchmark scripts: provenance, JSON output, tables, running the real trainer."""
from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_TARBALL = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
sys.path.insert(0, str(ROOT))
from dist_cifar.files import read_jsonl  # noqa: E402


def provenance(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Where a number came from: host, versions (GPU, driver, CUDA, cuDNN, NCCL, torch), commit,
    command, date. The commit comes from git, else DIST_CIFAR_GIT_COMMIT (a tree sent without .git)."""
    import torch
    cuda = torch.cuda.is_available()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=5).stdout.strip()
    except Exception:
        commit = ""
    driver = ""
    if cuda:
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.split("\n")[0].strip()
        except Exception:
            driver = "unknown"
    nccl = ""
    if cuda:
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:
            nccl = "unknown"
    return {
        "host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
        "torch_version": torch.__version__, "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpus": torch.cuda.device_count() if cuda else 0, "cpu_count": os.cpu_count(),
        "driver": driver or None, "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None, "nccl": nccl or None,
        "command": " ".join([Path(sys.argv[0]).name if argv is None else "", *(sys.argv[1:] if argv is None else argv)]).strip(),
        "git_commit": commit or os.environ.get("DIST_CIFAR_GIT_COMMIT", "") or "unknown",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def data_args(dataset: str, data_dir: str) -> list[str]:
    """--dataset auto picks the shared real CIFAR-10 when it is there, else synthetic."""
    if dataset == "auto":
        if SHARED_TARBALL.exists():
            return ["--dataset", "imagefolder", "--data-dir", str(SHARED_TARBALL)]
        return ["--dataset", "synthetic", "--synthetic-size", "8192"]
    return ["--dataset", dataset, "--data-dir", data_dir]


def run_trainer(args: list[str], out_dir: Path, nproc: int = 1, env: dict | None = None,
                timeout: float = 3600) -> list[dict]:
    """Run the real trainer (under torchrun when nproc > 1); return its metrics.jsonl records."""
    launcher = [sys.executable, "-m", "dist_cifar.train"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "dist_cifar.train"]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    code, _, err, timed_out = run_bounded(
        [*launcher, *args, "--out-dir", str(out_dir), "--overwrite", "--quiet", "--checkpoint-every", "0",
         "--checkpoint-interval-min", "0", "--wandb", "off"], timeout=timeout, env=full_env)
    if timed_out:
        raise RuntimeError(f"trainer did not finish in {timeout:g} s")
    if code != 0:
        raise RuntimeError(f"trainer failed ({code}): {err[-2000:]}")
    return read_jsonl(out_dir / "metrics.jsonl")


def single_rank_env() -> dict[str, str]:
    """A one-rank process group without torchrun (what torchrun --nproc_per_node=1 sets up), so a
    time-boxed stage has no launcher whose workers could outlive it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def run_bounded(cmd: list[str], *, timeout: float, env: dict | None = None, grace: float = 45.0) -> tuple[int, str, str, bool]:
    """Run `cmd` for at most `timeout` s; past that, SIGTERM it and give it `grace` s to stop before
    SIGKILL. torchrun forwards SIGTERM and kills its workers after its own 30 s, so a grace longer
    than that leaves none running (subprocess.run(timeout=) SIGKILLs torchrun at once and orphans
    its workers, which sit in their own sessions). Returns (exit code, stdout, stderr, timed out)."""
    import signal
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err, False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return proc.returncode, out, err, True
