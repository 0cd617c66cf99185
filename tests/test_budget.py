"""dist_cifar/budget.py: a run's checkpoint, disk and memory needs, stated and enforced before any data is loaded."""
from __future__ import annotations

import pytest



@pytest.mark.quick
def test_the_run_states_its_budget_and_refuses_checkpoints_that_cannot_fit(tmp_path):
    from conftest import run_train, smoke_args
    ok = run_train(smoke_args(tmp_path / "ok", ["--wandb", "off"]))
    assert ok.returncode == 0, ok.stderr[-2000:]
    budget_line = next(l for l in ok.stdout.splitlines() if "budget:" in l)
    assert "per checkpoint" in budget_line and "host memory at a checkpoint" in budget_line
    forecast = next(l for l in ok.stdout.splitlines() if "an epoch here:" in l)
    assert "ms/step measured x 8 steps" in forecast and "GFLOP per training image" in forecast
    # --keep-last so large that the checkpoints cannot fit on any disk: one line before any training
    huge = run_train(smoke_args(tmp_path / "huge", ["--wandb", "off", "--keep-last", "100000000",
                                                    "--checkpoint-every-steps", "1"]))
    lines = huge.stderr.strip().splitlines()
    assert huge.returncode == 2 and len(lines) == 1 and "lower --keep-last" in lines[0], huge.stderr
    assert not list((tmp_path / "huge").glob("ckpt-*")) and not (tmp_path / "huge" / "metrics.jsonl").exists()
    # a one-epoch run writes one checkpoint: it is not charged for --keep-last + 1
    from dist_cifar.budget import plan
    from dist_cifar.config import make_config
    few = plan(make_config(epochs=1, keep_last=50, checkpoint_interval_min=0), out_dir=tmp_path, local_world_size=1,
               on_cuda=False)
    assert few.disk_needed == few.checkpoint_bytes + 2 * few.weights_bytes


@pytest.mark.quick
def test_the_budget_counts_what_a_checkpoint_holds():
    from pathlib import Path

    from dist_cifar import budget
    from dist_cifar.config import make_config
    adam = budget.plan(make_config(model="vgg16_cifar"), out_dir=Path("/tmp"), local_world_size=2, on_cuda=False)
    assert adam.params == 332_943_818 and adam.checkpoint_bytes == adam.params * 4 * 3  # weights + 2 moments
    # two CPU processes each hold weights, gradients, buckets and 2 moments; rank 0 adds the snapshot
    assert adam.memory_needed == 2 * adam.params * 4 * 5 + adam.checkpoint_bytes
    sgd = budget.plan(make_config(model="vgg16_cifar", optimizer="sgd"), out_dir=Path("/tmp"), local_world_size=1,
                      on_cuda=True)
    assert sgd.checkpoint_bytes == sgd.params * 4 * 2 and sgd.memory_needed == sgd.checkpoint_bytes
    assert "host memory" in budget.Budget(**{**adam.__dict__, "memory_have": 1}).problem()


def test_a_cgroup_v1_memory_limit_refuses_vgg16_with_one_line(tmp_path):
    """A 4 GB cgroup-v1 memory limit (what many SLURM clusters set): available_memory used to
    report the machine's free memory, and vgg16_cifar was OOM-killed without a line. Run inside
    a v1 memory cgroup made for the test (root, v1 only), the budget refuses it before any model
    is built."""
    import os
    import secrets
    import subprocess
    import sys
    from pathlib import Path
    from conftest import base_env, ROOT
    v1 = Path("/sys/fs/cgroup/memory")
    if os.getuid() != 0 or not (v1 / "memory.limit_in_bytes").exists():
        pytest.skip("needs root and a cgroup-v1 memory hierarchy")
    group = v1 / f"dist_cifar_test_{secrets.token_hex(3)}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a v1 memory cgroup here ({exc.strerror})")
    try:
        (group / "memory.limit_in_bytes").write_text(str(4 * 10**9))
        script = ('echo $$ > "$1/cgroup.procs" && shift && exec "$@"')
        proc = subprocess.run(["sh", "-c", script, "sh", str(group), sys.executable, "-m", "dist_cifar.train",
                               "--model", "vgg16_cifar", "--dataset", "synthetic", "--out-dir", str(tmp_path / "o")],
                              cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=120)
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                import time
                time.sleep(0.1)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "host memory" in lines[0] and "is available" in lines[0], lines
    available = float(lines[0].split(" of host memory and ")[1].split(" GB")[0])
    assert available <= 4.0, lines[0]


@pytest.mark.quick
def test_forecast_counts_steps_left_and_the_stop_is_weighed_against_the_grace(monkeypatch):
    """Pass of #29: after a world-size change the forecast said '1 epoch(s) left' with 53 steps
    left; vgg16_cifar on CPU printed '0 images/s'; nothing said that a 4 GB stop outlasts
    torchrun's 30 s grace."""
    from dist_cifar import budget
    line = budget.forecast(22.0, steps_per_epoch=40, steps_left=53, images_per_step=16, train_flops_per_image=1e9)
    assert "0.73 images/s" in line and "53 step(s) left (1.3 epoch(s)): ~19 min" in line
    monkeypatch.delenv("DIST_CIFAR_LAUNCHER", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.delenv("DIST_CIFAR_STOP_GRACE_S", raising=False)
    slow = budget.stop_line(22.0, guard_every=1, checkpoint_bytes=4 * 10**9)
    assert slow.startswith("warning: a stop takes up to ~54 s") and "torchrun's --shutdown-timeout, 30 s" in slow
    monkeypatch.setenv("DIST_CIFAR_STOP_GRACE_S", "90")
    assert budget.stop_line(22.0, guard_every=1, checkpoint_bytes=4 * 10**9).endswith("(DIST_CIFAR_STOP_GRACE_S) is 90 s")
