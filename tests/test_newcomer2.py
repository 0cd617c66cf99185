"""A newcomer's second hour (#22): plain reruns of the benchmark and ablation scripts never replace
the committed results, and say which data their numbers are on."""
import hashlib
import json
import subprocess
import sys

from conftest import ROOT, base_env, write_image_tarball

RESULTS = ROOT / "benchmarks" / "results"


def tree_digest(folder) -> str:
    """One hash over every file's path and bytes under `folder`."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def test_a_plain_benchmark_rerun_writes_to_runs_and_states_its_data(tmp_path):
    before = tree_digest(RESULTS)
    out = ROOT / "runs" / "benchmarks" / "overhead_linear_cpu.json"
    out.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "benchmarks/overhead.py", "--model", "linear", "--steps", "3", "--repeats", "2",
                           "--batch-size", "32"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=base_env(DIST_CIFAR_DATA=str(tmp_path / "absent")))
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(out.read_text())
    data_lines = [l for l in proc.stdout.splitlines() if l.startswith("data: ")]
    assert len(data_lines) == 1 and payload["data_source"].split()[0] in data_lines[0]
    if "synthetic" in payload["data_source"]:
        assert "SYNTHETIC" in data_lines[0]  # the fallback is said in the table, not hidden
    assert isinstance(payload["warnings"], list)
    charts = subprocess.run([sys.executable, "benchmarks/charts.py", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env=base_env())
    assert charts.returncode == 0 and "usage" in charts.stdout
    assert tree_digest(RESULTS) == before  # nothing committed was replaced


def test_repeats_that_disagree_are_flagged():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import spread_warning
    assert spread_warning("x", [1.0, 1.05, 0.98]) is None
    assert "not trustworthy" in spread_warning("x", [1.0, 2.0, 1.1])


def test_ablations_script_without_data_or_with_failures_publishes_nothing(tmp_path):
    before = tree_digest(RESULTS)
    script = ["bash", "benchmarks/ablations_cpu.sh", "--publish", "batchnorm --variants with_bn --epochs 1"]
    missing = subprocess.run(script, cwd=ROOT, capture_output=True, text=True, timeout=60,
                             env=base_env(DATA=str(tmp_path / "nope.tar.gz"), RUNS=str(tmp_path / "runs")))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1 and "DATA=" in missing.stderr
    tarball = write_image_tarball(tmp_path / "tiny.tar.gz", per_class=10)
    failed = subprocess.run(script, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=base_env(DATA=str(tarball), RUNS=str(tmp_path / "runs"), PYTHON=sys.executable,
                                         EXTRA="--split full --val-size 6", DIST_CIFAR_FAULT="crash:rank=0:step=1"))
    assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-2000:]
    assert "nothing published" in failed.stderr
    assert tree_digest(RESULTS) == before


def test_the_default_dataset_reads_an_image_tarball_already_in_data_dir(tmp_path):
    """The quickstart leaves the CIFAR image tarball in data/: the default --dataset cifar10 finds it
    there (saying so) instead of going to the network, even with --no-download."""
    from conftest import run_train
    write_image_tarball(tmp_path / "data" / "cifar10-jpeg.tar.gz", per_class=10)
    proc = run_train(["--data-dir", str(tmp_path / "data"), "--no-download", "--split", "full", "--val-size", "6",
                      "--epochs", "1", "--batch-size", "8", "--model", "small_cnn", "--out-dir", str(tmp_path / "run"),
                      "--wandb", "off"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reading the image set" in proc.stdout and "cifar10-jpeg.tar.gz" in proc.stdout
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["dataset"] == "cifar10" and config["data_source"] == "imagefolder"


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
