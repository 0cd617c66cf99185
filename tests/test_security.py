"""Other users and crafted files: planted caches and links, pickles that would run code."""
from __future__ import annotations

import json
import os
import pickle
import secrets
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import make_tree, official_archive_in_data, run_train, smoke_args, write_image_tarball, write_official_cifar
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
    assert files.distrust(cache) == f"other users may write to {cache}"


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


# ------------------------------------------------------------------ another local user's attacks
# The victim is this process (root in CI); the other user is a system account made for the test
# (and removed after it); the shared folder P is world-writable and sticky, like /tmp or a group
# scratch area. Every attack plants what the repro planted, as that user, then runs the
# victim's command and checks the victim's file (content and mode) and what was trained on.


@pytest.fixture(scope="module")
def other_user():
    if os.getuid() != 0:
        pytest.skip("making a second local user and planting files as it needs root")
    if shutil.which("useradd") is None:
        pytest.skip("no useradd here")
    name = f"dcother{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, timeout=30)
    import pwd
    entry = pwd.getpwnam(name)
    try:
        yield entry.pw_uid, entry.pw_gid
    finally:
        subprocess.run(["userdel", name], timeout=30)


def as_other(user, cmd: list[str]) -> None:
    uid, gid = user
    subprocess.run(cmd, user=uid, group=gid, extra_groups=[], cwd="/", check=True, timeout=30,
                   capture_output=True)


@pytest.fixture
def shared(tmp_path, monkeypatch):
    """P: a fresh 1777 folder in /tmp (the other user can reach it; tmp_path it cannot), and the
    victim's own file (0600) that the attacks aim at. The victim's user cache lives in tmp_path."""
    folder = Path(tempfile.mkdtemp(prefix="dc-shared-", dir="/tmp"))
    folder.chmod(0o1777)
    victim = tmp_path / "victim.txt"
    victim.write_text("the victim's own file\n")
    victim.chmod(0o600)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    try:
        yield folder, victim
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def untouched(victim: Path) -> bool:
    st = victim.stat()
    return victim.read_text() == "the victim's own file\n" and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0


def plant_links(user, folder: Path, names: list[str], target: Path) -> None:
    """Symbolic links to `target`, made by `user` (the system interpreter: this venv's may sit
    in a home the other user cannot enter)."""
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    paths = [str(folder / n) for n in names]
    if system_python:
        as_other(user, [system_python, "-c", "import os, sys\nfor n in sys.argv[2:]: os.symlink(sys.argv[1], n)",
                        str(target), *paths])
    else:
        as_other(user, ["bash", "-c", 't=$1; shift; for n; do ln -s "$t" "$n"; done', "plant", str(target), *paths])


def test_attack_1_no_cache_written_through_a_planted_link(other_user, shared, capsys):
    folder, victim = shared
    tarball = write_image_tarball(folder / "x.tar.gz")
    pid = os.getpid()
    plant_links(other_user, folder, [f".dist_cifar_cache_imagefolder.pt.tmp{p}" for p in range(pid, pid + 3000)]
                + [f".tmp-.dist_cifar_cache_imagefolder.pt-{pid}"], victim)
    raw = D.load_imagefolder(tarball)
    assert len(raw.train_y) == 9 and untouched(victim)
    cache = folder / ".dist_cifar_cache_imagefolder.pt"
    assert cache.is_file() and not cache.is_symlink() and stat.S_IMODE(cache.stat().st_mode) == 0o644


def test_attack_2_no_download_written_through_a_planted_link(other_user, shared, cifar_mirror, monkeypatch):
    folder, victim = shared
    url, md5 = cifar_mirror
    monkeypatch.setenv("DIST_CIFAR_CIFAR10_URL", url)
    monkeypatch.setenv("DIST_CIFAR_CIFAR10_MD5", md5)
    pid = os.getpid()
    plant_links(other_user, folder, [f".cifar-10-python.tar.gz.part-{p}" for p in range(pid, pid + 3000)]
                + [f".tmp-cifar-10-python.tar.gz-{pid}"], victim)
    found = D.find_cifar10(folder, download=True)
    archive = folder / "cifar-10-python.tar.gz"
    assert untouched(victim) and archive.is_file() and not archive.is_symlink() and archive.stat().st_uid == 0
    assert D.complete(found)


