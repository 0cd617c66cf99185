"""The GPU suite's dress rehearsal: `gpu_suite.sh --smoke` runs the same stages in the same order
on CPU and writes the same files the H200 call will bring back; its bookkeeping never reports a
warm-up epoch as a steady one; without the real data or a scratch folder it stops at once; it
never reports an earlier suite's numbers, and its sweep touches only its own stages."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import base_env, ROOT


sys.path.insert(0, str(ROOT / "benchmarks"))


EXPECTED = {"suite_summary.json", "fast_run.json", "peers.json", "peers.png", "headline.json", "ladder.json",
            "ladder.png", "suite.log"}


SMOKE_BUDGET_S = 300


STAGE_FILES = {"rehearsal": set(), "fast": {"fast_run.json"}, "ladder": {"ladder.json", "ladder.png"}, "peers": {"peers.json", "peers.png"},
               "headline": {"headline.json"}}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One whole smoke suite; later tests rerun parts of it into the same out folder."""
    out = tmp_path_factory.mktemp("suite") / "out"
    started = time.monotonic()
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                          timeout=420, env=base_env(OUT=str(out)))
    return out, proc, time.monotonic() - started


def test_smoke_runs_every_stage_and_writes_the_file_set(smoke):
    """Stages in the GPU call's order; on a loaded machine a later stage may be cut (its box
    reached: it says so and the suite goes on), never failed."""
    out, proc, took = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    names = {p.name for p in out.iterdir()}
    assert names <= EXPECTED and len(names) <= 8  # at most 7 files and one log
    summary = json.loads((out / "suite_summary.json").read_text())
    stages = [(s["stage"], s["status"]) for s in summary["stages"]]
    assert [name for name, _ in stages] == ["rehearsal", "fast", "ladder", "peers", "headline"]
    assert stages[:2] == [("rehearsal", "ok"), ("fast", "ok")], stages
    assert all(status in ("ok", "cut", "skipped") for _, status in stages), stages
    # the first minute: fsdp + bf16 and hybrid + fp16, two steps each, finite
    rows = {(r["design"], r["precision"]): r for r in summary["rehearsal"]}
    assert set(rows) == {("fsdp", "bf16"), ("hybrid", "fp16")}
    assert all(r["status"] == "ok" and r["train_loss"] == r["train_loss"] for r in rows.values()), rows
    for name, status in stages:
        if status == "ok":
            assert STAGE_FILES[name] <= names, (name, names)
    assert took < SMOKE_BUDGET_S + 15, took  # the budget holds the suite's own overhead and kill graces
    assert summary["skipped"].startswith("real CIFAR-10") or "cut" in summary["skipped"]
    log = (out / "suite.log").read_text()
    assert "before ladder: no process left by earlier stages" in log and "scratch disk:" in log
    assert log.rstrip().splitlines()[-1].startswith("[suite +") and "done in" in log.splitlines()[-1]
    fast = summary["fast"]
    assert 0 <= fast["test_accuracy"] <= 100 and fast["epochs_run"] == 3 and fast["images_per_s"] > 0
    assert fast["steady_epoch_time_s"] > 0 and fast["mfu"] > 0 and fast["mfu_vs_measured_790"] > fast["mfu"]
    assert len(fast["checkpoint_blocked_s"]) == 2 and all(0 < s < 30 for s in fast["checkpoint_blocked_s"])
    if ("peers", "ok") in stages:
        rows = json.loads((out / "peers.json").read_text())["models"]["small_cnn"]["rows"]
        assert {r["key"] for r in rows} == {"dist_cifar", "lightning", "plain"}
        assert all("images_per_s" in r or r.get("skipped") for r in rows)  # a failure is a row, with its reason
        assert json.loads((out / "peers.json").read_text())["world"]["ddp"] is False  # like for like at one rank
    if ("ladder", "ok") in stages:
        assert list(summary["ladder"]) == ["fp32 eager, torch loader", "+tensor loader", "+DDP + bf16 hook at world size 1"]
        assert summary["ddp_at_world_size_1_speed"] > 0
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for name in ("suite_summary.json", "fast_run.json"):
        meta = json.loads((out / name).read_text())["provenance"]
        assert meta["git_commit"] == (head or "unknown") and meta["date"] and meta["torch_version"]


