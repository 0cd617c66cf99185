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
    huge = run_train(smoke_args(tmp_path / "huge", ["--wandb", "off", "--keep-last", "100000000"]))
    lines = huge.stderr.strip().splitlines()
    assert huge.returncode == 2 and len(lines) == 1 and "lower --keep-last" in lines[0], huge.stderr
    assert not list((tmp_path / "huge").glob("ckpt-*")) and not (tmp_path / "huge" / "metrics.jsonl").exists()


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
