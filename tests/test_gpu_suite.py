"""The GPU suite's dress rehearsal: `gpu_suite.sh --smoke` runs every stage on CPU, on time, and
writes the same files the H200 call will bring back."""
from __future__ import annotations

import json
import subprocess
import time

from conftest import ROOT, base_env

EXPECTED = {"suite_summary.json", "fast_run.json", "peers.json", "peers.png", "headline.json", "ladder.json",
            "ladder.png", "suite.log"}


def test_smoke_runs_every_stage_and_writes_the_file_set(tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                          timeout=400, env=base_env(OUT=str(out)))
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == EXPECTED  # at most 7 files and one log
    summary = json.loads((out / "suite_summary.json").read_text())
    assert [(s["stage"], s["status"]) for s in summary["stages"]] == [
        ("fast", "ok"), ("peers", "ok"), ("headline", "ok"), ("ladder", "ok")]
    assert took < 180 + 30, took  # the suite's own budget is 170 s; the rest is bash and teardown
    assert summary["skipped"].startswith("real CIFAR-10")  # says, in one line, what it did without
    fast = summary["fast"]
    assert 0 <= fast["test_accuracy"] <= 100 and fast["epochs_run"] == 2 and fast["images_per_s"] > 0
    assert len(fast["checkpoint_blocked_s"]) == 2 and all(0 < s < 30 for s in fast["checkpoint_blocked_s"])
    peers = summary["peers_small_cnn"]
    assert peers["dist_cifar"]["dist_cifar_ratio"] == 1.0 and peers["plain"]["images_per_s"] > 0
    rows = json.loads((out / "peers.json").read_text())["models"]["small_cnn"]["rows"]
    lightning = next(r for r in rows if r.get("key") == "lightning" or r["contestant"] == "lightning")
    assert lightning.get("images_per_s", 0) > 0 or "pip install .[bench]" in lightning["skipped"]
    assert list(summary["ladder"]) == ["fp32 eager, torch loader", "+bf16"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for name in ("suite_summary.json", "fast_run.json", "peers.json", "ladder.json"):
        meta = json.loads((out / name).read_text())["provenance"]
        assert meta["git_commit"] == (head or "unknown") and meta["date"] and meta["torch_version"]
    assert (out / "peers.png").read_bytes()[:4] == b"\x89PNG"