@pytest.mark.quick
def test_without_the_tarball_the_gpu_run_stops_at_once(tmp_path):
    started = time.monotonic()
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=base_env(OUT=str(tmp_path / "out"), SUITE_DATA=str(tmp_path / "absent.tar.gz")))
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert time.monotonic() - started < 60
    assert "absent.tar.gz is missing" in proc.stdout + proc.stderr and "synthetic" in proc.stdout + proc.stderr
    assert not (tmp_path / "out" / "fast_run.json").exists()


@pytest.mark.quick
def test_a_run_cut_after_its_compile_epoch_has_no_steady_time(tmp_path):
    from suite_report import distil_run
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "small_cnn", "world_size": 1, "epochs": 12}))
    epoch = {"epoch": 0, "epoch_time_s": 95.0, "images_per_s": 500.0, "compile_s": 80.0, "peak_memory_mb": 1.0}
    (run / "metrics.jsonl").write_text(json.dumps(epoch) + "\n")
    result = distil_run(run, tmp_path / "out.json", peak_tflops=989.4)
    assert result["steady_epoch_time_s"] is None and result["images_per_s"] is None and result["mfu"] is None
    assert "first warms up" in result["steady_epoch_time_reason"] and result["complete"] is False
    second = dict(epoch, epoch=1, epoch_time_s=5.0, images_per_s=10_000.0, compile_s=None)
    (run / "metrics.jsonl").write_text(json.dumps(epoch) + "\n" + json.dumps(second) + "\n")
    assert distil_run(run, tmp_path / "out.json", peak_tflops=989.4)["steady_epoch_time_s"] == 5.0


def test_a_failed_stage_never_reports_an_earlier_suites_numbers(smoke):
    """The same out folder, after the successful suite above: this time `fast` crashes. Its numbers
    must not reappear under this suite's provenance; the earlier files are moved aside, not lost."""
    out, first, _ = smoke
    assert first.returncode == 0
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=base_env(OUT=str(out), SUITE_STAGES="fast",
                                                    DIST_CIFAR_FAULT="crash:rank=0:step=0"))
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = json.loads((out / "suite_summary.json").read_text())
    assert dict((s["stage"], s["status"]) for s in summary["stages"])["fast"] == "failed"
    assert "fast" not in summary and "rehearsal" not in summary
    this = json.loads((out / "fast_run.json").read_text())  # the failed run distilled: no numbers
    assert this["provenance"]["suite_id"] == summary["provenance"]["suite_id"]
    assert this["epochs_run"] == 0 and this["test_accuracy"] is None and this["images_per_s"] is None
    earlier = json.loads((out / "previous" / "fast_run.json").read_text())
    assert earlier["provenance"]["suite_id"] != summary["provenance"]["suite_id"]
    assert "moved to" in proc.stdout and (out / "previous" / "suite_summary.json").exists()


@pytest.mark.quick
def test_without_a_scratch_folder_the_suite_stops_before_writing_anything(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    for tmpdir in ("/nonexistent/dir", str(not_a_folder)):
        proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, env=base_env(OUT=str(tmp_path / "out"), TMPDIR=tmpdir))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: no usable scratch folder"), lines
    assert not (tmp_path / "out").exists() and not Path("/stages.tsv").exists() and not Path("/cache").exists()


def test_the_sweep_kills_only_this_suites_stages(tmp_path):
    """In a private PID namespace (nothing outside it can be reached): a process marked as another
    suite's stage survives this suite's sweeps."""
    script = ("env DIST_CIFAR_SUITE_STAGE=other-1:fast sleep 300 & decoy=$!; sleep 0.2; "
              "SUITE_STAGES=none bash benchmarks/gpu_suite.sh --smoke; rc=$?; "
              "kill -0 $decoy && echo DECOY-ALIVE; exit $rc")
    proc = subprocess.run(["unshare", "-p", "-f", "--mount-proc", "bash", "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=base_env(OUT=str(tmp_path / "out")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "before the summary: no process left by earlier stages" in proc.stdout
    assert "DECOY-ALIVE" in proc.stdout
