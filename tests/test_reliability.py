"""Never lose, mix or mislabel a run; every bad input gets one line. One test per defect of the
adversarial pass (numbered as in the issue); each failed on the code before the fix."""
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from conftest import ROOT, base_env, read_jsonl, run_train, smoke_args, write_official_cifar
from dist_cifar import checkpoint as ckpt
from dist_cifar.config import make_config
from dist_cifar.data import load_cifar10
from dist_cifar.rundir import default_out_dir
from conftest import make_tree


def one_line(proc, code=2) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------- run directories


def test_01_resume_refuses_another_recipe_and_allows_more_epochs(tmp_path):
    out = tmp_path / "run"
    assert run_train(smoke_args(out)).returncode == 0
    config = (out / "config.json").read_text()
    for flag, value in (("--lr", "0.01"), ("--synthetic-size", "512")):
        line = one_line(run_train([*smoke_args(out), flag, value]))
        assert flag.lstrip("-").replace("-", "_") + "=" in line and "--overwrite" in line
    assert (out / "config.json").read_text() == config  # nothing touched
    longer = run_train(smoke_args(out, ["--epochs", "2"]))  # a constant schedule may grow
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1]


def test_02_resume_path_into_another_finished_run_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_train(smoke_args(a)).returncode == 0
    assert run_train(smoke_args(b, ["--seed", "5"])).returncode == 0
    summary, kept = (b / "summary.json").read_text(), [p.name for p in ckpt.committed(b)]
    line = one_line(run_train([*smoke_args(b), "--resume", str(ckpt.committed(a)[-1]), "--epochs", "2"]))
    assert "holds another run" in line
    assert (b / "summary.json").read_text() == summary and [p.name for p in ckpt.committed(b)] == kept
    empty = tmp_path / "c"
    fresh = run_train([*smoke_args(empty), "--resume", str(ckpt.committed(a)[-1]), "--epochs", "2"])
    assert fresh.returncode == 0 and "resumed from" in fresh.stdout  # an empty out dir is fine


def test_03_one_run_per_out_dir_and_unique_default_names(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "dist_cifar.train", *smoke_args(out, ["--epochs", "200"])],
                             cwd=ROOT, env=base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (out / "metrics.jsonl").exists():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.2)
        line = one_line(run_train(smoke_args(out)))
        assert "in use by a running job" in line and f"pid {first.pid}" in line
    finally:
        first.kill()
        first.wait(timeout=30)
    epochs = [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")]
    assert epochs == sorted(set(epochs))  # only the first run wrote there
    cfg = make_config()
    assert len({default_out_dir(cfg) for _ in range(20)}) == 20  # same second, different names


def test_04_prune_never_keeps_a_corrupt_file_instead_of_the_new_one(tmp_path):
    """Resumed from e1 after e2 turned out corrupt: the preemption save e1-s5 with --keep-last 1
    used to be pruned in favour of the corrupt (newer-named) e2, leaving nothing loadable."""
    blob = {"format": ckpt.FORMAT, "config": {}, "w": 1}
    ckpt.save(tmp_path, blob, 1, 0, keep_last=3)
    e2 = ckpt.save(tmp_path, blob, 2, 0, keep_last=3)
    e2.write_bytes(e2.read_bytes()[:-10] + b"corrupted!")
    ckpt._VERIFIED.clear()
    new = ckpt.save(tmp_path, blob, 1, 5, keep_last=1)
    assert new.exists() and ckpt.find_latest(tmp_path) == new
    assert e2.exists()  # the corrupt file is neither counted nor deleted
    assert not (tmp_path / ckpt.checkpoint_name(1, 0)).exists()  # older than the kept one


def test_05_resume_path_is_verified_best_pt_explained_and_advice_works(tmp_path):
    out = tmp_path / "run"
    assert run_train(smoke_args(out, ["--epochs", "2", "--keep-last", "2"])).returncode == 0
    oldest = ckpt.committed(out)[0]
    oldest.write_bytes(oldest.read_bytes()[:-10] + b"corrupted!")
    line = one_line(run_train([*smoke_args(out), "--resume", str(oldest)]))
    assert "does not match its commit marker" in line
    line = one_line(run_train([*smoke_args(tmp_path / "o2"), "--resume", str(out / "best.pt")]))
    assert "weights only" in line
    line = one_line(run_train([*smoke_args(out), "--model", "simple_cnn"]))
    assert "--overwrite" in line and "--resume none" not in line
    advised = run_train([*smoke_args(out), "--model", "simple_cnn", "--overwrite"])
    assert advised.returncode == 0  # the advice works


def test_06_longer_onecycle_run_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    assert run_train(smoke_args(out, ["--schedule", "onecycle"])).returncode == 0
    config = (out / "config.json").read_text()
    line = one_line(run_train(smoke_args(out, ["--schedule", "onecycle", "--epochs", "2"])))
    assert "onecycle" in line and "--epochs 2" in line
    assert (out / "config.json").read_text() == config


def test_07_unwritable_out_dir_fails_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker / "run", "/proc/dist_cifar_run"):
        proc = run_train(["--dataset", "cifar10", "--data-dir", str(tmp_path / "no_data"), "--out-dir", str(out)],
                         timeout=60)
        assert "--out-dir" in one_line(proc) and "CIFAR-10" not in proc.stderr  # before the data


# ---------------------------------------------------------------------------- data


def official_archive(tmp_path, name="good") -> Path:
    src = write_official_cifar(tmp_path / f"src_{name}")
    archive = tmp_path / f"{name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    return archive


