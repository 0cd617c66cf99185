"""dist_cifar/reporting.py and plot.py: metrics.jsonl, W&B offline runs read back, console output on and off a TTY, plots, the per-epoch keys."""
from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import time
from dist_cifar import cost, wandb_offline as wandb_reader

import pytest

from conftest import base_env, free_port, make_tree, read_jsonl, ROOT, run_torchrun, run_train, smoke_args


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


ANSI = re.compile(r"\x1b\[")


def offline_runs(out):
    return sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_two_process_offline_run_logs_every_epoch_once(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    # no --wandb flag: W&B is on by default, and WANDB_MODE=offline says how
    proc = run_torchrun(2, smoke_args(out, ["--epochs", "3", "--ddp-comm-hook", "allreduce", "--log-every-steps", "3",
                                            "--peak-tflops", "0.25"]),
                        WANDB_MODE="offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = offline_runs(out)
    assert len(files) == 1 and len(list((out / "wandb").glob("offline-run-*"))) == 1  # rank 0 only
    history = wandb_reader.history(files[0])
    rows = wandb_reader.epoch_rows(history)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert row["epoch_time_s"] > 0 and row["images_per_s"] > 0 and row["comm_s"] > 0
        assert row["rank_time_max_s"] >= row["rank_time_min_s"] > 0
    config = wandb_reader.config(files[0])
    assert config["world_size"] == 2 and config["global_batch_size"] == 64 and config["model"] == "small_cnn"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert config["torch_version"] and config["device_name"] == "cpu" and config["git_commit"] == (head or "unknown")
    run_id = wandb_reader.run_id(files[0])
    assert (out / "wandb_run_id.txt").read_text() == run_id
    assert "wandb sync" in proc.stdout
    assert proc.stdout.count("W&B: logging offline to") == 1  # where, said once, at the start
    assert "FutureWarning" not in proc.stderr and "Warning" not in proc.stdout  # no per-rank library noise
    # metrics.jsonl carries exactly the keys W&B got
    metrics = read_jsonl(out / "metrics.jsonl")
    for line, row in zip(metrics, rows):
        assert set(line) == {k for k in row if not k.startswith("_")}
        assert line["epoch_time_s"] == pytest.approx(row["epoch_time_s"])
    # per-step rows every 3 optimizer steps, counted over the run (4 per epoch), the same in
    # step_metrics.jsonl and W&B
    step_rows = read_jsonl(out / "step_metrics.jsonl")
    assert [r["global_step"] for r in step_rows] == [3, 6, 9, 12]
    sent = wandb_reader.step_rows(history)
    assert [r["global_step"] for r in sent] == [3, 6, 9, 12]
    from dist_cifar.reporting import STEP_KEYS
    for line, row in zip(step_rows, sent):
        assert set(line) == set(STEP_KEYS) - {"step_grad_norm"}  # no clipping
        assert {k: v for k, v in line.items() if k not in ("epoch", "step")} == \
            {k: v for k, v in row.items() if not k.startswith("_")}
        assert line["epoch"] == (line["global_step"] - 1) // 4 and line["step"] == line["global_step"] - 4 * line["epoch"]
        assert line["step_images_per_s"] > 0 and line["step_lr"] == metrics[0]["lr"]
        # MFU against the given peak: images/s x FLOPs per image / (2 ranks x peak)
        flops = cost.measure("small_cnn").train_flops_per_image
        assert line["step_mfu"] == pytest.approx(line["step_images_per_s"] * flops / (2 * 0.25e12))
    assert config["mfu_peak_tflops"] == 0.25 and config["mfu_peak_source"] == "--peak-tflops"
    assert all(0 < r["step_loss"] < 5 for r in step_rows)


def test_resumed_job_continues_the_same_run(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    first = run_train(smoke_args(out, ["--epochs", "2", "--wandb", "offline"]), WANDB_MODE="offline")
    assert first.returncode == 0, first.stderr[-2000:]
    run_id = (out / "wandb_run_id.txt").read_text()
    second = run_train(smoke_args(out, ["--epochs", "3", "--wandb", "offline"]), WANDB_MODE="offline")
    assert second.returncode == 0, second.stderr[-2000:]
    files = offline_runs(out)
    assert len(files) == 2 and {wandb_reader.run_id(f) for f in files} == {run_id}
    later = max(files, key=lambda f: f.parent.name)
    earlier = wandb_reader.history(min(files, key=lambda f: f.parent.name))
    assert [r["epoch"] for r in wandb_reader.epoch_rows(wandb_reader.history(later))] == [2]  # no duplicate
    # step rows (about four per epoch) continue where the first start's ended, none sent twice
    first_steps = [r["global_step"] for r in wandb_reader.step_rows(earlier)]
    later_steps = [r["global_step"] for r in wandb_reader.step_rows(wandb_reader.history(later))]
    assert first_steps and later_steps and max(first_steps) < min(later_steps)
    assert [r["global_step"] for r in read_jsonl(out / "step_metrics.jsonl")] == first_steps + later_steps
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2]
    # the last line names both starts' folders, so one command uploads epochs 0-1 too
    sync = [l for l in second.stdout.splitlines() if "upload it with: wandb sync" in l]
    assert len(sync) == 1 and all(str(f.parent) in sync[0] for f in files), sync


@pytest.mark.quick
def test_plain_output_without_a_tty(tmp_path):
    proc = run_train(smoke_args(tmp_path / "run", ["--epochs", "3"]))
    assert proc.returncode == 0
    assert not ANSI.search(proc.stdout) and "\r" not in proc.stdout
    epoch_lines = [l for l in proc.stdout.splitlines() if l.startswith("epoch ")]
    assert len(epoch_lines) == 3 and all("img/s" in l and "val_loss" in l for l in epoch_lines)


def test_progress_bar_on_a_tty(tmp_path):
    leader, follower = pty.openpty()
    args = smoke_args(tmp_path / "run", ["--epochs", "2", "--progress-every", "1", "--synthetic-size", "1024"])
    proc = subprocess.Popen([sys.executable, "-m", "dist_cifar.train", *args], cwd=ROOT, env=base_env(TERM="xterm"),
                            stdout=follower, stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert ANSI.search(text)  # a live display, redrawn in place
    assert "img/s" in text and "loss" in text and "epoch 0" in text and "━" in text


@pytest.mark.quick
def test_quiet_prints_only_the_summary(tmp_path):
    proc = run_train(smoke_args(tmp_path / "run", ["--quiet"]))
    assert proc.returncode == 0 and "epoch   0" not in proc.stdout and "best_test_accuracy" in proc.stdout


def test_plot_overlays_runs(tmp_path):
    for name in ("a", "b"):
        assert run_train(smoke_args(tmp_path / name, ["--epochs", "2"])).returncode == 0
    out = tmp_path / "cmp.png"
    proc = subprocess.run([sys.executable, "-m", "dist_cifar.plot", str(tmp_path / "a"), str(tmp_path / "b"),
                           "--out", str(out)], cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "dist_cifar.plot", str(tmp_path / "nope")], cwd=ROOT,
                         env=base_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "metrics.jsonl" in bad.stderr


@pytest.mark.quick
def test_readme_and_key_docs_match_what_epoch_record_emits():
    """The keys epoch_record really produces (None-valued ones included: they appear with
    --ddp-comm-hook / --compile) == reporting.EPOCH_KEYS == docs/reference.md's per-epoch table."""
    from dist_cifar import distributed as D
    from dist_cifar.assembly import assemble
    from dist_cifar.config import make_config
    from dist_cifar.data import make_splits, make_synthetic
    from dist_cifar.engine import EpochResult, EpochSums
    from dist_cifar.reporting import EPOCH_KEYS
    from dist_cifar.train import epoch_record
    run = assemble(make_config(batch_size=32), D.DistInfo(), make_splits(make_synthetic(128), "full"))
    result = EpochResult(epoch=0, sums=EpochSums(10.0, 5, 32), steps=1, end_step=1, wall_s=0.5, data_wait_s=0.1)
    emitted = set(epoch_record(run, result, None, eval_s=0.0, partial=True, compile_s=None, reporter=None))
    assert emitted == set(EPOCH_KEYS)
    reference = (ROOT / "docs" / "reference.md").read_text()
    table = reference[reference.index("Logged once per epoch"):].split("\n\n")[1]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M))
    assert documented == emitted
    from dist_cifar.reporting import STEP_KEYS
    table = reference[reference.index("Logged every `--log-every-steps N`"):].split("\n\n")[1]
    assert set(re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M)) == set(STEP_KEYS)


