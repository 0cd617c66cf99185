"""dist_cifar/data.py: the official pickles and archive, image folders and tarballs, synthetic data, splits, the decode cache, bad archives."""
from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import base_env, make_tree, official_archive, official_archive_in_data, one_line, ROOT, run_train, write_image_tarball, write_official_cifar
from dist_cifar.config import ConfigError, make_config
from dist_cifar.data import (DataError, load_cifar10, load_imagefolder, load_source, make_splits, make_synthetic, RawData)
from dist_cifar import data as D


@pytest.mark.quick
def test_official_pickles_parse_through_real_code(official_cifar):
    raw = load_cifar10(official_cifar)
    assert raw.train_x.shape == (100, 32, 32, 3) and raw.train_x.dtype == torch.uint8
    assert raw.test_x.shape == (20, 32, 32, 3) and raw.train_y.dtype == torch.int64
    assert raw.classes[0] == "airplane" and raw.classes[9] == "truck"
    # the official layout is channel-planar: data[i, :1024] is the red plane of image i
    with open(official_cifar / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert torch.equal(raw.train_x[0, :, :, 0].flatten(), torch.from_numpy(batch[b"data"][0, :1024]))
    assert torch.equal(raw.train_x[0, :, :, 2].flatten(), torch.from_numpy(batch[b"data"][0, 2048:]))
    assert raw.train_y[:20].tolist() == batch[b"labels"]


@pytest.mark.quick
def test_official_tarball_is_extracted_once(tmp_path):
    src = write_official_cifar(tmp_path / "src")
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    raw = load_cifar10(data)
    assert (data / "cifar-10-batches-py" / "test_batch").exists()
    assert len(raw.train_y) == 100


def test_missing_data_error_names_folder_and_download(tmp_path):
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path / "nothing-here")
    msg = str(err.value)
    assert "nothing-here" in msg and "cifar-10-batches-py" in msg and "--no-download" in msg
    assert "\n" not in msg


@pytest.mark.quick
def test_missing_data_cli_one_line_nonzero(tmp_path):
    proc = run_train(["--dataset", "cifar10", "--data-dir", str(tmp_path / "none"), "--out-dir",
                      str(tmp_path / "out")], timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    # the default is to download; offline that is one line naming both ways out
    assert len(err) == 1 and "download" in err[0] and "Traceback" not in proc.stderr
    assert "put cifar-10-python.tar.gz in" in err[0] and "--no-download --dataset imagefolder" in err[0]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape"])
def test_corrupt_batch_names_the_file(official_cifar, damage):
    path = official_cifar / "cifar-10-batches-py" / "data_batch_3"
    blob = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a pickle at all" * 10)
    else:
        with open(path, "wb") as f:
            pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f, protocol=2)
    with pytest.raises(DataError) as err:
        load_cifar10(official_cifar)
    assert "data_batch_3" in str(err.value) and "\n" not in str(err.value)
    assert "Traceback" not in str(err.value)


@pytest.mark.quick
def test_cache_is_written_reused_and_rebuilt(official_cifar):
    folder = official_cifar / "cifar-10-batches-py"
    first = load_cifar10(official_cifar)
    caches = list(folder.glob(".dist_cifar_cache_*.pt"))
    assert len(caches) == 1
    stamp = caches[0].stat().st_mtime_ns
    again = load_cifar10(official_cifar)
    assert caches[0].stat().st_mtime_ns == stamp  # reused, not rewritten
    assert torch.equal(first.train_x, again.train_x)
    # corrupt cache: rebuilt transparently, and written again (loadable, same content)
    caches[0].write_bytes(b"torn")
    rebuilt = load_cifar10(official_cifar)
    assert torch.equal(rebuilt.train_x, first.train_x)
    blob = torch.load(caches[0], weights_only=True)
    assert torch.equal(blob["train_x"], first.train_x)
    # stale cache: the source changed, so the cache must not be used, and is replaced
    before = blob["fingerprint"]
    time.sleep(1.1)
    write_official_cifar(official_cifar, seed=7)
    changed = load_cifar10(official_cifar)
    assert not torch.equal(changed.train_x, first.train_x)
    blob = torch.load(caches[0], weights_only=True)
    assert blob["fingerprint"] != before and torch.equal(blob["train_x"], changed.train_x)
    assert list(folder.glob(".dist_cifar_cache_*")) == caches  # no temp files left behind


