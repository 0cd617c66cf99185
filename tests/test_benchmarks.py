"""benchmarks/: plain reruns write to runs/ and state their data, spread warnings, and nothing published on failure."""
from __future__ import annotations

import pytest
import hashlib
import json
import subprocess
import sys

from conftest import base_env, ROOT, write_image_tarball


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


@pytest.mark.quick
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


def test_checkpoint_benchmark_leaves_the_given_folder_alone(tmp_path):
    """Case 125: `benchmarks/checkpoint.py --dir X` deleted X and everything in it."""
    folder = tmp_path / "X"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("keep")
    (folder / "sub" / "run.log").write_text("d")
    proc = subprocess.run([sys.executable, "benchmarks/checkpoint.py", "--model", "linear", "--dir", str(folder),
                           "--out", str(tmp_path / "ck.json")], cwd=ROOT, env=base_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (folder / "notes.txt").read_text() == "keep" and (folder / "sub" / "run.log").read_text() == "d"
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "sub"]  # its own folder is gone