@pytest.mark.quick
def test_user_strings_are_printed_literally(tmp_path):
    """Cases 084/083: an out dir with `[/` ended a finished run with rich's MarkupError (exit 1);
    a class folder `cat[red]` was shown as `cat`."""
    tree = make_tree(tmp_path / "tree", per_class=2, classes=("cat[red]", "dog"))
    out = tmp_path / "n084[/]x"
    proc = run_train(["--dataset", "imagefolder", "--data-dir", str(tree), "--model", "small_cnn", "--epochs", "1",
                      "--batch-size", "2", "--val-size", "0", "--out-dir", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "n084[/]x" in proc.stdout and "test acc cat[red]" in proc.stdout


def test_wandb_problems_never_end_a_run(tmp_path):
    """Cases 140 (unwritable wandb/), 144 (WANDB_MODE=garbage: a pydantic traceback), 138 (a run
    id with '/' made every resume fail), 152 (a fork into another folder reused the W&B run)."""
    from conftest import smoke_args
    garbage = run_train(smoke_args(tmp_path / "g"), WANDB_MODE="garbage")
    assert garbage.returncode == 2 and "WANDB_MODE='garbage' is not one of" in garbage.stderr
    out = tmp_path / "run"
    out.mkdir()
    (out / "wandb").write_text("a file where the folder should be")
    blocked = run_train([*smoke_args(out), "--wandb", "offline", "--overwrite"], WANDB_MODE="offline")
    assert blocked.returncode == 0, blocked.stderr[-2000:]
    assert "W&B could not start" in blocked.stdout
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "wandb_run_id.txt").write_text("../../escape")
    odd = run_train(smoke_args(bad, ["--overwrite"]), WANDB_MODE="offline")
    assert odd.returncode == 0, odd.stderr[-2000:]
    src = tmp_path / "src"
    assert run_train(smoke_args(src), WANDB_MODE="offline").returncode == 0
    first_id = (src / "wandb_run_id.txt").read_text()
    from dist_cifar import checkpoint as ckpt
    fork = run_train([*smoke_args(tmp_path / "fork", ["--epochs", "2"]), "--resume", str(ckpt.committed(src)[-1])],
                     WANDB_MODE="offline")
    assert fork.returncode == 0, fork.stderr[-2000:]
    assert "a fork of" in fork.stdout and (tmp_path / "fork" / "wandb_run_id.txt").read_text() != first_id


@pytest.mark.quick
def test_wandb_online_without_wandb_installed_is_one_line(tmp_path):
    """A wandb that fails to import, as on a host without it: exit 2 before any work."""
    shadow = tmp_path / "shadow" / "wandb"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    from conftest import ROOT, base_env
    env = base_env()
    env["PYTHONPATH"] = f"{tmp_path / 'shadow'}:{ROOT}"
    proc = run_train(["--wandb", "online", "--out-dir", str(tmp_path / "o")], timeout=60, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--wandb" in lines[0] and "pip install wandb" in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.quick
def test_a_binary_wandb_run_id_starts_a_new_run_instead_of_turning_wandb_off(tmp_path):
    """Minor item of reliability pass 3: binary bytes in wandb_run_id.txt raised UnicodeDecodeError
    inside the W&B start, which turned W&B off for every later resume."""
    from dist_cifar.reporting import saved_run_id, usable_run_id
    (tmp_path / "wandb_run_id.txt").write_bytes(b"\xff\xfe\x00junk")
    notes = []
    assert usable_run_id(saved_run_id(tmp_path), notes.append) == "" and "ignoring the W&B run id" in notes[0]
    (tmp_path / "wandb_run_id.txt").write_text("abc_123\n")
    assert usable_run_id(saved_run_id(tmp_path), notes.append) == "abc_123" and len(notes) == 1
    assert saved_run_id(tmp_path / "absent") == ""


@pytest.mark.quick
def test_mfu_peak_is_named_and_never_guessed():
    assert cost.peak_tflops("NVIDIA H200", "bf16") == (989.4, "H200 bf16 dense, datasheet")
    assert cost.peak_tflops("NVIDIA H100 PCIe", "fp16")[0] == 756.0  # not the SXM part's figure
    assert cost.peak_tflops("NVIDIA A100-SXM4-80GB", "fp32", tf32=True)[0] == 156.0
    assert cost.peak_tflops("NVIDIA A100-SXM4-80GB", "fp32")[0] == 19.5
    assert cost.peak_tflops("cpu", "fp32", given=1.5) == (1.5, "--peak-tflops")
    peak, why = cost.peak_tflops("cpu", "bf16")
    assert peak == 0.0 and "--peak-tflops" in why
    assert cost.peak_tflops("Tesla V100-SXM2-16GB", "bf16")[0] == 0.0  # no bf16 tensor cores: no peak
