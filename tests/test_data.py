import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_TARBALL, make_tree, run_train, write_official_cifar
from dist_cifar.config import ConfigError, make_config
from dist_cifar.data import (DataError, RawData, load_cifar10, load_imagefolder, load_source,
                             make_splits, make_synthetic)


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


def test_batch_with_code_is_refused(official_cifar):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(official_cifar / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(DataError, match="data_batch_2"):
        load_cifar10(official_cifar)


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


@pytest.mark.skipif(not SHARED_TARBALL.exists(), reason="the shared JPEG CIFAR-10 is not beside this checkout")
def test_real_jpeg_cifar10_loads(tmp_path):
    import shutil
    shutil.copy(SHARED_TARBALL, tmp_path / "cifar10-jpeg.tar.gz")
    raw = load_source("imagefolder", str(tmp_path / "cifar10-jpeg.tar.gz"))
    assert raw.train_x.shape == (50_000, 32, 32, 3) and raw.test_x.shape == (10_000, 32, 32, 3)
    assert torch.bincount(raw.train_y).tolist() == [5000] * 10
    mean = raw.train_x[:5000].float().mean((0, 1, 2)) / 255
    assert torch.allclose(mean, torch.tensor([0.490, 0.480, 0.444]), atol=0.01)
    s = make_splits(raw, "report")
    assert torch.bincount(s.train.y, minlength=10).min() > 1800  # class-mixed order
