"""Checkpoints, exact resume, elastic restarts, stalls, NaN guard, preemption: real processes."""
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, base_env, read_jsonl, run_torchrun, run_train, smoke_args, torchrun_cmd
from dist_cifar import checkpoint as ckpt
from dist_cifar import files

EXACT = ["--dataset", "synthetic", "--synthetic-size", "512", "--batch-size", "32", "--epochs", "2",
         "--augment", "--record-step-losses", "--quiet"]


def final_model(out):
    return torch.load(ckpt.committed(out)[-1], weights_only=True)["model"]


def test_atomic_save_survives_a_crash_midway(tmp_path, monkeypatch):
    first = ckpt.save(tmp_path, {"format": ckpt.FORMAT, "w": torch.ones(3)}, 1, 0, keep_last=3)

    def dying_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(tmp_path, {"format": ckpt.FORMAT, "w": torch.zeros(3)}, 2, 0, keep_last=3)
    monkeypatch.undo()
    assert list(tmp_path.glob(".tmp-ckpt-*"))  # the torn temp file is there...
    assert ckpt.find_latest(tmp_path) == first  # ...and ignored
    assert torch.equal(ckpt.load(first)["w"], torch.ones(3))
    # a renamed file whose commit marker never got written does not count either
    (tmp_path / ckpt.checkpoint_name(3, 0)).write_bytes(b"no marker")
    # nor one whose bytes changed after commit
    second = ckpt.save(tmp_path, {"format": ckpt.FORMAT, "w": torch.full((3,), 2.0)}, 2, 5, keep_last=3)
    assert ckpt.find_latest(tmp_path) == second
    second.write_bytes(second.read_bytes()[:-10])
    assert ckpt.find_latest(tmp_path) == first
    ckpt.save(tmp_path, {"format": ckpt.FORMAT, "w": torch.ones(1)}, 4, 0, keep_last=3)
    assert not [p for p in tmp_path.glob(".tmp-ckpt-*")]  # strays pruned on the next save


def test_keep_last_prunes_only_after_commit(tmp_path):
    for epoch in range(1, 6):
        ckpt.save(tmp_path, {"format": ckpt.FORMAT, "e": epoch}, epoch, 0, keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt-e0004-s0000000.pt", "ckpt-e0004-s0000000.pt.commit",
                     "ckpt-e0005-s0000000.pt", "ckpt-e0005-s0000000.pt.commit"]
    assert ckpt.load(ckpt.find_latest(tmp_path))["e"] == 5


def test_exact_resume_single_process_bit_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_train([*EXACT, "--out-dir", str(a)]).returncode == 0
    # interrupted mid-epoch 1 (step 21 of 32), then resumed by the same command
    stop = run_train([*EXACT, "--out-dir", str(b)], DIST_CIFAR_FAULT="preempt:rank=0:step=21")
    assert stop.returncode == 75, stop.stderr[-2000:]
    assert ckpt.committed(b)[-1].name == "ckpt-e0001-s0000006.pt"
    again = run_train([*EXACT, "--out-dir", str(b)])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout
    assert (a / "step_losses.jsonl").read_text() == (b / "step_losses.jsonl").read_text()
    assert len(read_jsonl(b / "step_losses.jsonl")) == 32
    ma, mb = final_model(a), final_model(b)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["epoch"] for r in rb] == [0, 1]
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]


def test_exact_resume_two_processes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_torchrun(2, [*EXACT, "--out-dir", str(a)]).returncode == 0
    stop = run_torchrun(2, [*EXACT, "--out-dir", str(b)], DIST_CIFAR_FAULT="preempt:rank=1:step=11")
    assert stop.returncode != 0
    # both ranks stopped at the same step, one agreed checkpoint
    stops = re.findall(r"rank (\d): preempted \([^)]*\), stopped at (epoch \d+ step \d+)", stop.stderr)
    assert sorted(r for r, _ in stops) == ["0", "1"] and len({at for _, at in stops}) == 1, stops
    assert ckpt.committed(b)[-1].name == "ckpt-e0001-s0000004.pt"
    again = run_torchrun(2, [*EXACT, "--out-dir", str(b)])
    assert again.returncode == 0, again.stderr[-2000:]
    la, lb = read_jsonl(a / "step_losses.jsonl"), read_jsonl(b / "step_losses.jsonl")
    assert [(r["epoch"], r["step"]) for r in la] == [(r["epoch"], r["step"]) for r in lb]
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(la, lb)) <= 1e-6
    ma, mb = final_model(a), final_model(b)
    assert all(torch.allclose(ma[k].double(), mb[k].double(), atol=1e-6, rtol=0) for k in ma)


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


