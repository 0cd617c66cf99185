"""A newcomer's path: CIFAR-10 downloads by itself (over a real loopback HTTP server), W&B logs by
default without ever hanging, and the package installs and runs like one."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, base_env, free_port, read_jsonl, run_train, smoke_args, write_official_cifar
from dist_cifar.data import DataError, DataMissing, load_source


@pytest.fixture
def cifar_mirror(tmp_path):
    """An archive in the official format (py2-style pickles under cifar-10-batches-py/) served by
    http.server on 127.0.0.1; yields (url, md5)."""
    site = tmp_path / "site"
    site.mkdir()
    src = write_official_cifar(tmp_path / "src", per_batch=40, n_test=40)
    archive = site / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield (f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz",
               hashlib.md5(archive.read_bytes()).hexdigest())
    finally:
        server.shutdown()


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


def test_unreachable_wandb_server_falls_back_to_offline_quickly(tmp_path):
    """Credentials but no route to the server (a compute node): training starts within 60 s,
    logging offline, instead of waiting on W&B's retries."""
    out = tmp_path / "run"
    home = tmp_path / "home"
    home.mkdir()
    env = base_env(WANDB_MODE="online", WANDB_API_KEY="x" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{free_port()}",
                   HOME=str(home), WANDB_CONFIG_DIR=str(home / "wandb-config"), WANDB_CACHE_DIR=str(home / "wandb-cache"))
    started = time.monotonic()
    # 10 s instead of the default 25 keeps the suite short; the default path measured 32.5 s to
    # the first epoch on the 2-core machine
    proc = subprocess.Popen([sys.executable, "-m", "dist_cifar.train", *smoke_args(out, ["--wandb-init-timeout", "10"])],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, first_epoch_s = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if first_epoch_s is None and line.lstrip().startswith("epoch "):
                first_epoch_s = time.monotonic() - started
        proc.wait(timeout=120)
    finally:
        proc.kill()
    text = "".join(lines)
    assert proc.returncode == 0, text[-3000:]
    assert "logging offline instead" in text and "W&B: logging offline to" in text
    assert first_epoch_s is not None and first_epoch_s < 60, (first_epoch_s, text[-2000:])
    from dist_cifar.config import TrainConfig
    assert TrainConfig().wandb_init_timeout <= 25  # the default leaves 35 s of the 60 for the rest
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_pip_install_then_console_script_under_torchrun_from_another_folder(tmp_path):
    """`pip install .` from a clean copy of the checkout into a fresh venv (its dependencies are
    the ones already installed, seen through a .pth: no index is asked), then the console script
    runs from an unrelated folder, alone and under torchrun, importing the installed package."""
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    src = tmp_path / "clone"
    for rel in tracked:
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes((ROOT / rel).read_bytes())
    venv = tmp_path / "venv"
    # --without-pip: pip and the build backend (setuptools) come from the test venv through the .pth
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site_dir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (Path(site_dir) / "_test_deps.pth").write_text("\n".join(deps) + "\n")
    env = {k: v for k, v in base_env().items() if k != "PYTHONPATH"}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-build-isolation", str(src)],
                             capture_output=True, text=True, timeout=300, env=env)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import dist_cifar; print(dist_cifar.__file__, dist_cifar.__version__)"],
                           cwd=elsewhere, capture_output=True, text=True, env=env, timeout=60).stdout
    from dist_cifar import __version__
    assert where.startswith(site_dir) and where.split()[1] == __version__, where
    script = venv / "bin" / "dist-cifar-train"
    version = subprocess.run([str(script), "--version"], cwd=elsewhere, capture_output=True, text=True, env=env, timeout=60)
    assert version.stdout.strip() == f"dist_cifar {where.split()[1]}"
    out = elsewhere / "run"
    proc = subprocess.run([str(python), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--no-python", str(script), *smoke_args(out)], cwd=elsewhere, capture_output=True,
                          text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["dist_cifar_version"] == where.split()[1]
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [0]
    fetch = subprocess.run([str(venv / "bin" / "dist-cifar-fetch"), str(elsewhere / "data")], cwd=elsewhere,
                           capture_output=True, text=True, env=env, timeout=120)
    assert fetch.returncode == 1 and len(fetch.stderr.strip().splitlines()) == 1 and "--no-download" in fetch.stderr

    # dist-cifar-ablate from an empty folder: the variants run there, on paths relative to it
    write_official_cifar(elsewhere / "mydata", per_batch=20, n_test=20)
    tiny = ["batchnorm", "--variants", "with_bn", "--epochs", "1", "--out", "abl",
            "--extra", "--split full --val-size 20 --no-download --batch-size 16"]
    ablate = venv / "bin" / "dist-cifar-ablate"
    first = subprocess.run([str(ablate), *tiny, "--dataset", "cifar10", "--data-dir", "mydata"], cwd=elsewhere,
                           capture_output=True, text=True, env=env, timeout=240)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    variant = elsewhere / "abl" / "batchnorm-e1" / "with_bn"
    summary = json.loads((variant / "summary.json").read_text())
    assert json.loads((variant / "config.json").read_text())["data_dir"] == str(elsewhere / "mydata")
    row = next(l for l in (variant.parent / "report.md").read_text().splitlines() if l.startswith("| with_bn"))
    assert f"{summary['test_accuracy']:.2f}" in row  # numbers, not just "ok"
    assert not (Path(site_dir) / "runs").exists() and not (Path(site_dir) / "mydata").exists()
    # the same study on other data trains again, beside the first, and says so in one line
    stamp = (variant / "summary.json").stat().st_mtime_ns
    second = subprocess.run([str(ablate), *tiny, "--dataset", "synthetic", "--synthetic-size", "128"], cwd=elsewhere,
                            capture_output=True, text=True, env=env, timeout=240)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    moved = [l for l in second.stdout.splitlines() if "holds results on other data" in l]
    assert len(moved) == 1 and "dataset 'cifar10', not 'synthetic'" in moved[0], second.stdout
    sibling = [d for d in (elsewhere / "abl").iterdir() if d.name.startswith("batchnorm-e1-synthetic-")]
    assert len(sibling) == 1 and (sibling[0] / "with_bn" / "summary.json").exists()
    assert json.loads((sibling[0] / "with_bn" / "config.json").read_text())["dataset"] == "synthetic"
    assert (variant / "summary.json").stat().st_mtime_ns == stamp


def test_help_is_grouped_by_concern_and_shows_the_version():
    import dataclasses

    from dist_cifar import __version__
    from dist_cifar.config import TrainConfig, build_parser, flag_name
    parser = build_parser()
    text = parser.format_help()
    assert f"dist_cifar {__version__}" in text
    titles = [g.title for g in parser._action_groups]
    for concern in ("model", "data", "recipe", "speed", "distributed", "logging", "checkpoints"):
        assert any(t.split(" (")[0] == concern for t in titles), titles
    placed = {a.dest: g.title for g in parser._action_groups for a in g._group_actions}
    for field in dataclasses.fields(TrainConfig):  # every flag sits in a named group, not "options"
        assert placed[field.name] not in ("options", "other"), flag_name(field.name)
    assert placed["download"] == "data" and placed["wandb"].startswith("logging")
    assert placed["global_batch_size"] == "recipe" and placed["compile"].startswith("speed")
