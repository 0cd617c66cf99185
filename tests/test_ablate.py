"""dist_cifar/ablate.py: the report's studies as single-process jobs, their reports, reruns, locks and overrides."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from conftest import base_env, ROOT


TINY = ["--dataset", "synthetic", "--synthetic-size", "128", "--epochs", "1"]

# one variant per study keeps the suite short; every table format and the report's numbers still show
PAIRS = {"dropout": "without_dropout", "pooling": "with_pooling", "batchnorm": "without_bn", "weight_decay": "wd_0",
         "batch_size": "batch_16"}


def ablate(argv: list[str], timeout=600, **env):
    return subprocess.run([sys.executable, "-m", "dist_cifar.ablate", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=base_env(**env))


def table_rows(report: str) -> list[str]:
    return [l for l in report.splitlines() if l.startswith("| ") and not l.startswith("| variant")
            and not re.match(r"\| (weight decay|epochs) \|", l)]


@pytest.mark.slow  # ~55 s: bash benchmarks/slow_tests.sh
def test_every_study_tiny_then_rerun_skips(tmp_path):
    out = tmp_path / "abl"
    variants = ",".join(PAIRS.values())
    proc = ablate(["all", *TINY, "--variants", variants, "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # the epochs study sets --epochs per variant: with an --epochs override it is left out, not run at 1 epoch
    assert "skipping the epochs study: it sets --epochs per variant" in proc.stdout and not (out / "epochs-e1").exists()
    for study, pair in PAIRS.items():
        report = (out / f"{study}-e1" / "report.md").read_text()
        rows = table_rows(report)
        assert len(rows) >= 2, report
        for name in pair.split(","):
            assert (out / f"{study}-e1" / name / "summary.json").exists()
        done = [r for r in rows if "not run" not in r]
        assert len(done) == 1, report
        assert (out / f"{study}-e1" / f"{study}_loss_curves.png").read_bytes()[:4] == b"\x89PNG"
        assert "`--epochs 1`" in report  # the override is stated in the header
    wd = (out / "weight_decay-e1" / "report.md").read_text()
    assert "77.53" in wd and "71.62" in wd  # the report's numbers beside ours
    assert "1.07" in (out / "batchnorm-e1" / "report.md").read_text()
    index = (out / "REPORT.md").read_text()
    assert all(f"({s}-e1/report.md)" in index for s in PAIRS) and "(vgg16-e1/report.md)" in index
    assert json.loads((out / "dropout-e1" / "ablation.json").read_text())["data"]["dataset"] == "synthetic"
    # variants keep their own switches
    cfg = json.loads((out / "batchnorm-e1" / "without_bn" / "config.json").read_text())
    assert cfg["batchnorm"] is False and cfg["job_type"] == "ablation" and cfg["wandb_group"] == "batchnorm"
    assert json.loads((out / "batch_size-e1" / "batch_16" / "config.json").read_text())["batch_size"] == 16
    stamp = (out / "dropout-e1" / "without_dropout" / "summary.json").stat().st_mtime_ns
    again = ablate(["dropout", *TINY, "--variants", PAIRS["dropout"], "--out", str(out)])
    assert again.returncode == 0 and "without_dropout: --preset" not in again.stdout  # skipped
    assert (out / "dropout-e1" / "without_dropout" / "summary.json").stat().st_mtime_ns == stamp


def test_the_epochs_study_runs_its_own_epochs_and_refuses_an_override(tmp_path):
    out = tmp_path / "abl"
    epochs = ablate(["epochs", "--dataset", "synthetic", "--synthetic-size", "64", "--variants", "epochs_10",
                     "--out", str(out)])
    assert epochs.returncode == 0, epochs.stdout[-2000:]
    row = next(r for r in table_rows((out / "epochs" / "report.md").read_text()) if r.startswith("| 10 |"))
    assert "61.31" in row and "1.03" in row  # ten epochs run, beside the report's ten-epoch row
    refused = ablate(["epochs", "--epochs", "1", "--out", str(out)])
    assert refused.returncode == 2 and "drop --epochs" in refused.stderr
    every = ablate(["all", "--epochs", "1", "--report-only", "--out", str(out)])
    assert every.returncode == 0 and "skipping the epochs study: it sets --epochs per variant" in every.stdout


def test_recipe_overrides_reach_every_variant_and_stay_apart(tmp_path):
    out = tmp_path / "abl"
    proc = ablate(["dropout", *TINY, "--weight-decay", "0", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    folder = out / "dropout-e1-wd0"
    for variant in ("with_dropout", "without_dropout"):
        cfg = json.loads((folder / variant / "config.json").read_text())
        assert cfg["weight_decay"] == 0.0 and cfg["epochs"] == 1 and cfg["preset"] == "report"
    assert "`--weight-decay 0.0`" in (folder / "report.md").read_text()
    # the preset's weight decay (0.01) goes to another folder: never one table for both
    default = ablate(["dropout", *TINY, "--variants", "with_dropout", "--out", str(out)])
    assert default.returncode == 0
    assert json.loads((out / "dropout-e1" / "with_dropout" / "config.json").read_text())["weight_decay"] == 0.01
    assert json.loads((folder / "with_dropout" / "config.json").read_text())["weight_decay"] == 0.0
    clash = ablate(["weight_decay", "--weight-decay", "0", "--out", str(out)])
    assert clash.returncode == 2 and "--weight-decay" in clash.stderr


def test_failed_variant_is_reported_then_rerun(tmp_path):
    out = tmp_path / "abl"
    args = ["batchnorm", *TINY, "--out", str(out)]
    failed = ablate(args, DIST_CIFAR_FAULT="crash:rank=0:step=1")
    assert failed.returncode == 1
    report = (out / "batchnorm-e1" / "report.md").read_text()
    assert "failed (exit" in report and "re-run" in report
    assert not (out / "batchnorm-e1" / "with_bn" / "summary.json").exists()
    fixed = ablate(args)
    assert fixed.returncode == 0, fixed.stdout[-2000:]
    assert "with_bn: ok" in fixed.stdout and "without_bn: ok" in fixed.stdout
    assert len([r for r in table_rows((out / "batchnorm-e1" / "report.md").read_text()) if "failed" not in r]) == 2
    # what a user watches (#31): the forecast and one line per epoch per variant, then "done, skipped"
    assert "[ablate] batchnorm/with_bn: epoch   0  train_loss" in fixed.stdout
    assert "[ablate] batchnorm/without_bn: an epoch here:" in fixed.stdout
    again = ablate(args)
    assert again.returncode == 0 and "batchnorm/with_bn: done, skipped" in again.stdout
    assert "epoch   0" not in again.stdout


@pytest.mark.quick
def test_unknown_variant_is_a_clear_error(tmp_path):
    proc = ablate(["dropout", "--variants", "nope", "--out", str(tmp_path)])
    assert proc.returncode == 2 and "with_dropout" in proc.stderr


def test_ablate_validates_locks_reruns_torn_variants_and_stops_its_trainer(tmp_path):
    """Cases 121 (--epochs 0 launched every variant to fail), 133 (two ablate processes on one
    --out), 134 (a corrupt summary.json marked its variant done forever), 131 (SIGTERM to ablate
    left its trainer running alone)."""
    import argparse
    import signal
    from dist_cifar import ablate
    cmd = [sys.executable, "-m", "dist_cifar.ablate", "batchnorm", "--dataset", "synthetic", "--synthetic-size", "256",
           "--out", str(tmp_path / "abl")]
    zero = subprocess.run([*cmd, "--epochs", "0"], cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=60)
    assert zero.returncode == 2 and zero.stderr.strip() == "error: --epochs must be > 0, got 0"
    assert not (tmp_path / "abl").exists()

    args = argparse.Namespace(variants="", out=str(tmp_path / "abl"), epochs=None, weight_decay=None, optimizer=None,
                              lr=None, dataset="synthetic", data_dir="data", max_train=0, synthetic_size=256, extra="")
    study = ablate.STUDIES["batchnorm"]
    folder, _ = ablate.study_folder(tmp_path / "abl", study, args)
    done = folder / study.variants[0].name
    done.mkdir(parents=True)
    (done / "metrics.jsonl").write_text("")
    (done / "summary.json").write_text('{"test_accuracy": 5')  # torn
    assert study.variants[0] in ablate.pending(study, folder, args)
    for wrong in ('[1, 2]', '{"best_test_accuracy": "high", "best_train_accuracy": 1, "total_time_s": 1, "best_epoch": 0}'):
        (done / "summary.json").write_text(wrong)  # parses, but not what the trainer writes: run it again
        assert study.variants[0] in ablate.pending(study, folder, args)

    ablate.lock_study(folder)  # this process holds the study
    try:
        second = subprocess.run(cmd, cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=60)
    finally:
        ablate._study_locks.pop().close()
    assert second.returncode == 2 and "another dist_cifar.ablate is running" in second.stderr

    running = subprocess.Popen([*cmd, "--epochs", "200"], cwd=ROOT, env=base_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    trainer = None
    while time.monotonic() < deadline and trainer is None:
        time.sleep(0.5)
        found = subprocess.run(["pgrep", "-f", f"dist_cifar.train.*{tmp_path / 'abl'}"], capture_output=True, text=True)
        trainer = next((int(p) for p in found.stdout.split() if int(p) != running.pid), None)
    assert trainer is not None, "the variant's trainer never started"
    time.sleep(3)
    running.send_signal(signal.SIGTERM)
    running.communicate(timeout=150)
    assert running.returncode != 0
    time.sleep(1)
    assert subprocess.run(["kill", "-0", str(trainer)], capture_output=True).returncode != 0  # not left running


def test_without_data_the_study_says_no_cifar10_and_no_question_marks(tmp_path):
    """#31 item 10: with no data (and no download), each variant's one line says there is no
    CIFAR-10 (not "use --split full", which would run the report's study on synthetic data), and
    the report says that nothing finished instead of a header of "?"."""
    out = tmp_path / "abl"
    proc = ablate(["batchnorm", "--data-dir", str(tmp_path / "empty"), "--out", str(out), "--variants", "with_bn"])
    log = (out / "batchnorm" / "with_bn.log").read_text()
    assert "error: no CIFAR-10 in" in log and "use --split full" not in log, log[-2000:]
    report = (out / "batchnorm" / "report.md").read_text()
    assert " ?" not in report.split("\n", 3)[3] and "No variant has finished yet" in report  # after the question
    assert proc.returncode == 1
