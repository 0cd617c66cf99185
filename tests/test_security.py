"""Other users and crafted files: planted caches and links, pickles that would run code."""
from __future__ import annotations

import json
import os
import pickle
import tarfile

import pytest
import torch

from conftest import make_tree, official_archive_in_data, run_train, smoke_args
from dist_cifar.data import DataError, load_cifar10
from dist_cifar import checkpoint as ckpt, data as D, files


def test_batch_with_code_is_refused(official_cifar):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(official_cifar / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(DataError, match="data_batch_2"):
        load_cifar10(official_cifar)


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('PWNED_PATH', '/tmp/pwned')}",))


@pytest.mark.quick
def test_malicious_checkpoint_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "pwned"
    os.environ["PWNED_PATH"] = str(marker)
    evil = out / ckpt.checkpoint_name(1, 0)
    with open(evil, "wb") as f:
        pickle.dump({"format": ckpt.FORMAT, "model": Exploit()}, f)
    files.atomic_write_bytes(out / (evil.name + ".commit"), json.dumps(
        {"file": evil.name, "size": evil.stat().st_size, "sha256": ckpt.sha256_file(evil)}).encode())
    proc = run_train(smoke_args(out), timeout=120)
    assert proc.returncode == 2
    assert "refusing checkpoint" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not marker.exists()
    # also through torch.save's own format
    evil2 = tmp_path / "evil2.pt"
    torch.save({"format": ckpt.FORMAT, "model": Exploit()}, evil2)
    with pytest.raises(ckpt.CheckpointError, match="weights_only"):
        ckpt.load(evil2)
    assert not marker.exists()


@pytest.mark.quick
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


@pytest.mark.quick
def test_extraction_never_follows_a_planted_temporary_path(tmp_path):
    """Case 137: a symlink planted as the predictable `.tmp-extract-<pid>` made root write the
    batches into the folder it pointed to."""
    archive = official_archive_in_data(tmp_path)
    protected = tmp_path / "protected"
    protected.mkdir()
    for pid in (os.getpid(), os.getpid() + 1):
        (archive.parent / f".tmp-extract-{pid}").symlink_to(protected)
    target = D.extract_cifar10(archive)
    assert D.complete(target) and target.parent == archive.parent
    assert list(protected.iterdir()) == []  # nothing written through the link
    assert all((archive.parent / f".tmp-extract-{pid}").is_symlink() for pid in (os.getpid(), os.getpid() + 1))
