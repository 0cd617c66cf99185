"""launch/*.sh and dist_cifar/launcher.py: setup_env.sh on odd hosts, Ctrl-C to a launch script (checkpoint, exit 75, no traceback), two_hosts.sh stopped by SIGTERM or a dead link, multi-node joins that never come."""
from __future__ import annotations

import pytest
import os
import shutil
import subprocess
import sys
import time

import torch

from conftest import base_env, read_jsonl, ROOT, smoke_args
from dist_cifar import checkpoint as ckpt


def copy_of_the_checkout(tmp_path):
    copy = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for name in files + ["launch/setup_env.sh"]:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, copy / name)
    return copy


def test_setup_on_a_gpu_host_without_wandb_nor_index(tmp_path):
    """The GPU host: a usable torch, no wandb, no package index, and a torch that bounds
    setuptools (torch 2.11 wants <82; a stand-in dist-info says so here). Setup builds .venv, says
    in one line that W&B is off, and asks only for a setuptools within torch's bound."""
    shadow = tmp_path / "shadow"
    (shadow / "wandb").mkdir(parents=True)
    (shadow / "wandb" / "__init__.py").write_text("raise ImportError('no wandb on this host')\n")
    meta = shadow / f"torch-{torch.__version__.split('+')[0]}.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {torch.__version__}\n"
                                   "Requires-Dist: setuptools<82\n")
    copy = copy_of_the_checkout(tmp_path)
    env = base_env(PYTHON=sys.executable, PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/simple",
                   PYTHONPATH=f"{shadow}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(["bash", "launch/setup_env.sh"], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wandb_lines = [l for l in proc.stderr.splitlines() if "wandb" in l]
    assert wandb_lines == ["[setup] wandb is not installed and cannot be installed here: W&B logging is off until "
                           "'pip install wandb' (training is unaffected)"], proc.stderr
    assert "no setuptools>=70.1,<82 to be had" in proc.stderr, proc.stderr  # torch's bound is kept
    run = subprocess.run([str(copy / ".venv/bin/python"), "-m", "dist_cifar.train", "--dataset", "synthetic",
                          "--synthetic-size", "128", "--epochs", "1", "--batch-size", "32", "--model", "linear",
                          "--out-dir", str(tmp_path / "o")], cwd=copy, env={**env, "WANDB_MODE": ""},
                         capture_output=True, text=True, timeout=200)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "wandb is not installed; W&B logging is off" in run.stdout


def test_setup_reuses_an_installed_torch_without_a_package_index(tmp_path):
    """PYTHON has torch (and the rest) already, and no package index answers: setup must build
    .venv from what is installed and install nothing."""
    copy = copy_of_the_checkout(tmp_path)
    env = base_env(PYTHON=sys.executable, PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/simple")
    proc = subprocess.run(["bash", "launch/setup_env.sh"], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"using the installed torch {torch.__version__}" in proc.stderr and "installing" not in proc.stderr
    check = subprocess.run([str(copy / ".venv/bin/python"), "-c",
                            "import torch, dist_cifar; print(torch.__version__, dist_cifar.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120,
                           env={k: v for k, v in env.items() if k != "PYTHONPATH"})
    version, where = check.stdout.split()
    assert version == torch.__version__ and where.startswith(str(copy)), check.stderr
    again = subprocess.run(["bash", "launch/setup_env.sh"], cwd=copy, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and again.stderr == ""  # stamped: nothing to do


def test_launcher_turns_a_preempted_torchrun_into_exit_75(tmp_path):
    """Ctrl-C (SIGINT to the script's process group, as a terminal sends it) reaches the launcher
    once: the workers checkpoint, one line says so, the script returns 75 with no traceback; the
    same command then finishes the run."""
    import signal
    out, log = tmp_path / "run", tmp_path / "log"
    args = smoke_args(out, ["--epochs", "2", "--synthetic-size", "4096", "--batch-size", "16"])
    with open(log, "w") as sink:
        proc = subprocess.Popen(["bash", "launch/single_node.sh", "2", "--", *args], cwd=ROOT,
                                env=base_env(PYTHON=sys.executable), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + 120
        while "an epoch here" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 75, log.read_text()[-3000:]
    text = log.read_text()
    assert "[launch] got SIGINT: asked 2 worker(s) to checkpoint" in text and "[launch] preempted" in text
    assert text.count("preempted (SIGTERM), stopped at epoch 0 step") == 1 and "Traceback" not in text, text[-3000:]
    assert ckpt.find_latest(out) is not None
    done = subprocess.run(["bash", "launch/single_node.sh", "2", "--", *args],
                          cwd=ROOT, env=base_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1]


def test_a_node_that_never_comes_is_waited_for_a_bounded_time(tmp_path):
    """Case 073: multi_node.sh waited silently (torchrun's 600 s) for a node that never came."""
    from conftest import free_port
    started = time.monotonic()
    proc = subprocess.run(["bash", "launch/multi_node.sh", "2", "0", f"127.0.0.1:{free_port()}", "1", "--",
                           "--dataset", "synthetic", "--out-dir", str(tmp_path / "o")], cwd=ROOT,
                          env=base_env(JOIN_TIMEOUT="10", RDZV_ID="lonely", PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=150)
    took = time.monotonic() - started
    assert proc.returncode != 0 and took < 100, took
    assert "waiting up to 10s for all 2 nodes at 127.0.0.1:" in proc.stderr
    assert "[launch] the rendezvous failed (" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.quick
def test_a_bad_flag_under_the_launcher_is_one_line_and_a_deleted_out_dir_stops_the_run(tmp_path):
    """Cases 127 (a bad trainer flag under launch/single_node.sh: torchrun's 42-line report, exit 1)
    and 135 (the out dir deleted during a run was silently re-created without config.json or lock)."""
    import shutil
    bad = subprocess.run(["bash", "launch/single_node.sh", "2", "--", "--bogus"], cwd=ROOT,
                         env=base_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: unknown flag --bogus; see --help"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dist_cifar.train", "--dataset", "synthetic", "--synthetic-size", "8000",
           "--model", "small_cnn", "--batch-size", "32", "--epochs", "20", "--checkpoint-every", "0",
           "--checkpoint-interval-min", "0", "--no-save-best", "--out-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch   0"):
            break
    shutil.rmtree(out, ignore_errors=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    assert "was deleted during the run" in err and "Traceback" not in err


def test_two_hosts_stops_on_sigterm_and_on_a_dead_link(tmp_path):
    """launch/two_hosts.sh, two runs side by side: SIGTERM to the script mid-run checkpoints and
    exits 75; the link taken down mid-run (gloo would wait for its timeout) ends in a bounded
    time. Both leave no namespace and no process behind."""
    import re
    import signal
    runs = {}
    for case in ("sigterm", "link_down"):
        out = tmp_path / case
        log = open(tmp_path / f"{case}.log", "w")
        runs[case] = (out, tmp_path / f"{case}.log", subprocess.Popen(
            ["bash", "launch/two_hosts.sh", "--", *smoke_args(out, ["--synthetic-size", "16384", "--batch-size", "16",
                                                                    "--epochs", "4", "--dist-timeout", "600"])],
            cwd=ROOT, env=base_env(PYTHON=sys.executable, STOP_GRACE_S="60"), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True))
    deadline = time.monotonic() + 180
    for case, (out, log, proc) in runs.items():
        while "an epoch here" not in log.read_text():  # the forecast: steps are running
            if proc.poll() == 77:
                pytest.skip(log.read_text().strip().splitlines()[-1])
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    names = {case: re.search(r"\[two_hosts\] (dcA\w+) \S+ <-> (dcB\w+)", log.read_text()).groups()
             for case, (_, log, _) in runs.items()}
    stopped = time.monotonic()
    runs["sigterm"][2].send_signal(signal.SIGTERM)  # the script only, as `kill <pid>` does
    host_b = names["link_down"][1]
    subprocess.run(["ip", "-n", host_b, "link", "set", "v" + host_b, "down"], check=True, timeout=10)
    codes = {case: proc.wait(timeout=150) for case, (_, _, proc) in runs.items()}
    took = time.monotonic() - stopped
    term_log, link_log = runs["sigterm"][1].read_text(), runs["link_down"][1].read_text()
    assert codes["sigterm"] == 75, term_log[-3000:]
    assert "got SIGTERM: asking both hosts to checkpoint" in term_log and "Traceback" not in term_log
    assert ckpt.find_latest(runs["sigterm"][0]) is not None
    assert codes["link_down"] not in (0, 75) and "the link between the hosts went down" in link_log, link_log[-3000:]
    assert took < 120, took
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in left for pair in names.values() for name in pair), left
    for out, _, _ in runs.values():
        assert subprocess.run(["pgrep", "-f", str(out)], capture_output=True).returncode == 1  # no process left
