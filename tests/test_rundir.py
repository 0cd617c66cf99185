"""dist_cifar/rundir.py: the out dir is locked, never clobbered, refused when unwritable, and restarted when only this run's own start is there."""
from __future__ import annotations

import pytest
import subprocess
import sys
import time

from conftest import base_env, one_line, read_jsonl, ROOT, run_train, smoke_args
from dist_cifar.config import make_config
from dist_cifar.rundir import default_out_dir


def test_one_run_per_out_dir_and_unique_default_names(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "dist_cifar.train", *smoke_args(out, ["--epochs", "200"])],
                             cwd=ROOT, env=base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (out / "metrics.jsonl").exists():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.2)
        line = one_line(run_train(smoke_args(out)))
        assert "in use by a running job" in line and f"pid {first.pid}" in line
    finally:
        first.kill()
        first.wait(timeout=30)
    epochs = [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")]
    assert epochs == sorted(set(epochs))  # only the first run wrote there
    cfg = make_config()
    assert len({default_out_dir(cfg) for _ in range(20)}) == 20  # same second, different names


@pytest.mark.quick
def test_unwritable_out_dir_fails_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker / "run", "/proc/dist_cifar_run"):
        proc = run_train(["--dataset", "cifar10", "--data-dir", str(tmp_path / "no_data"), "--out-dir", str(out)],
                         timeout=60)
        assert "--out-dir" in one_line(proc) and "CIFAR-10" not in proc.stderr  # before the data


def test_a_run_that_dies_before_its_first_checkpoint_restarts_with_the_same_command(tmp_path):
    """Cases 022/057/058: torchrun --max-restarts and a plain rerun were refused ('not empty and
    holds no checkpoint') after a crash in the first checkpoint interval."""
    from conftest import smoke_args, torchrun_cmd
    out = tmp_path / "elastic"
    args = smoke_args(out, ["--epochs", "2"])
    proc = subprocess.run(torchrun_cmd(2, args, ["--standalone", "--max-restarts=1"]), cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=base_env(DIST_CIFAR_FAULT="crash:rank=1:step=3:attempt=0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "injected crash" in proc.stderr and "starting it again" in proc.stdout
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1]
    single = tmp_path / "single"
    crashed = run_train(smoke_args(single, ["--epochs", "2"]), DIST_CIFAR_FAULT="crash:rank=0:step=2")
    assert crashed.returncode != 0 and (single / "config.json").exists()
    assert run_train(smoke_args(single, ["--epochs", "2"])).returncode == 0
    other = run_train(smoke_args(single, ["--epochs", "2", "--lr", "0.5"]))  # another run's folder stays refused
    assert other.returncode == 2


@pytest.mark.quick
def test_refuses_to_overwrite_out_dir(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    proc = run_train(smoke_args(out), timeout=120)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (out / "precious.txt").read_text() == "keep me" and not (out / "metrics.jsonl").exists()
    proc = run_train(smoke_args(out, ["--overwrite"]), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "precious.txt").exists()  # --overwrite replaces the run's files, not yours


@pytest.mark.quick
def test_a_too_long_out_dir_is_named_as_such_not_as_a_full_disk(tmp_path):
    """Minor item of reliability pass 3: ENAMETOOLONG was reported as 'free space'."""
    proc = run_train(smoke_args(tmp_path / ("x" * 300)))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "File name too long" in lines[0] and "shorter --out-dir" in lines[0] and "free space" not in lines[0]