@pytest.mark.quick
def test_imagefolder_tree_and_targz(tmp_path):
    tree = make_tree(tmp_path / "tree")
    raw = load_imagefolder(tree)
    assert raw.classes == ("airplane", "cat", "dog")  # sorted by name
    assert raw.train_x.shape == (9, 32, 32, 3) and sorted(raw.train_y.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # a pixel-exact round trip of one image (PNG is lossless)
    png = np.asarray(Image.open(tree / "train" / "cat" / "0001.png"))
    assert any(torch.equal(torch.from_numpy(png), x) for x in raw.train_x)
    tar_path = tmp_path / "packed.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(tree, arcname="cifar")
    from_tar = load_imagefolder(tar_path)
    assert from_tar.classes == raw.classes
    assert torch.equal(from_tar.train_x, raw.train_x) and torch.equal(from_tar.test_y, raw.test_y)


def test_missing_imagefolder_error(tmp_path):
    with pytest.raises(DataError, match="train/<class>"):
        load_imagefolder(tmp_path)


@pytest.mark.quick
def test_synthetic_sizes_and_learnable_structure():
    raw = make_synthetic(400)
    assert len(raw.train_y) == 500 and len(raw.test_y) == 100
    splits = make_splits(raw, "full")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (400, 100, 100)
    # class structure: images of one class correlate with their class mean more than others'
    x = raw.train_x.float().flatten(1)
    means = torch.stack([x[raw.train_y == c].mean(0) for c in range(10)])
    nearest = torch.cdist(x, means).argmin(1)
    assert (nearest == raw.train_y).float().mean() > 0.3  # chance is 0.1
    assert torch.equal(make_synthetic(400).train_x, raw.train_x)  # deterministic


@pytest.mark.quick
def test_report_split_sizes():
    n = 25_000
    raw = RawData(train_x=torch.zeros(n, 32, 32, 3, dtype=torch.uint8), train_y=torch.arange(n) % 10,
                  test_x=torch.zeros(6_000, 32, 32, 3, dtype=torch.uint8), test_y=torch.arange(6_000) % 10,
                  classes=tuple(str(i) for i in range(10)), source="test")
    raw.train_x[:, 0, 0, 0] = (torch.arange(n) % 251).to(torch.uint8)
    s = make_splits(raw, "report")
    assert (len(s.train), len(s.val), len(s.test)) == (20_000, 5_000, 5_000)
    assert torch.equal(s.val.x[:, 0, 0, 0], raw.train_x[20_000:25_000, 0, 0, 0])  # by index
    assert len(make_splits(raw, "report", max_train=1000).train) == 1000
    full = make_splits(raw, "full", val_size=5_000)
    assert (len(full.train), len(full.val), len(full.test)) == (20_000, 5_000, 6_000)


def test_report_split_needs_enough_images():
    with pytest.raises(ConfigError, match="--split"):
        make_config(preset="report", dataset="synthetic", synthetic_size=1000)
    assert make_config(preset="report", dataset="synthetic", synthetic_size=20_000).split == "report"


def test_real_jpeg_cifar10_loads(tmp_path, real_cifar):
    import shutil
    shutil.copy(real_cifar, tmp_path / "cifar10-jpeg.tar.gz")
    raw = load_source("imagefolder", str(tmp_path / "cifar10-jpeg.tar.gz"))
    assert raw.train_x.shape == (50_000, 32, 32, 3) and raw.test_x.shape == (10_000, 32, 32, 3)
    assert torch.bincount(raw.train_y).tolist() == [5000] * 10
    mean = raw.train_x[:5000].float().mean((0, 1, 2)) / 255
    assert torch.allclose(mean, torch.tensor([0.490, 0.480, 0.444]), atol=0.01)
    s = make_splits(raw, "report")
    assert torch.bincount(s.train.y, minlength=10).min() > 1800  # class-mixed order


@pytest.mark.quick
def test_the_default_dataset_reads_an_image_tarball_already_in_data_dir(tmp_path):
    """The quickstart leaves the CIFAR image tarball in data/: the default --dataset cifar10 finds it
    there (saying so) instead of going to the network, even with --no-download."""
    from conftest import run_train
    write_image_tarball(tmp_path / "data" / "cifar10-jpeg.tar.gz", per_class=10)
    proc = run_train(["--data-dir", str(tmp_path / "data"), "--no-download", "--split", "full", "--val-size", "6",
                      "--epochs", "1", "--batch-size", "8", "--model", "small_cnn", "--out-dir", str(tmp_path / "run"),
                      "--wandb", "off"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reading the image set" in proc.stdout and "cifar10-jpeg.tar.gz" in proc.stdout
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["dataset"] == "cifar10" and config["data_source"] == "imagefolder"


@pytest.mark.quick
def test_archive_without_batch_files_is_one_line(tmp_path):
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


@pytest.mark.quick
def test_truncated_archive_leaves_nothing_and_recovers(tmp_path):
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


def test_good_archive_on_read_only_storage_extracts_to_the_cache(tmp_path):
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


@pytest.mark.quick
def test_auto_with_corrupt_cifar10_is_an_error_not_a_fallback(tmp_path):
    root = write_official_cifar(tmp_path / "data")
    (root / "data_batch_3").write_bytes(b"garbage")
    line = one_line(run_train(["--dataset", "auto", "--data-dir", str(tmp_path / "data"),
                               "--out-dir", str(tmp_path / "o")]))
    assert "corrupt CIFAR-10 batch file" in line and "data_batch_3" in line
    assert not (tmp_path / "o" / "summary.json").exists()


@pytest.mark.quick
def test_cache_sees_a_same_size_change_and_cleans_stale_temps(tmp_path):
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


@pytest.mark.quick
def test_small_image_folder_gets_a_validation_split_that_fits(tmp_path):
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


def test_two_processes_extracting_one_archive_both_succeed(tmp_path):
    """Cases 094/109: two first ranks on a shared folder; one used to delete the other's live
    extraction and fail with a false 'not the CIFAR-10 python archive'."""
    archive = official_archive_in_data(tmp_path)
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


@pytest.mark.quick
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


@pytest.mark.quick
def test_more_classes_than_outputs_is_one_line(tmp_path):
    """Case 081: an 11-class folder crashed at the first step with 'Target 10 is out of bounds'."""
    tree = make_tree(tmp_path / "tree", per_class=1, classes=tuple(f"c{i:02d}" for i in range(11)))
    proc = run_train(["--dataset", "imagefolder", "--data-dir", str(tree), "--model", "small_cnn", "--epochs", "1",
                      "--batch-size", "4", "--out-dir", str(tmp_path / "o")], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: the image folder has 11 classes under train/ but the models have 10 outputs (CIFAR-10): "
        "keep 10 class folders"]


@pytest.mark.quick
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


@pytest.mark.quick
def test_a_cache_with_wrong_shapes_is_rebuilt_not_blamed_on_the_batch_size(tmp_path, capsys):
    """Minor item of reliability pass 3: a cache whose arrays are not 32x32x3 images (with the
    right fingerprint) surfaced later as a batch-size error."""
    import torch
    from dist_cifar import data as D
    tree = make_tree(tmp_path / "tree")
    D.load_imagefolder(tree)
    cache = D.cache_path_for(tree, "imagefolder")
    blob = torch.load(cache, weights_only=True)
    blob["train_x"] = torch.zeros(2, 8, dtype=torch.uint8)
    torch.save(blob, cache)
    raw = D.load_imagefolder(tree)
    assert tuple(raw.train_x.shape) == (9, 32, 32, 3)
    assert "holds train images of shape (2, 8) and 9 labels, not decoded images; rebuilding it" in capsys.readouterr().out
