"""The second adversarial pass (issue 23): data loss, security, hangs and defects, each case as
the pass reproduced it, on real files and real processes."""
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, base_env, read_jsonl, run_train, write_official_cifar
from conftest import make_tree
from dist_cifar import data as D
from dist_cifar.data import DataError, Split


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


@pytest.mark.skipif(os.getuid() != 0, reason="planting a file owned by another user needs root")
def test_a_cache_planted_by_another_user_is_not_loaded(tmp_path, capsys):
    """Case 092: in a sticky world-writable folder another user planted a cache with the right
    fingerprint (path, size, inode, mtime: anyone can stat them) and all-zero images."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    tarball = shared / "small.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(make_tree(tmp_path / "tree"), arcname="cifar")
    cache = D.cache_path_for(tarball, "imagefolder")
    zeros = torch.zeros(9, 32, 32, 3, dtype=torch.uint8)
    torch.save(dict(version=D.CACHE_VERSION, fingerprint=D.fingerprint([tarball]), train_x=zeros,
                    train_y=torch.zeros(9, dtype=torch.long), test_x=zeros, test_y=torch.zeros(9, dtype=torch.long),
                    classes=["airplane", "cat", "dog"], source="imagefolder"), cache)
    os.chown(cache, 65534, 65534)
    raw = D.load_imagefolder(tarball)
    assert raw.train_x.float().std() > 10  # the real images, decoded again
    assert "owned by uid 65534" in capsys.readouterr().out
    cache.chmod(0o666)
    os.chown(cache, 0, 0)
    assert D.untrusted(cache) == "other users may write to it"


def official_archive(tmp_path: Path) -> Path:
    write_official_cifar(tmp_path / "src")
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive


def test_extraction_never_follows_a_planted_temporary_path(tmp_path):
    """Case 137: a symlink planted as the predictable `.tmp-extract-<pid>` made root write the
    batches into the folder it pointed to."""
    archive = official_archive(tmp_path)
    protected = tmp_path / "protected"
    protected.mkdir()
    for pid in (os.getpid(), os.getpid() + 1):
        (archive.parent / f".tmp-extract-{pid}").symlink_to(protected)
    target = D.extract_cifar10(archive)
    assert D.complete(target) and target.parent == archive.parent
    assert list(protected.iterdir()) == []  # nothing written through the link
    assert all((archive.parent / f".tmp-extract-{pid}").is_symlink() for pid in (os.getpid(), os.getpid() + 1))


def test_two_processes_extracting_one_archive_both_succeed(tmp_path):
    """Cases 094/109: two first ranks on a shared folder; one used to delete the other's live
    extraction and fail with a false 'not the CIFAR-10 python archive'."""
    archive = official_archive(tmp_path)
    code = ("import sys; from pathlib import Path; from dist_cifar.data import extract_cifar10; "
            "print(extract_cifar10(Path(sys.argv[1])))")
    for _ in range(3):
        target = archive.parent / "cifar-10-batches-py"
        if target.exists():
            import shutil
            shutil.rmtree(target)
        procs = [subprocess.Popen([sys.executable, "-c", code, str(archive)], cwd=ROOT, env=base_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], results
        assert D.complete(target) and not list(archive.parent.glob(".tmp-extract-*"))


def test_an_oversized_archive_member_is_refused_before_it_is_read(tmp_path):
    """Case 089: a 3 GiB member of zeros (a few MB packed) was read whole into memory."""
    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as tar:
        for split in ("train", "test"):
            info = tarfile.TarInfo(f"cifar/{split}/cat/big.jpg")
            info.size = D.MAX_IMAGE_BYTES + 1
            tar.addfile(info, io.BytesIO(bytes(info.size)))
    with pytest.raises(DataError, match="not an image this loader reads"):
        D.load_imagefolder(bomb)


def test_eval_batches_are_never_padded_past_the_split():
    """Case 120: --eval-batch-size 100000 on 640 images ran 100,000-row batches (15 GB)."""
    from dist_cifar import distributed as dist_info
    from dist_cifar.assembly import assemble
    from dist_cifar.config import make_config
    split = Split(torch.zeros(640, 32, 32, 3, dtype=torch.uint8), torch.zeros(640, dtype=torch.long))
    run = assemble(make_config(batch_size=32, eval_batch_size=100_000), dist_info.DistInfo(),
                   D.make_splits(D.make_synthetic(128), "full"))
    batches = list(run.shards(split).batches())
    assert len(batches) == 1 and batches[0][0].shape[0] == 640


def test_more_classes_than_outputs_is_one_line(tmp_path):
    """Case 081: an 11-class folder crashed at the first step with 'Target 10 is out of bounds'."""
    tree = make_tree(tmp_path / "tree", per_class=1, classes=tuple(f"c{i:02d}" for i in range(11)))
    proc = run_train(["--dataset", "imagefolder", "--data-dir", str(tree), "--model", "small_cnn", "--epochs", "1",
                      "--batch-size", "4", "--out-dir", str(tmp_path / "o")], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: the image folder has 11 classes under train/ but the models have 10 outputs (CIFAR-10): "
        "keep 10 class folders"]


def test_sixteen_bit_images_are_scaled_and_odd_batches_refused(tmp_path):
    """Cases 077, 090b, 090c: a 16-bit grey ramp came out near-white; float [0, 1] batch data
    became zeros and int64 values above 255 wrapped, silently."""
    ramp = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    decoded = D.decode_image(buf.getvalue(), "ramp.png")
    assert decoded.shape == (32, 32, 3) and 120 < decoded.mean() < 135
    root = write_official_cifar(tmp_path / "data")
    for bad in (np.random.default_rng(0).random((20, 3072), dtype=np.float32),
                np.full((20, 3072), 1020, dtype=np.int64)):
        with open(root / "data_batch_1", "wb") as f:
            pickle.dump({b"data": bad, b"labels": [0] * 20}, f, protocol=2)
        with pytest.raises(DataError, match="not uint8 0..255"):
            D.read_batch(root / "data_batch_1")


def test_a_torn_last_line_does_not_block_resume(tmp_path):
    """Cases 123/123b: the last 40 bytes of metrics.jsonl (or step_losses.jsonl) cut off: every
    resume ended in a JSONDecodeError traceback."""
    out = tmp_path / "run"
    args = ["--dataset", "synthetic", "--synthetic-size", "256", "--model", "small_cnn", "--batch-size", "64",
            "--record-step-losses", "--out-dir", str(out)]
    assert run_train([*args, "--epochs", "2"]).returncode == 0
    for name in ("metrics.jsonl", "step_losses.jsonl"):
        text = (out / name).read_bytes()
        (out / name).write_bytes(text[:-40])
    again = run_train([*args, "--epochs", "3"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2]
    steps = [(r["epoch"], r["step"]) for r in read_jsonl(out / "step_losses.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1][0] == 2


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


B = ["--dataset", "synthetic", "--synthetic-size", "512", "--model", "small_cnn", "--batch-size", "64", "--epochs", "4",
     "--lr", "0.02", "--no-dropout"]


def test_best_pt_is_verified_and_a_good_summary_never_overwritten(tmp_path):
    """Cases 036-038: a missing best.pt made the rerun report the last weights under best_epoch;
    one flipped bit rewrote summary.json with 8.59%; a truncated one was a traceback."""
    out = tmp_path / "run"
    assert run_train([*B, "--out-dir", str(out)]).returncode == 0
    good = (out / "summary.json").read_text()
    best = out / "best.pt"
    original = best.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x40
    for damage, expected in ((None, "is missing"), (bytes(flipped), "does not match its commit marker"),
                             (original[:-1000], "does not match its commit marker")):
        best.unlink(missing_ok=True)
        if damage is not None:
            best.write_bytes(damage)
        proc = run_train([*B, "--out-dir", str(out)])
        assert proc.returncode == 2, proc.stderr[-2000:]
        errors = [l for l in proc.stderr.splitlines() if l.strip()]
        assert len(errors) == 1 and expected in errors[0] and "--no-save-best" in errors[0], errors
        assert (out / "summary.json").read_text() == good
    best.write_bytes(original)
    again = run_train([*B, "--out-dir", str(out)])
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] == json.loads(good)["test_accuracy"]


def test_a_run_that_dies_before_its_first_checkpoint_restarts_with_the_same_command(tmp_path):
    """Cases 022/057/058: torchrun --max-restarts and a plain rerun were refused ('not empty and
    holds no checkpoint') after a crash in the first checkpoint interval."""
    from conftest import smoke_args, torchrun_cmd
    out = tmp_path / "elastic"
    args = smoke_args(out, ["--epochs", "2"])
    proc = subprocess.run(torchrun_cmd(2, args, ["--standalone", "--max-restarts=1"]), cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=base_env(DIST_CIFAR_FAULT="crash:rank=1:step=3:attempt=0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "injected crash" in proc.stderr and "starting it again" in proc.stdout
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1]
    single = tmp_path / "single"
    crashed = run_train(smoke_args(single, ["--epochs", "2"]), DIST_CIFAR_FAULT="crash:rank=0:step=2")
    assert crashed.returncode != 0 and (single / "config.json").exists()
    assert run_train(smoke_args(single, ["--epochs", "2"])).returncode == 0
    other = run_train(smoke_args(single, ["--epochs", "2", "--lr", "0.5"]))  # another run's folder stays refused
    assert other.returncode == 2


def test_a_failed_background_write_stops_the_job_with_one_line(tmp_path):
    """Cases 033/034: failed checkpoint writes were silent, training went on without them, and a
    preemption said 'checkpoint written; exit 75' before dying on the failed rename."""
    args = ["--dataset", "synthetic", "--synthetic-size", "512", "--model", "small_cnn", "--batch-size", "64",
            "--epochs", "6", "--checkpoint-every-steps", "2"]
    periodic = run_train([*args, "--out-dir", str(tmp_path / "a")], DIST_CIFAR_FAULT="fail_save:step=2")
    assert periodic.returncode == 2, periodic.stderr[-2000:]
    assert "error: the checkpoint write failed: OSError" in periodic.stderr
    assert "a checkpoint write in" in periodic.stderr.strip().splitlines()[-1]
    metrics = tmp_path / "a" / "metrics.jsonl"
    assert not metrics.exists() or read_jsonl(metrics) == []  # it stopped at the next save, in epoch 0
    only_preemption = [*args[:-1], "1000"]  # no periodic save in flight: the preemption save is the one that fails
    preempted = run_train([*only_preemption, "--out-dir", str(tmp_path / "b")],
                          DIST_CIFAR_FAULT="preempt:rank=0:step=5;fail_save:step=6")
    assert preempted.returncode == 2, preempted.stderr[-2000:]
    assert "checkpoint written" not in preempted.stderr and "Traceback" not in preempted.stderr


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


def test_ranks_started_with_different_flags_fail_with_one_line(tmp_path):
    """Cases 066/067: two ranks started by hand with different --lr (or --epochs) trained
    diverging replicas silently, or hung until the collective timeout."""
    from conftest import free_port, smoke_args
    port = free_port()
    procs = []
    for rank, extra in ((0, []), (1, ["--lr", "0.01"])):
        env = base_env(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "dist_cifar.train",
                                       *smoke_args(tmp_path / f"o{rank}", ["--dist-timeout", "30", *extra])],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], results
    for _, err in results:
        assert "error: rank 1 was started with --lr 0.01 but rank 0 with 0.001" in err, err


def test_user_strings_are_printed_literally(tmp_path):
    """Cases 084/083: an out dir with `[/` ended a finished run with rich's MarkupError (exit 1);
    a class folder `cat[red]` was shown as `cat`."""
    tree = make_tree(tmp_path / "tree", per_class=2, classes=("cat[red]", "dog"))
    out = tmp_path / "n084[/]x"
    proc = run_train(["--dataset", "imagefolder", "--data-dir", str(tree), "--model", "small_cnn", "--epochs", "1",
                      "--batch-size", "2", "--val-size", "0", "--out-dir", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "n084[/]x" in proc.stdout and "test acc cat[red]" in proc.stdout


def test_resume_refuses_recipe_changes_outside_the_identity(tmp_path):
    """Cases 042/055/056: a changed --batch-size, a lowered --epochs on a finished run and a
    --steps-per-epoch below the resume step were accepted."""
    from conftest import smoke_args
    out = tmp_path / "run"
    assert run_train(smoke_args(out, ["--epochs", "2", "--synthetic-size", "512"])).returncode == 0
    for extra, named in ((["--batch-size", "64"], "--batch-size"), (["--epochs", "1"], "more than --epochs 1")):
        proc = run_train(smoke_args(out, ["--epochs", "2", "--synthetic-size", "512", *extra]))
        assert proc.returncode == 2 and named in proc.stderr, proc.stderr[-1500:]
    mid = tmp_path / "mid"
    stop = run_train(smoke_args(mid, ["--epochs", "2", "--synthetic-size", "512"]), DIST_CIFAR_FAULT="preempt:rank=0:step=9")
    assert stop.returncode == 75
    low = run_train(smoke_args(mid, ["--epochs", "2", "--synthetic-size", "512", "--steps-per-epoch", "1"]))
    assert low.returncode == 2 and "--steps-per-epoch" in low.stderr, low.stderr[-1500:]


@pytest.mark.parametrize("cmd, named", [
    (["bash", "launch/single_node.sh", "abc", "--"], "NPROC must be a positive number"),
    (["bash", "launch/single_node.sh", "0", "--"], "NPROC must be a positive number"),
    (["bash", "slurm/train.sbatch"], "submit it with sbatch"),
    ([sys.executable, "-m", "dist_cifar.cost", "--peak-tflops", "0"], "must be > 0"),
    ([sys.executable, "-m", "dist_cifar.train", "--weight-decay", "1e308"], "overflow float32"),
    ([sys.executable, "-m", "dist_cifar.train", "--seed", "99999999999999999999"], "--seed must be in"),
    ([sys.executable, "benchmarks/epoch_time.py", "--rungs", "99"], "--rungs must be within"),
    ([sys.executable, "benchmarks/checkpoint.py", "--repeats", "0"], "--repeats must be > 0"),
])
def test_bad_input_is_one_line_not_a_traceback(cmd, named):
    """Cases 118, 124, 126, 127, 129."""
    proc = subprocess.run(cmd, cwd=ROOT, env=base_env(PYTHON=sys.executable, SLURM_JOB_ID=""), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert named in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_strays_are_cleaned_and_unmarked_checkpoints_named(tmp_path):
    """Cases 030r/035/049: `.tmp-best.pt-<pid>` of a dead run stayed forever; a checkpoint renamed
    without its marker stayed, and when it was the newest the resume took an older one silently."""
    from conftest import smoke_args
    from dist_cifar import checkpoint as ckpt
    out = tmp_path / "run"
    assert run_train(smoke_args(out, ["--epochs", "2", "--keep-last", "3"])).returncode == 0
    (out / ".tmp-best.pt-999999").write_bytes(b"half")
    newest = ckpt.committed(out)[-1]
    unmarked = out / ckpt.checkpoint_name(9, 0)
    unmarked.write_bytes(newest.read_bytes())  # a rename whose marker never came
    older = out / ckpt.checkpoint_name(0, 3)
    older.write_bytes(b"x")
    proc = run_train(smoke_args(out, ["--epochs", "3", "--keep-last", "3"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"ignoring checkpoint {unmarked.name}: it has no commit marker" in proc.stdout
    assert not (out / ".tmp-best.pt-999999").exists() and not older.exists()


def test_messages_say_what_is_true(tmp_path):
    """Cases 046/047 (another format told to --resume none, which was refused), 020 (--resume none
    'holds no checkpoint'), 088 (a valid .zip called a corrupt archive)."""
    from conftest import smoke_args
    from dist_cifar import checkpoint as ckpt
    out = tmp_path / "run"
    assert run_train(smoke_args(out)).returncode == 0
    path = ckpt.committed(out)[-1]
    blob = torch.load(path, weights_only=True)
    blob["format"] = 3
    torch.save(blob, path)
    ckpt.save(out, blob, 5, 0, keep_last=5)  # committed, but of another format
    proc = run_train(smoke_args(out, ["--epochs", "6"]))
    assert proc.returncode == 2 and "another dist_cifar version (format 3; this one reads 2)" in proc.stderr
    assert "--overwrite" in proc.stderr and "--resume none" not in proc.stderr
    none = run_train(smoke_args(out, ["--resume", "none"]))
    assert none.returncode == 2 and "--resume none: --out-dir" in none.stderr and "holds no checkpoint" not in none.stderr
    import zipfile
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("train/cat/0.png", b"x")
    with pytest.raises(DataError, match="is a zip file"):
        D.load_imagefolder(archive)


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


def test_odd_folders_and_flags_are_said_not_guessed(tmp_path):
    """Cases 079b (an empty class folder shifted every label), 095 (an image one folder too deep,
    silently ignored), 090e (11 names in batches.meta), 119 (--print-config printed 'auto'),
    121b/122 (ablate and plot tracebacks)."""
    tree = make_tree(tmp_path / "tree", per_class=1)
    (tree / "train" / "bird").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        D.load_imagefolder(tree)
    (tree / "train" / "bird").rmdir()
    deep = tree / "train" / "cat" / "more"
    deep.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(deep / "x.png")
    printed = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                              "from dist_cifar.data import load_imagefolder; load_imagefolder(Path(sys.argv[1]))",
                              str(tree)], cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=60)
    assert "ignoring 1 image(s) deeper than train/<class>/<image>" in printed.stdout, printed.stderr
    root = write_official_cifar(tmp_path / "data")
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(11)]}, f, protocol=2)
    with pytest.raises(DataError, match="names 11 classes"):
        D.load_cifar10(tmp_path / "data")
    shown = run_train(["--print-config"])
    config = json.loads(shown.stdout)
    assert config["precision"] == "fp32" and config["compile"] is False and config["guard_every"] == 1
    for cmd, named in (([sys.executable, "-m", "dist_cifar.ablate", "batchnorm", "--extra", "--lr '1"], "--extra"),
                       ([sys.executable, "-m", "dist_cifar.ablate", "batchnorm", "--out", str(tmp_path / "f.txt")],
                        "is a file"),
                       ([sys.executable, "-m", "dist_cifar.plot", str(tmp_path / "none")], "error:")):
        (tmp_path / "f.txt").write_text("x")
        proc = subprocess.run(cmd, cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and named in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    empty = subprocess.run([sys.executable, "-m", "dist_cifar.ablate", "all", "--report-only", "--out",
                            str(tmp_path / "missing")], cwd=ROOT, env=base_env(), capture_output=True, text=True,
                           timeout=60)
    assert empty.returncode == 0 and "Traceback" not in empty.stderr, empty.stderr


def test_preemption_during_a_write_keeps_the_write_in_flight(tmp_path):
    """Case 039: SIGTERM while a checkpoint write was in flight: the preemption save waited for it,
    then started a second one, and torchrun's kill 30 s after the signal lost both."""
    from conftest import smoke_args
    from dist_cifar import checkpoint as ckpt
    out = tmp_path / "run"
    args = smoke_args(out, ["--epochs", "2", "--synthetic-size", "512", "--checkpoint-every-steps", "2"])
    stop = run_train(args, DIST_CIFAR_FAULT="slow_save:step=4:seconds=6;preempt:rank=0:step=5")
    assert stop.returncode == 75, stop.stderr[-2000:]
    assert "the checkpoint in flight (ckpt-e0000-s0000004.pt) was finished and kept" in stop.stderr
    assert ckpt.committed(out)[-1].name == "ckpt-e0000-s0000004.pt"
    again = run_train(args)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-2000:]


def test_sigterm_during_the_final_evaluation_exits_75_promptly(tmp_path):
    """Case 151: SIGTERM during the final evaluation was ignored (the flag was read only in the
    step loop) and SIGKILL came 30 s later with no summary."""
    import signal
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dist_cifar.train", "--dataset", "synthetic", "--synthetic-size", "24000",
           "--model", "small_cnn", "--batch-size", "32", "--steps-per-epoch", "2", "--epochs", "1",
           "--eval-batch-size", "32", "--out-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch   0"):
            break
    time.sleep(0.5)  # inside the evaluation of the 24,000 training images
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert time.monotonic() - signalled < 25
    assert "preempted during the final evaluation" in err and not (out / "summary.json").exists()
    # (a rerun of a finished run only evaluates: test_parallel's resharding test does that)


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


def test_workers_stop_with_a_checkpoint_when_torchrun_is_killed(tmp_path):
    """Cases 064/065: SIGKILL to torchrun left its workers (in their own sessions) training on to
    the end. Each worker now notices its launcher is gone at the next agreement and stops there
    with a checkpoint, as on preemption."""
    import signal
    from conftest import torchrun_cmd
    from dist_cifar import checkpoint as ckpt
    out = tmp_path / "run"
    args = ["--dataset", "synthetic", "--synthetic-size", "4000", "--model", "small_cnn", "--batch-size", "16",
            "--epochs", "30", "--out-dir", str(out), "--dist-timeout", "60"]
    log = open(tmp_path / "log", "w")
    launcher = subprocess.Popen(torchrun_cmd(2, args), cwd=ROOT, env=base_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ckpt.committed(out):
        time.sleep(0.5)
    assert ckpt.committed(out), (tmp_path / "log").read_text()[-2000:]
    launcher.send_signal(signal.SIGKILL)
    launcher.wait(timeout=30)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        alive = subprocess.run(["pgrep", "-f", f"dist_cifar.train.*{out}"], capture_output=True, text=True).stdout.split()
        if not alive:
            break
        time.sleep(1)
    log.close()
    assert not alive, (tmp_path / "log").read_text()[-2000:]
    assert "preempted (torchrun died)" in (tmp_path / "log").read_text()
    last = ckpt.committed(out)[-1].name
    assert last != ckpt.checkpoint_name(30, 0) and not last.endswith("-s0000000.pt")  # early, mid-epoch
