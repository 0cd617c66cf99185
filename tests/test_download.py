"""dist_cifar/download.py and fetch.py: the CIFAR-10 download from a local mirror (MD5, deadline, minimum rate) and its one-line failures."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import base_env, free_port, read_jsonl, ROOT, run_train
from dist_cifar.data import DataError, DataMissing, load_source


@pytest.mark.quick
def test_trainer_downloads_verifies_extracts_and_trains(tmp_path, cifar_mirror):
    url, md5 = cifar_mirror
    data, out = tmp_path / "data", tmp_path / "out"
    proc = run_train(["--dataset", "cifar10", "--data-dir", str(data), "--out-dir", str(out), "--epochs", "1",
                      "--batch-size", "32", "--val-size", "20", "--wandb", "off"],
                     timeout=180, DIST_CIFAR_CIFAR10_URL=url, DIST_CIFAR_CIFAR10_MD5=md5)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"downloading {url}" in proc.stdout
    assert "\r" not in proc.stdout + proc.stderr  # no progress-bar fragments in a log file
    assert (data / "cifar-10-python.tar.gz").exists() and (data / "cifar-10-batches-py" / "test_batch").exists()
    assert not [p.name for p in data.iterdir() if p.name.startswith(".")]  # no part file, no temp folder
    config = json.loads((out / "config.json").read_text())
    assert config["split_sizes"] == {"train": 180, "val": 20, "test": 40}
    assert config["data_source"].startswith("cifar10")
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [0]
    # the second run finds the extracted folder and downloads nothing (the server is not asked)
    again = run_train(["--dataset", "cifar10", "--data-dir", str(data), "--out-dir", str(tmp_path / "o2"),
                       "--epochs", "1", "--batch-size", "32", "--val-size", "20", "--steps-per-epoch", "1"],
                      timeout=180)
    assert again.returncode == 0 and "downloading" not in again.stdout, again.stderr[-1000:]


@pytest.mark.quick
def test_wrong_md5_is_one_line_and_leaves_nothing(tmp_path, cifar_mirror, monkeypatch):
    url, md5 = cifar_mirror
    monkeypatch.setenv("DIST_CIFAR_CIFAR10_URL", url)
    monkeypatch.setenv("DIST_CIFAR_CIFAR10_MD5", "0" * 32)
    data = tmp_path / "data"
    with pytest.raises(DataError) as err:
        load_source("cifar10", str(data), download=True)
    msg = str(err.value)
    assert "\n" not in msg and md5 in msg and "DIST_CIFAR_CIFAR10_MD5" in msg
    assert not isinstance(err.value, DataMissing)  # --dataset auto must not fall back past a bad archive
    assert list(data.iterdir()) == []  # no archive, no part file, no half-extracted folder


def test_offline_is_one_line_naming_both_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("DIST_CIFAR_CIFAR10_URL", f"http://127.0.0.1:{free_port()}/cifar-10-python.tar.gz")
    started = time.monotonic()
    with pytest.raises(DataMissing) as err:
        load_source("cifar10", str(tmp_path / "data"), download=True)
    msg = str(err.value)
    assert time.monotonic() - started < 30
    assert "\n" not in msg and "download" in msg
    assert "put cifar-10-python.tar.gz in" in msg and "--no-download --dataset imagefolder" in msg
    with pytest.raises(DataMissing) as err:
        load_source("cifar10", str(tmp_path / "data"), download=False)
    assert "drop --no-download" in str(err.value)


def test_a_trickling_mirror_fails_within_the_deadline(tmp_path):
    """Case 103: one byte every 5 s kept the download alive forever (each read was within the
    30 s socket timeout) and left its part file behind."""
    import http.server
    import threading

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            try:
                for _ in range(60):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "dist_cifar.fetch", str(tmp_path / "d")], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, env=base_env(
                                  DIST_CIFAR_CIFAR10_URL=f"http://127.0.0.1:{server.server_port}/c.tar.gz",
                                  DIST_CIFAR_DOWNLOAD_TIMEOUT_S="5"))
        took = time.monotonic() - started
    finally:
        server.shutdown()
    assert proc.returncode == 1 and took < 40, (took, proc.stderr)
    assert "not finished after 5 s" in proc.stderr
    assert list((tmp_path / "d").glob(".*part*")) == []


@pytest.mark.quick
def test_nan_and_download_messages_say_what_happened(tmp_path):
    """Cases 117 (a NaN caught by the check before a mid-epoch checkpoint was blamed on 'the
    end-of-epoch check', and 'the last one is kept' when there was none) and 116 (a download into
    a path that is a file told the user to put the archive there)."""
    from conftest import smoke_args
    nan = run_train(smoke_args(tmp_path / "n", ["--guard-every", "4", "--checkpoint-every-steps", "3"]),
                    DIST_CIFAR_FAULT="nan:rank=0:step=1")
    assert nan.returncode == 3
    assert "applied steps 1..2 before the check before the checkpoint at step 3" in nan.stderr, nan.stderr[-1500:]
    assert "if there is one" in nan.stderr
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = run_train(["--dataset", "cifar10", "--data-dir", str(blocker), "--out-dir", str(tmp_path / "o")])
    assert proc.returncode == 2 and "cannot write the CIFAR-10 download into" in proc.stderr, proc.stderr[-1500:]
    assert "put cifar-10-python.tar.gz in" not in proc.stderr
