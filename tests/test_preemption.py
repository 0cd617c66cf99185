"""dist_cifar/preemption.py and the signal paths: SIGUSR1/SIGTERM checkpoint and exit 75, kills during writes, elastic restarts, torchrun killed."""
from __future__ import annotations

import pytest
import json
import signal
import subprocess
import sys
import time

from conftest import base_env, read_jsonl, ROOT, run_train, smoke_args, torchrun_cmd
from dist_cifar import checkpoint as ckpt


def signalled_after_epoch_0(args: list[str], sig: int) -> tuple[int, str]:
    """The trainer as its own process, sent `sig` once its first epoch line is out; (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "dist_cifar.train", *args], cwd=ROOT, env=base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("epoch   0"):
                proc.send_signal(sig)
                break
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    return code, proc.stderr.read()


def test_ctrl_c_is_a_stop_and_twice_stops_at_once(tmp_path):
    """Ctrl-C was a KeyboardInterrupt traceback with no checkpoint. Now the first SIGINT is a
    preemption (checkpoint, exit 75, one line); a second one while the first stop is still being
    handled ends at once with exit 130 and one line, the newest committed checkpoint kept."""
    out = tmp_path / "run"
    args = ["--dataset", "synthetic", "--synthetic-size", "4096", "--batch-size", "32", "--epochs", "4",
            "--out-dir", str(out), "--wandb", "off"]
    code, err = signalled_after_epoch_0(args, signal.SIGINT)
    assert code == 75 and "preempted (SIGINT)" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    from dist_cifar import preemption
    flag = preemption.PreemptionFlag()
    flag._handle(signal.SIGINT, None)
    assert flag()  # the first: a stop
    with pytest.raises(preemption.StopNow):  # the second: out at once (train.main: exit 130, one line)
        flag._handle(signal.SIGINT, None)


def test_elastic_restart_resumes_and_finishes(tmp_path):
    out = tmp_path / "run"
    args = smoke_args(out, ["--epochs", "3", "--checkpoint-every-steps", "2", "--synthetic-size", "512"])
    proc = subprocess.run(torchrun_cmd(2, args, ["--standalone", "--max-restarts=1"]), cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=base_env(DIST_CIFAR_FAULT="crash:rank=1:step=13:attempt=0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "injected crash" in proc.stderr  # it did crash on the first attempt
    assert "resumed from" in proc.stdout
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2]
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 3


@pytest.mark.quick
def test_sigusr1_preempts_single_process_then_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", "synthetic", "--synthetic-size", "4096", "--batch-size", "32", "--epochs", "4",
            "--out-dir", str(out)]
    code, err = signalled_after_epoch_0(args, signal.SIGUSR1)
    assert code == 75 and "preempted (SIGUSR1)" in err
    done = run_train(args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2, 3]


def test_sigkill_while_a_background_write_is_in_flight(tmp_path):
    """The epoch-2 checkpoint's write stalls between fsync and rename (slow_save); the process
    is SIGKILLed meanwhile. The epoch-1 checkpoint stays committed and loadable, --resume auto
    picks it, and the rerun finishes with every epoch logged once."""
    out = tmp_path / "run"
    args = smoke_args(out, ["--epochs", "4", "--keep-last", "3"])  # 8 steps/epoch: epoch ends at 8, 16, ...
    proc = subprocess.Popen([sys.executable, "-m", "dist_cifar.train", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=base_env(DIST_CIFAR_FAULT="slow_save:step=16:seconds=300"))
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(".tmp-ckpt-e0002-*")):  # the stalled write has its bytes down
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read().decode()[-2000:]
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
    assert [p.name for p in ckpt.committed(out)] == ["ckpt-e0001-s0000000.pt"]
    assert ckpt.find_latest(out) == out / "ckpt-e0001-s0000000.pt"
    assert ckpt.load(out / "ckpt-e0001-s0000000.pt")["run"]["epoch"] == 1
    done = run_train(args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout and "ckpt-e0001-s0000000.pt at epoch 1 step 0" in done.stdout
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [0, 1, 2, 3]
    assert all(m["checkpoint_blocked_s"] >= 0 and m["checkpoint_write_s"] >= 0 for m in metrics[1:])
    assert not list(out.glob(".tmp-*"))  # the torn write was cleaned up by a later commit
    assert ckpt.committed(out)[-1].name == "ckpt-e0004-s0000000.pt" and ckpt.verify(ckpt.committed(out)[-1])


def test_preemption_during_a_write_keeps_the_write_in_flight(tmp_path):
    """Case 039: SIGTERM while a checkpoint write was in flight: the preemption save waited for it,
    then started a second one, and torchrun's kill 30 s after the signal lost both."""
    from conftest import smoke_args
    from dist_cifar import checkpoint as ckpt
    out = tmp_path / "run"
    args = smoke_args(out, ["--epochs", "2", "--synthetic-size", "512", "--checkpoint-every-steps", "2"])
    stop = run_train(args, DIST_CIFAR_FAULT="slow_save:step=4:seconds=6;preempt:rank=0:step=5")
    assert stop.returncode == 75, stop.stderr[-2000:]
    assert "the checkpoint in flight (ckpt-e0000-s0000004.pt) was finished and kept" in stop.stderr
    assert ckpt.committed(out)[-1].name == "ckpt-e0000-s0000004.pt"
    again = run_train(args)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-2000:]


def test_sigterm_during_the_final_evaluation_exits_75_promptly(tmp_path):
    """Case 151: SIGTERM during the final evaluation was ignored (the flag was read only in the
    step loop) and SIGKILL came 30 s later with no summary."""
    import signal
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dist_cifar.train", "--dataset", "synthetic", "--synthetic-size", "24000",
           "--model", "small_cnn", "--batch-size", "32", "--steps-per-epoch", "2", "--epochs", "1",
           "--eval-batch-size", "32", "--out-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch   0"):
            break
    time.sleep(0.5)  # inside the evaluation of the 24,000 training images
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert time.monotonic() - signalled < 25
    assert "preempted during the final evaluation" in err and not (out / "summary.json").exists()


def test_workers_stop_with_a_checkpoint_when_torchrun_is_killed(tmp_path):
    """Cases 064/065: SIGKILL to torchrun left its workers (in their own sessions) training on to
    the end. Each worker now notices its launcher is gone at the next agreement and stops there
    with a checkpoint, as on preemption."""
    import signal
    from conftest import torchrun_cmd
    from dist_cifar import checkpoint as ckpt
    out = tmp_path / "run"
    args = ["--dataset", "synthetic", "--synthetic-size", "4000", "--model", "small_cnn", "--batch-size", "16",
            "--epochs", "30", "--out-dir", str(out), "--dist-timeout", "60"]
    log = open(tmp_path / "log", "w")
    launcher = subprocess.Popen(torchrun_cmd(2, args), cwd=ROOT, env=base_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ckpt.committed(out):
        time.sleep(0.5)
    assert ckpt.committed(out), (tmp_path / "log").read_text()[-2000:]
    launcher.send_signal(signal.SIGKILL)
    launcher.wait(timeout=30)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        alive = subprocess.run(["pgrep", "-f", f"dist_cifar.train.*{out}"], capture_output=True, text=True).stdout.split()
        if not alive:
            break
        time.sleep(1)
    log.close()
    assert not alive, (tmp_path / "log").read_text()[-2000:]
    assert "preempted (torchrun died)" in (tmp_path / "log").read_text()
    last = ckpt.committed(out)[-1].name
    assert last != ckpt.checkpoint_name(30, 0) and not last.endswith("-s0000000.pt")  # early, mid-epoch
