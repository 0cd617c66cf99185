"""dist_cifar/train.py end to end: one process learns and writes every output; each design trains
under torchrun at two ranks."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import read_jsonl, run_train, smoke_args, torchrun_jobs


OUTPUTS = ("config.json", "metrics.jsonl", "summary.json", "best.pt", "loss_curves.png", "confusion_matrix.png")


@pytest.mark.quick
def test_two_epoch_small_cnn_run_learns_and_writes_everything(tmp_path):
    out = tmp_path / "run"
    proc = run_train(["--dataset", "synthetic", "--synthetic-size", "1024", "--model", "small_cnn",
                      "--epochs", "2", "--batch-size", "32", "--out-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [0, 1]
    assert metrics[1]["train_loss"] < metrics[0]["train_loss"]
    for m in metrics:
        assert m["epoch_time_s"] > 0 and m["images_per_s"] > 0 and 0 <= m["val_accuracy"] <= 100
    summary = json.loads((out / "summary.json").read_text())
    for key in ("num_params", "best_train_accuracy", "best_val_accuracy", "best_test_accuracy", "best_epoch", "total_time_s"):
        assert key in summary
    assert summary["num_params"] == 69_050 and summary["best_test_accuracy"] > 20  # chance is 10
    assert summary["best_epoch"] == min(metrics, key=lambda m: m["val_loss"])["epoch"]
    assert sum(map(sum, summary["confusion_matrix"])) == 256
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "small_cnn" and config["world_size"] == 1 and config["global_batch_size"] == 32
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["model_name"] == "small_cnn" and "fc1.weight" in best["state_dict"]
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.quick
def test_each_design_trains_end_to_end_at_two_ranks(tmp_path):
    """ddp, hybrid and fsdp, each a real 2-rank job (one torchrun launch for the three): every rank
    exits 0, rank 0 writes one line per epoch and the summary, and the layout is the one asked for."""
    designs = ("ddp", "hybrid", "fsdp")
    jobs = [{"name": d, "argv": smoke_args(tmp_path / d, ["--epochs", "2", "--parallel", d, "--quiet"]), "env": {}}
            for d in designs]
    results = torchrun_jobs(2, jobs, tmp_path, timeout=300)
    for design in designs:
        assert [r["code"] for r in results[design]["ranks"]] == [0, 0], results[design]["ranks"][0]["stderr"][-2000:]
        out = tmp_path / design
        assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1]
        config = json.loads((out / "config.json").read_text())
        assert (config["parallel_resolved"], config["world_size"]) == (design, 2)
        assert 0 <= json.loads((out / "summary.json").read_text())["best_test_accuracy"] <= 100


def test_the_readme_python_api_example_runs_as_written(tmp_path):
    """#31: dist_cifar.run and models.register, through the README's own example (extracted from
    README.md, run as a script in an empty folder)."""
    import re
    import subprocess
    import sys
    from conftest import base_env, ROOT
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"\*\*Python API\.\*\*.*?```python\n(.*?)```", readme, flags=re.S).group(1)
    (tmp_path / "example.py").write_text(example)
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=base_env(), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out_dir, accuracy = proc.stdout.strip().splitlines()[-1].split()[:2]
    assert (tmp_path / out_dir / "summary.json").exists() and 0 <= float(accuracy) <= 100
    assert "error: --epochs must be > 0, got -1" in proc.stderr


@pytest.mark.quick
def test_time_to_target_accuracy_is_recorded(tmp_path):
    """--target-accuracy P (#31): the training time, epoch and optimizer step at which validation
    accuracy first reaches P, in summary.json (null when never reached)."""
    import json
    from conftest import read_jsonl, run_train, smoke_args
    reached = run_train(smoke_args(tmp_path / "low", ["--epochs", "2", "--target-accuracy", "1"]))
    assert reached.returncode == 0, reached.stderr[-2000:]
    summary = json.loads((tmp_path / "low" / "summary.json").read_text())
    first = read_jsonl(tmp_path / "low" / "metrics.jsonl")[0]
    assert (summary["target_epoch"], summary["target_step"]) == (0, first["steps"])
    assert 0 < summary["time_to_target_s"] <= summary["total_time_s"] and "reached the target 1%" in reached.stdout
    never = run_train(smoke_args(tmp_path / "high", ["--target-accuracy", "100"]))  # ~30% after one epoch
    summary = json.loads((tmp_path / "high" / "summary.json").read_text())
    assert never.returncode == 0 and summary["target_accuracy"] == 100
    assert summary["time_to_target_s"] is None and summary["target_epoch"] is None
