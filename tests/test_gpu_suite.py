"""The GPU suite's dress rehearsal: `gpu_suite.sh --smoke` runs the same stages in the same order
on CPU and writes the same files the H200 call will bring back; its bookkeeping never reports a
warm-up epoch as a steady one; without the real data it stops at once."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from conftest import ROOT, base_env

sys.path.insert(0, str(ROOT / "benchmarks"))

EXPECTED = {"suite_summary.json", "fast_run.json", "peers.json", "peers.png", "headline.json", "ladder.json",
            "ladder.png", "suite.log"}
STAGE_FILES = {"fast": {"fast_run.json"}, "ladder": {"ladder.json", "ladder.png"}, "peers": {"peers.json", "peers.png"},
               "headline": {"headline.json"}}


def test_smoke_runs_every_stage_and_writes_the_file_set(tmp_path):
    """Stages in the GPU call's order; on a loaded machine a later stage may be cut (its box
    reached: it says so and the suite goes on), never failed."""
    out = tmp_path / "out"
    started = time.monotonic()
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                          timeout=420, env=base_env(OUT=str(out)))
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    names = {p.name for p in out.iterdir()}
    assert names <= EXPECTED and len(names) <= 8  # at most 7 files and one log
    summary = json.loads((out / "suite_summary.json").read_text())
    stages = [(s["stage"], s["status"]) for s in summary["stages"]]
    assert [name for name, _ in stages] == ["fast", "ladder", "peers", "headline"]
    assert stages[0] == ("fast", "ok") and all(status in ("ok", "cut", "skipped") for _, status in stages), stages
    for name, status in stages:
        if status == "ok":
            assert STAGE_FILES[name] <= names, (name, names)
    assert took < 300 + 60, took  # the smoke budget is 300 s; the rest is bash and teardown
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


def test_without_the_tarball_the_gpu_run_stops_at_once(tmp_path):
    started = time.monotonic()
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=base_env(OUT=str(tmp_path / "out"), SUITE_DATA=str(tmp_path / "absent.tar.gz")))
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert time.monotonic() - started < 60
    assert "absent.tar.gz is missing" in proc.stdout + proc.stderr and "synthetic" in proc.stdout + proc.stderr
    assert not (tmp_path / "out" / "fast_run.json").exists()


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