@pytest.mark.slow  # ~50 s: bash benchmarks/slow_tests.sh
def test_stalled_rank_fails_within_collective_timeout(tmp_path):
    start = time.monotonic()
    proc = run_torchrun(2, smoke_args(tmp_path / "o", ["--epochs", "3", "--dist-timeout", "10"]), timeout=150,
                        DIST_CIFAR_FAULT="sleep:rank=1:step=2:seconds=600")
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 100, f"stall took {elapsed:.0f}s to fail"


def test_nan_on_one_rank_stops_all_ranks_before_the_step(tmp_path):
    out = tmp_path / "run"
    proc = run_torchrun(2, smoke_args(out, ["--epochs", "2", "--checkpoint-every-steps", "2", "--synthetic-size", "1024"]), timeout=150,
                        DIST_CIFAR_FAULT="nan:rank=1:step=5")
    assert proc.returncode != 0
    assert proc.stderr.count("error: non-finite loss at epoch 0 step 5") == 2, proc.stderr[-2000:]  # both ranks
    last = ckpt.find_latest(out)
    assert last.name == "ckpt-e0000-s0000004.pt"
    weights = ckpt.load(last)["model"]
    assert all(torch.isfinite(t.float()).all() for t in weights.values())


def test_sigusr1_preempts_single_process_then_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", "synthetic", "--synthetic-size", "4096", "--batch-size", "32", "--epochs", "4",
            "--out-dir", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "dist_cifar.train", *args], cwd=ROOT, env=base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("epoch   0"):
                proc.send_signal(signal.SIGUSR1)
                break
        assert proc.wait(timeout=60) == 75
    finally:
        proc.kill()
    assert "preempted (SIGUSR1)" in proc.stderr.read()
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


def test_world_size_change_on_resume(tmp_path):
    out = tmp_path / "run"
    args = smoke_args(out, ["--epochs", "2", "--synthetic-size", "512"])
    stop = run_torchrun(2, args, DIST_CIFAR_FAULT="preempt:rank=0:step=3")
    assert stop.returncode != 0 and ckpt.committed(out)[-1].name == "ckpt-e0000-s0000004.pt"
    done = run_train(args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "world size changed 2 -> 1" in done.stdout
    assert "resuming epoch 0 at step 8" in done.stdout  # 4 steps x 64 images = 8 steps x 32
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1]
    assert json.loads((out / "config.json").read_text())["world_size"] == 1


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('PWNED_PATH', '/tmp/pwned')}",))


def test_malicious_checkpoint_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "pwned"
    os.environ["PWNED_PATH"] = str(marker)
    evil = out / ckpt.checkpoint_name(1, 0)
    with open(evil, "wb") as f:
        pickle.dump({"format": ckpt.FORMAT, "model": Exploit()}, f)
    files.atomic_write_bytes(out / (evil.name + ".commit"), json.dumps(
        {"file": evil.name, "size": evil.stat().st_size, "sha256": ckpt.sha256_file(evil)}).encode())
    proc = run_train(smoke_args(out), timeout=120)
    assert proc.returncode == 2
    assert "refusing checkpoint" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not marker.exists()
    # also through torch.save's own format
    evil2 = tmp_path / "evil2.pt"
    torch.save({"format": ckpt.FORMAT, "model": Exploit()}, evil2)
    with pytest.raises(ckpt.CheckpointError, match="weights_only"):
        ckpt.load(evil2)
    assert not marker.exists()


def test_incompatible_checkpoint_is_a_one_line_error(tmp_path):
    out = tmp_path / "run"
    assert run_train(smoke_args(out)).returncode == 0
    proc = run_train([*smoke_args(out), "--model", "simple_cnn", "--epochs", "2"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model='small_cnn'" in lines[0] and "simple_cnn" in lines[0]
