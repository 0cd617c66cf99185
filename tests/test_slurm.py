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
from dist_cifar import wandb_offline as wandb_reader


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


# One recipe for the uninterrupted job and the preempted one, so that their epochs compare: 100
# training steps per epoch (a window a stop lands in), a small validation split, and a final
# evaluation of ~23,500 training images (a window the second stop lands in).
RECIPE = ["--dataset", "synthetic", "--synthetic-size", "24000", "--val-size", "512", "--steps-per-epoch", "100",
          "--batch-size", "32", "--eval-batch-size", "32", "--epochs", "4", "--wandb", "offline"]


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("slurm_ref")
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(["--cpus-per-task=2", f"--output={log}", "slurm/train.sbatch", *RECIPE, "--out-dir", str(out)],
                 NPROC_PER_NODE="2", WANDB_MODE="offline")
    return job, out, log, wait_done(job, 300)


def test_two_process_training_job(uninterrupted):
    job, out, log, state = uninterrupted
    assert state == "COMPLETED", diagnosis(log)
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["backend_resolved"] == "gloo"
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["best_test_accuracy"] > 10
    assert f"job {job} (restart 0)" in log.read_text() and "x 2 process(es)" in log.read_text()


def wait_for(log, text: str, after: int, timeout: float) -> int:
    """Until `text` appears in the log past offset `after`; returns where it ends."""
    deadline = time.monotonic() + timeout
    while True:
        body = log.read_text() if log.exists() else ""
        at = body.find(text, after)
        if at >= 0:
            return at + len(text)
        assert time.monotonic() < deadline, f"{text!r} never came:\n{body[-3000:]}"
        time.sleep(0.2)


def requeued(job: str, restarts: int, log) -> None:
    """Wait until the job is requeued for the `restarts`-th time, then let it start at once."""
    deadline = time.monotonic() + 90
    while job_field(job, "Restarts") != str(restarts) or job_field(job, "JobState") != "PENDING":
        assert time.monotonic() < deadline, f"job was not requeued ({job_field(job, 'JobState')}):\n{diagnosis(log)}"
        time.sleep(0.5)
    # SLURM holds a requeued job ~2 min (BeginTime) so the old steps can finish; skipping that wait
    # is only safe once slurmd's step daemons of the first run are gone (else: credential revoked)
    while subprocess.run(["pgrep", "-f", rf"slurmstepd: \[{job}\."], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the previous run's job steps never ended"
        time.sleep(0.5)
    # slurmd revoked the previous run's credential with a one-second clock: a start within the same
    # second is "Job credential revoked" and the job ends FAILED (seen once); SLURM's own hold is ~2 min
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], timeout=10)


def test_preempted_twice_keeps_every_record(uninterrupted, tmp_path):
    """Preempted by SLURM's warning signal mid-epoch, then again in the final evaluation: each step
    exits 75 and is requeued, the job ends COMPLETED, metrics.jsonl equals the uninterrupted job's,
    and the W&B offline folders hold exactly one row per epoch with the same values (W&B's
    service is not killed by the stop)."""
    _, ref_out, _, ref_state = uninterrupted
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(["--cpus-per-task=2", f"--output={log}", "slurm/train.sbatch", *RECIPE, "--out-dir", str(out)],
                 NPROC_PER_NODE="2", WANDB_MODE="offline")
    seen = wait_for(log, "epoch   0", 0, 180)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=10)
    requeued(job, 1, log)
    seen = wait_for(log, "(restart 1)", seen, 120)
    seen = wait_for(log, "epoch   3", seen, 180)
    time.sleep(1.0)  # into the final evaluation of the training split
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=10)
    requeued(job, 2, log)
    assert wait_done(job, 300) == "COMPLETED", diagnosis(log)
    text = log.read_text()
    assert "got USR1" in text and "(restart 2)" in text and "Traceback" not in text, diagnosis(log)
    assert re.search(r"preempted \(SIGTERM\), stopped at epoch 1 step [1-9]\d* on all 2 ranks", text), diagnosis(log)
    assert "preempted during the final evaluation" in text, diagnosis(log)
    assert text.count("the workers checkpointed and exited 75; requeueing") == 2, diagnosis(log)
    assert ref_state == "COMPLETED"
    ref, rows = read_jsonl(ref_out / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    for key in ("train_loss", "train_accuracy", "val_loss"):
        assert max(abs(a[key] - b[key]) for a, b in zip(ref, rows)) <= 1e-6, key
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    folders = wandb_reader.run_files(out, run_id)
    assert len(folders) == 3, folders
    held = [wandb_reader.history(path) for path in folders]
    logged = [row for history in held for row in wandb_reader.epoch_rows(history)]
    assert sorted(row["epoch"] for row in logged) == [0, 1, 2, 3], logged
    for row in logged:
        assert row["train_loss"] == rows[row["epoch"]]["train_loss"]
        assert row["val_loss"] == rows[row["epoch"]]["val_loss"]
    # per-step rows: the steps redone after the mid-epoch stop are neither kept twice in the file
    # nor sent twice to W&B
    steps = [r["global_step"] for r in read_jsonl(out / "step_metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == rows[-1]["steps"] * 4, steps
    sent = [r["global_step"] for history in held for r in wandb_reader.step_rows(history)]
    assert len(sent) == len(set(sent)) and set(sent) <= set(steps), (sent, steps)


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