def test_08_archive_without_batch_files_is_one_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "readme.txt").write_text("not cifar")
    with tarfile.open(data / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "readme.txt", arcname="readme.txt")
    t0 = time.monotonic()
    line = one_line(run_train(["--dataset", "cifar10", "--data-dir", str(data), "--out-dir", str(tmp_path / "o")],
                              timeout=60))
    assert "lacks cifar-10-batches-py" in line and time.monotonic() - t0 < 60
    assert sorted(p.name for p in data.iterdir()) == ["cifar-10-python.tar.gz"]  # nothing half-made


def test_09_truncated_archive_leaves_nothing_and_recovers(tmp_path):
    good = official_archive(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "cifar-10-python.tar.gz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    args = ["--dataset", "cifar10", "--data-dir", str(data), "--split", "full", "--val-size", "10",
            "--batch-size", "8", "--epochs", "1"]
    assert "corrupt archive" in one_line(run_train([*args, "--out-dir", str(tmp_path / "o1")]))
    assert not (data / "cifar-10-batches-py").exists() and not list(data.glob(".tmp-extract-*"))
    # an incomplete folder from an older extraction is replaced once a good archive is there
    (data / "cifar-10-batches-py").mkdir()
    (data / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"partial")
    (data / "cifar-10-python.tar.gz").write_bytes(good.read_bytes())
    proc = run_train([*args, "--out-dir", str(tmp_path / "o2")])
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_10_good_archive_on_read_only_storage_extracts_to_the_cache(tmp_path):
    data = tmp_path / "ro"
    data.mkdir()
    (data / "cifar-10-python.tar.gz").write_bytes(official_archive(tmp_path).read_bytes())
    data.chmod(0o555)
    try:
        env = base_env(XDG_CACHE_HOME=str(tmp_path / "cache"))
        proc = run_train(["--dataset", "cifar10", "--data-dir", str(data), "--split", "full", "--val-size", "10",
                          "--batch-size", "8", "--epochs", "1", "--out-dir", str(tmp_path / "o")], env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert sorted(p.name for p in data.iterdir()) == ["cifar-10-python.tar.gz"]
        assert list((tmp_path / "cache").rglob("data_batch_5"))
    finally:
        data.chmod(0o755)


def test_11_auto_with_corrupt_cifar10_is_an_error_not_a_fallback(tmp_path):
    root = write_official_cifar(tmp_path / "data")
    (root / "data_batch_3").write_bytes(b"garbage")
    line = one_line(run_train(["--dataset", "auto", "--data-dir", str(tmp_path / "data"),
                               "--out-dir", str(tmp_path / "o")]))
    assert "corrupt CIFAR-10 batch file" in line and "data_batch_3" in line
    assert not (tmp_path / "o" / "summary.json").exists()


def test_12_cache_sees_a_same_size_change_and_cleans_stale_temps(tmp_path):
    write_official_cifar(tmp_path / "data", seed=0)
    folder = tmp_path / "data" / "cifar-10-batches-py"
    first = load_cifar10(tmp_path / "data")
    batch = folder / "data_batch_1"
    before = batch.stat().st_size
    import pickle
    with open(batch, "rb") as f:
        content = pickle.load(f, encoding="bytes")
    content[b"data"] = content[b"data"][::-1].copy()  # the same bytes in another order: same file size
    with open(batch, "wb") as f:
        pickle.dump(content, f, protocol=2)
    assert batch.stat().st_size == before
    assert not (load_cifar10(tmp_path / "data").train_x == first.train_x).all()
    stale = folder / ".dist_cifar_cache_cifar10.pt.tmp99999999"
    stale.write_bytes(b"x" * 1000)
    import os
    import time
    os.utime(stale, (time.time() - 7200, time.time() - 7200))  # a dead writer's, untouched for two hours
    live = folder / ".dist_cifar_cache_cifar10.pt.tmp99999998"
    live.write_bytes(b"x")  # another process writing its cache right now (case 093): kept
    load_cifar10(tmp_path / "data")
    assert not stale.exists() and live.exists()


def test_13_small_image_folder_gets_a_validation_split_that_fits(tmp_path):
    tree = make_tree(tmp_path / "tree", per_class=20)  # 60 training images
    out = tmp_path / "run"
    proc = run_train(["--dataset", "imagefolder", "--data-dir", str(tree), "--batch-size", "8", "--epochs", "1",
                      "--out-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    sizes = json.loads((out / "config.json").read_text())["split_sizes"]
    assert sizes == {"train": 54, "val": 6, "test": 60}  # 10% held out
    line = one_line(run_train(["--dataset", "imagefolder", "--data-dir", str(tree), "--val-size", "60",
                               "--out-dir", str(tmp_path / "o2")]))
    assert "--val-size 60" in line


# ---------------------------------------------------------------------------- flags and launch


# 14 (numeric flags) and 15 (one-line argparse errors, no abbreviations): test_train's BAD_FLAGS
# cases, in-process for every flag and through the real entry point for exit 2 and one line.


def test_16_launcher_turns_a_preempted_torchrun_into_exit_75(tmp_path):
    out = tmp_path / "run"
    env = base_env(PYTHON=sys.executable, DIST_CIFAR_FAULT="preempt:rank=0:step=3")
    proc = subprocess.run(["bash", "launch/single_node.sh", "2", "--", *smoke_args(out, ["--epochs", "2"])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "[launch] preempted" in proc.stderr and "exitcode" in proc.stderr
    assert ckpt.find_latest(out) is not None
    env.pop("DIST_CIFAR_FAULT")
    done = subprocess.run(["bash", "launch/single_node.sh", "2", "--", *smoke_args(out, ["--epochs", "2"])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1]
