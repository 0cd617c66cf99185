"""Real sbatch jobs against the local SLURM cluster (slurm/local_cluster.sh; CI starts it).

Skipped with a reason when no cluster answers `sinfo`, unless DIST_CIFAR_REQUIRE_SLURM=1
(as in CI), where that is a failure."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import base_env, read_jsonl, ROOT


pytestmark = pytest.mark.slurm


def cluster_up() -> str:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo unavailable ({exc})"
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip()[:200]}"
    if not re.search(r"idle|mix|alloc", out.stdout):
        return f"no usable node (states: {out.stdout.split()})"
    return ""


@pytest.fixture(scope="module")
def slurm():
    problem = cluster_up()
    if problem:
        if os.environ.get("DIST_CIFAR_REQUIRE_SLURM") == "1":
            pytest.fail(f"DIST_CIFAR_REQUIRE_SLURM=1 but no SLURM cluster: {problem}")
        pytest.skip(f"no SLURM cluster: {problem} (run slurm/local_cluster.sh)")


def job_env(**extra):
    return base_env(PYTHON=sys.executable, DIST_CIFAR_ROOT=str(ROOT), **extra)


def sbatch(args: list[str], **env) -> str:
    out = subprocess.run(["sbatch", "--parsable", f"--chdir={ROOT}", *args], capture_output=True, text=True,
                         timeout=30, env=job_env(**env))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job_field(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=10).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else ""


def wait_done(job: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                                timeout=10).stdout.split()
        if not states:
            return job_field(job, "JobState")
        time.sleep(1)
    subprocess.run(["scancel", job], timeout=10)
    pytest.fail(f"job {job} still {states} after {timeout}s")


def diagnosis(log) -> str:
    """A failed job's log without the long lists of loaded modules a fatal error prints."""
    lines = [l for l in log.read_text().splitlines() if l.count(",") < 10]
    return "\n".join(lines[-80:])


def test_two_process_training_job(slurm, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(["--cpus-per-task=2", f"--output={log}", "slurm/train.sbatch", "--dataset", "synthetic",
                  "--synthetic-size", "256", "--batch-size", "32", "--epochs", "2", "--out-dir", str(out)],
                 NPROC_PER_NODE="2")
    assert wait_done(job, 240) == "COMPLETED", diagnosis(log)
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["backend_resolved"] == "gloo"
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1]
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] > 10
    assert f"job {job} (restart 0)" in log.read_text() and "x 2 process(es)" in log.read_text()


def test_usr1_checkpoints_requeues_and_resumes(slurm, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(["--cpus-per-task=2", f"--output={log}", "slurm/train.sbatch", "--dataset", "synthetic",
                  "--synthetic-size", "4096", "--batch-size", "32", "--epochs", "4", "--out-dir", str(out)],
                 NPROC_PER_NODE="2")
    deadline = time.monotonic() + 180
    while "epoch   0" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "first epoch never finished"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=10)
    deadline = time.monotonic() + 90
    while job_field(job, "Restarts") in ("", "0") or job_field(job, "JobState") != "PENDING":
        assert time.monotonic() < deadline, "job was not requeued"
        time.sleep(0.5)
    # SLURM holds a requeued job ~2 min (BeginTime) so the old steps can finish; skipping that wait
    # is only safe once slurmd's step daemons of the first run are gone (else: credential revoked)
    while subprocess.run(["pgrep", "-f", rf"slurmstepd: \[{job}\."], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the first run's job steps never ended"
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], timeout=10)
    assert wait_done(job, 300) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert "got USR1" in text and "requeueing" in text and "(restart 1)" in text and "resumed from" in text
    stops = re.findall(r"rank (\d): preempted \(SIGTERM\), stopped at (epoch \d+ step \d+)", text)
    assert sorted(r for r, _ in stops) == ["0", "1"] and len({s for _, s in stops}) == 1
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2, 3]


def test_ablation_array_job_runs_every_variant(slurm, tmp_path):
    variants = tmp_path / "variants.txt"
    common = "--dataset synthetic --synthetic-size 256 --batch-size 32 --epochs 1 --quiet"
    # a quoted argument holding shell syntax: it must arrive verbatim, never be evaluated
    odd = f"'x $(touch {tmp_path}/pwned) y'"
    variants.write_text("".join(f"{common} {flags} --out-dir {tmp_path / name}\n" for name, flags in
                                [("bn", f"--wandb-name {odd}"), ("no_bn", "--no-batchnorm"), ("no_drop", "--no-dropout")]))
    sbatch(["--array=0-2", f"--output={tmp_path}/task-%a.out", "slurm/ablations.sbatch", str(variants)])
    deadline = time.monotonic() + 300
    for name in ("bn", "no_bn", "no_drop"):
        while not (tmp_path / name / "summary.json").exists():
            assert time.monotonic() < deadline, (tmp_path / "task-0.out").read_text()[-2000:]
            time.sleep(1)
    configs = {n: json.loads((tmp_path / n / "config.json").read_text()) for n in ("bn", "no_bn", "no_drop")}
    assert configs["no_bn"]["batchnorm"] is False and configs["no_drop"]["dropout"] is False
    assert all(c["world_size"] == 1 for c in configs.values())
    assert configs["bn"]["wandb_name"] == f"x $(touch {tmp_path}/pwned) y" and not (tmp_path / "pwned").exists()


def test_ablate_slurm_builds_and_runs_an_array(slurm, tmp_path):
    out = tmp_path / "abl"
    ablate_env = {k: v for k, v in job_env().items() if k not in ("DIST_CIFAR_ROOT", "PYTHON")}
    # from a folder outside the checkout, with the README's space-separated --sbatch-args form: the
    # array script comes from the package, the tasks run in this folder with this interpreter
    proc = subprocess.run([sys.executable, "-m", "dist_cifar.ablate", "dropout", "--dataset", "synthetic",
                           "--synthetic-size", "128", "--epochs", "1", "--out", "abl", "--slurm", "--wait",
                           "--slurm-timeout", "300", "--sbatch-args", "--time=10"], cwd=tmp_path, env=ablate_env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--array=0-1" in proc.stdout and "--time=10" in proc.stdout and f"--chdir={tmp_path}" in proc.stdout
    folder = out / "dropout-e1"  # --epochs 1 is a recipe override: its own folder
    lines = (folder / "variants.txt").read_text().splitlines()
    assert len(lines) == 2 and "--no-dropout" in lines[1] and "--no-dropout" not in lines[0]
    for name in ("with_dropout", "without_dropout"):
        assert (folder / name / "summary.json").exists()
    assert len(list(folder.glob("slurm-*_*.out"))) == 2
    assert "without_dropout" in (folder / "report.md").read_text()