def test_attack_3_a_planted_batches_folder_is_not_trained_on(other_user, shared, capsys):
    folder, victim = shared
    archive = official_archive_in_data(Path(tempfile.mkdtemp(dir=folder.parent, prefix="dc-src-")))
    shutil.copy(archive, folder / "cifar-10-python.tar.gz")  # the victim's (root's) archive
    shutil.rmtree(archive.parent.parent)
    planted = write_official_cifar(Path(tempfile.mkdtemp(dir="/tmp", prefix="dc-plant-")), zero=True)
    os.chmod(planted.parent, 0o755)
    as_other(other_user, ["mkdir", str(folder / "cifar-10-batches-py")])
    for batch in planted.iterdir():  # the other user's files: every image zero, every label 0
        as_other(other_user, ["cp", str(batch), str(folder / "cifar-10-batches-py" / batch.name)])
    shutil.rmtree(planted.parent)
    raw = D.load_cifar10(folder)
    assert len(set(raw.train_y.tolist())) > 1 and raw.train_x.float().std() > 0  # the real archive's images
    out = capsys.readouterr().out
    assert f"ignoring {folder / 'cifar-10-batches-py'}: " in out and "owned by uid" in out and "--trust-shared" in out
    assert D.find_cifar10(folder, download=False, trust=True) == folder / "cifar-10-batches-py"  # asked for: used


def test_attack_4_a_planted_image_set_is_not_read_instead_of_the_download(other_user, shared, cifar_mirror,
                                                                         monkeypatch, capsys):
    folder, victim = shared
    url, md5 = cifar_mirror
    monkeypatch.setenv("DIST_CIFAR_CIFAR10_URL", url)
    monkeypatch.setenv("DIST_CIFAR_CIFAR10_MD5", md5)
    evil = write_image_tarball(Path(tempfile.mkdtemp(dir="/tmp", prefix="dc-plant-")) / "evil.tar.gz")
    os.chmod(evil.parent, 0o755)
    as_other(other_user, ["cp", str(evil), str(folder / "evil.tar.gz")])
    shutil.rmtree(evil.parent)
    raw = D.load_local_or_download(folder, download=True)
    assert raw.source.startswith("cifar10") and len(raw.train_y) == 200  # the mirror's archive, not evil.tar.gz
    assert f"ignoring {folder / 'evil.tar.gz'}: " in capsys.readouterr().out


def test_attack_5_an_out_dir_made_by_another_user_is_refused(other_user, shared, tmp_path):
    folder, victim = shared
    run_dir = folder / "run"
    as_other(other_user, ["mkdir", "-m", "777", str(run_dir)])
    plant_links(other_user, run_dir, [".lock", "summary.json", f".tmp-summary.json-{os.getpid()}"], victim)
    for extra in ([], ["--overwrite"]):
        proc = run_train(smoke_args(run_dir, extra))
        assert proc.returncode == 2 and "owned by uid" in proc.stderr and "--trust-shared" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and untouched(victim)
    # the same folder made by the victim itself but left group/other-writable (mode 777)
    own = folder / "own"
    own.mkdir()
    own.chmod(0o777)
    proc = run_train(smoke_args(own))
    assert proc.returncode == 2 and "other users may write to" in proc.stderr
    # ablate's study folder, planted the same way
    study = folder / "abl"
    as_other(other_user, ["mkdir", "-m", "777", str(study)])
    as_other(other_user, ["mkdir", "-m", "777", str(study / "batchnorm")])
    plant_links(other_user, study / "batchnorm", [".ablate.lock", "report.md"], victim)
    proc = subprocess.run([sys.executable, "-m", "dist_cifar.ablate", "batchnorm", "--dataset", "synthetic",
                           "--out", str(study), "--max-train", "32"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 2 and "owned by uid" in proc.stderr and "--trust-shared" in proc.stderr, proc.stderr
    assert untouched(victim) and (study / "batchnorm" / "report.md").is_symlink()


def test_attack_6_forged_checkpoints_are_not_resumed(other_user, shared):
    folder, victim = shared
    run_dir = folder / "forged"
    assert run_train(smoke_args(run_dir)).returncode == 0  # the victim's command, run "by the other user":
    blob_path = ckpt.find_latest(run_dir)
    for path in [run_dir, *run_dir.rglob("*")]:  # ... whose folder and files it then owns and forges
        os.chown(path, *other_user, follow_symlinks=False)
    proc = run_train(smoke_args(run_dir, ["--epochs", "2"]))
    assert proc.returncode == 2 and "resumed from" not in proc.stdout and "owned by uid" in proc.stderr
    assert "--trust-shared" in proc.stderr and blob_path.exists()
    # --resume PATH naming another user's checkpoint: refused too
    proc = run_train(smoke_args(folder / "mine", ["--epochs", "2", "--resume", str(blob_path)]))
    assert proc.returncode == 2 and "could have forged it" in proc.stderr
