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
RESULTS = ROOT / "benchmarks" / "results"  # the committed results: written only with --publish
RUNS = ROOT / "runs" / "benchmarks"  # where a plain rerun writes
sys.path.insert(0, str(ROOT))
from dist_cifar import files  # noqa: E402
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
        **({"suite_id": os.environ["DIST_CIFAR_SUITE_ID"]} if os.environ.get("DIST_CIFAR_SUITE_ID") else {}),
    }


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    files.make_dirs(path.parent)
    files.atomic_write_json(path, payload)
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


def add_output_flags(parser, default_name: str) -> None:
    parser.add_argument("--out", default="", help=f"result path (default runs/benchmarks/{default_name})")
    parser.add_argument("--publish", action="store_true",
                        help="write to benchmarks/results/, replacing the committed result (default: runs/benchmarks/)")


def output_path(args, name: str) -> Path:
    """--out, else benchmarks/results/NAME with --publish, else runs/benchmarks/NAME: a plain rerun
    never replaces a committed result."""
    return Path(args.out) if args.out else (RESULTS if args.publish else RUNS) / name


def local_cifar() -> list[str]:
    """The real CIFAR-10 in this checkout, as trainer flags: $DIST_CIFAR_DATA (an image tarball or
    folder), data/cifar-10-batches-py, or an image tarball in data/; [] when there is none."""
    from dist_cifar.data import local_image_set
    named, data = os.environ.get("DIST_CIFAR_DATA", ""), ROOT / "data"
    if named and Path(named).exists():
        return ["--dataset", "imagefolder", "--data-dir", named]
    if (data / "cifar-10-batches-py").is_dir() or (data / "cifar-10-python.tar.gz").is_file():
        return ["--dataset", "cifar10", "--data-dir", str(data)]
    images = local_image_set(data)
    return ["--dataset", "imagefolder", "--data-dir", str(images)] if images else []


def data_args(dataset: str, data_dir: str, synthetic_size: int = 8192) -> list[str]:
    """--dataset auto: the local real CIFAR-10 (`local_cifar`), else synthetic data; the table
    and the JSON say which (`data_label`)."""
    if dataset == "auto":
        return local_cifar() or ["--dataset", "synthetic", "--synthetic-size", str(synthetic_size)]
    return ["--dataset", dataset, "--data-dir", data_dir]


def load_data(dataset: str = "auto", data_dir: str = "", synthetic_size: int = 20_000):
    """The same choice, loaded in this process (for the benchmarks that time pieces, not the trainer)."""
    from dist_cifar.data import load_source
    flags = data_args(dataset, data_dir, synthetic_size)
    if flags[1] == "synthetic":
        return load_source("synthetic", "", synthetic_size=int(flags[3]))
    return load_source(flags[1], flags[3])


def data_label(flags_or_source) -> str:
    """One line for a table's header: which data the numbers are on."""
    if isinstance(flags_or_source, str):
        text = flags_or_source
    else:
        text = " ".join(flags_or_source[1:4:2]) if flags_or_source else "?"
    return f"data: {text}" + ("  (SYNTHETIC: no real CIFAR-10 found; set DIST_CIFAR_DATA or put it in data/)"
                              if "synthetic" in text else "")


def busy_warning() -> str | None:
    """Before a timing run: a machine already busy makes every figure a measure of the others' load."""
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cpus:
        return (f"WARNING: the machine was busy when this run started (1-minute load {load:.1f} on {cpus} CPUs): "
                f"its figures are not comparable; rerun on an idle machine")
    return None


def spread_warning(name: str, samples: Sequence[float], limit: float = 0.15) -> str | None:
    """Repeats of one measurement that disagree by more than `limit` of their median."""
    import statistics
    if len(samples) < 2:
        return None
    median = statistics.median(samples)
    spread = (max(samples) - min(samples)) / median if median else 0.0
    if spread > limit:
        return (f"WARNING: {name}: repeats differ by {100 * spread:.0f}% of their median (over {100 * limit:.0f}%): "
                f"the machine's load moved under this run; the figure is not trustworthy")
    return None


def report_warnings(warnings: Sequence[str | None]) -> list[str]:
    """Print the warnings (after the table) and return them for the JSON."""
    kept = [w for w in warnings if w]
    for w in kept:
        print(w, flush=True)
    return kept


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
