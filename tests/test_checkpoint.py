"""dist_cifar/checkpoint.py: atomic writes, commit markers, pruning, exact resume (one and two processes, other world sizes), best.pt, the run's identity."""
from __future__ import annotations

import json
import pickle
import re

import pytest
import torch

from conftest import one_line, read_jsonl, run_train, smoke_args, torchrun_jobs
from dist_cifar import checkpoint as ckpt, files, shards


EXACT = ["--dataset", "synthetic", "--synthetic-size", "512", "--batch-size", "32", "--epochs", "2",
         "--augment", "--record-step-losses", "--quiet"]


def final_model(out):
    return torch.load(ckpt.committed(out)[-1], weights_only=True)["model"]


@pytest.mark.quick
def test_atomic_save_survives_a_crash_midway(tmp_path, monkeypatch):
    first = ckpt.save(tmp_path, {"format": ckpt.FORMAT, "w": torch.ones(3)}, 1, 0, keep_last=3)

    def dying_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(tmp_path, {"format": ckpt.FORMAT, "w": torch.zeros(3)}, 2, 0, keep_last=3)
    monkeypatch.undo()
    assert list(tmp_path.glob(".tmp-ckpt-*"))  # the torn temp file is there...
    assert ckpt.find_latest(tmp_path) == first  # ...and ignored
    assert torch.equal(ckpt.load(first)["w"], torch.ones(3))
    # a renamed file whose commit marker never got written does not count either
    (tmp_path / ckpt.checkpoint_name(3, 0)).write_bytes(b"no marker")
    # nor one whose bytes changed after commit
    second = ckpt.save(tmp_path, {"format": ckpt.FORMAT, "w": torch.full((3,), 2.0)}, 2, 5, keep_last=3)
    assert ckpt.find_latest(tmp_path) == second
    second.write_bytes(second.read_bytes()[:-10])
    assert ckpt.find_latest(tmp_path) == first
    ckpt.save(tmp_path, {"format": ckpt.FORMAT, "w": torch.ones(1)}, 4, 0, keep_last=3)
    assert not [p for p in tmp_path.glob(".tmp-ckpt-*")]  # strays pruned on the next save


def sharded_folder(out, epoch: int, value: float):
    """A sharded checkpoint committed as the trainer commits one (DCP in one process, no group)."""
    import torch.distributed.checkpoint as dcp
    tmp = files.create_temp_dir(out / ckpt.checkpoint_name(epoch, 0, shards.SUFFIX))
    tensors = {"model.w": torch.full((4, 3), value), "model.b": torch.ones(3)}
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp)), no_dist=True)
    hashes = {shards.STATE: ckpt.write_torch(tmp / shards.STATE, {"format": ckpt.FORMAT, "run": {"epoch": epoch}})}
    return ckpt.commit_folder(out, tmp, hashes, epoch=epoch, step=0, config={}, keep_last=2)


@pytest.mark.quick
def test_a_sharded_folder_commits_verifies_and_prunes_like_a_file(tmp_path):
    """A sharded checkpoint (a folder of DCP files and state.pt) is committed by a marker listing
    every file's size and sha256: a changed byte, a missing or a planted file uncommits it; older
    folders are pruned after the new commit; a forged DCP index is refused before it is unpickled."""
    first, second = sharded_folder(tmp_path, 1, 1.0), sharded_folder(tmp_path, 2, 2.0)
    assert first.is_dir() and ckpt.find_latest(tmp_path) == second and ckpt.load(second)["run"] == {"epoch": 2}
    assert torch.equal(ckpt.plain_model_state(second)["w"], torch.full((4, 3), 2.0))
    assert set(json.loads(ckpt.marker_path(second).read_text())["files"]) == {".metadata", shards.STATE,
                                                                          *[p.name for p in second.glob("*.distcp")]}
    planted = second / "extra.distcp"
    planted.write_bytes(b"x")
    ckpt._VERIFIED.clear()
    assert ckpt.find_latest(tmp_path) == first  # a file the marker does not list
    planted.unlink()
    ckpt._VERIFIED.clear()
    assert ckpt.find_latest(tmp_path) == second
    shard = next(second.glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    ckpt._VERIFIED.clear()
    assert ckpt.find_latest(tmp_path) == first  # a changed byte
    (tmp_path / ".tmp-ckpt-e0009-s0000000.dcp-1-abc").mkdir()  # a save killed midway
    third = sharded_folder(tmp_path, 3, 3.0)
    # the stray is gone; the corrupt second neither counts nor goes, so the intact first is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for p in (first, second, third)
                                                                for n in (p.name, p.name + ".commit"))
    # a forged index: a pickle that would run code when DCP unpickles it
    (third / ".metadata").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(pickle.UnpicklingError, match="not part of a DCP index"):
        shards.read_index(third)


@pytest.mark.quick
def test_keep_last_prunes_only_after_commit(tmp_path):
    for epoch in range(1, 6):
        ckpt.save(tmp_path, {"format": ckpt.FORMAT, "e": epoch}, epoch, 0, keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt-e0004-s0000000.pt", "ckpt-e0004-s0000000.pt.commit",
                     "ckpt-e0005-s0000000.pt", "ckpt-e0005-s0000000.pt.commit"]
    assert ckpt.load(ckpt.find_latest(tmp_path))["e"] == 5


@pytest.mark.quick
def test_exact_resume_single_process_bit_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_train([*EXACT, "--out-dir", str(a)]).returncode == 0
    # interrupted mid-epoch 1 (step 21 of 32), then resumed by the same command
    stop = run_train([*EXACT, "--out-dir", str(b)], DIST_CIFAR_FAULT="preempt:rank=0:step=21")
    assert stop.returncode == 75, stop.stderr[-2000:]
    assert ckpt.committed(b)[-1].name == "ckpt-e0001-s0000006.pt"
    again = run_train([*EXACT, "--out-dir", str(b)])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout
    assert (a / "step_losses.jsonl").read_text() == (b / "step_losses.jsonl").read_text()
    assert len(read_jsonl(b / "step_losses.jsonl")) == 32
    ma, mb = final_model(a), final_model(b)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["epoch"] for r in rb] == [0, 1]
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """This file's 2-rank jobs in one torchrun launch (conftest.torchrun_jobs), in order: an
    uninterrupted run, the same run preempted mid-epoch and resumed, and a run preempted to be
    resumed on one process."""
    work = tmp_path_factory.mktemp("checkpoint")
    jobs = [("a", [*EXACT, "--out-dir", str(work / "a")], {}),
            ("b_stop", [*EXACT, "--out-dir", str(work / "b")], {"DIST_CIFAR_FAULT": "preempt:rank=1:step=11"}),
            ("b_again", [*EXACT, "--out-dir", str(work / "b")], {}),
            ("shrink_stop", smoke_args(work / "shrink", ["--epochs", "2", "--synthetic-size", "512"]),
             {"DIST_CIFAR_FAULT": "preempt:rank=0:step=3"})]
    return work, torchrun_jobs(2, [{"name": n, "argv": a, "env": e} for n, a, e in jobs], work)


def codes(results: dict, name: str) -> list:
    return [r["code"] for r in results[name]["ranks"]]


def test_exact_resume_two_processes(two_ranks):
    work, results = two_ranks
    a, b = work / "a", work / "b"
    assert codes(results, "a") == [0, 0]
    assert codes(results, "b_stop") == [75, 75]
    # the ranks stopped at one agreed step: one line for the job (rank 0's), one checkpoint
    stops = [re.findall(r"preempted \([^)]*\), stopped at (epoch \d+ step \d+) on all 2 ranks", r["stderr"])
             for r in results["b_stop"]["ranks"]]
    assert len(stops[0]) == 1 and stops[1] == [], stops
    assert codes(results, "b_again") == [0, 0], results["b_again"]["ranks"][0]["stderr"][-2000:]
    assert "resumed from" in results["b_again"]["ranks"][0]["stdout"] and "ckpt-e0001-s0000004.pt" in \
        results["b_again"]["ranks"][0]["stdout"]
    la, lb = read_jsonl(a / "step_losses.jsonl"), read_jsonl(b / "step_losses.jsonl")
    assert [(r["epoch"], r["step"]) for r in la] == [(r["epoch"], r["step"]) for r in lb]
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(la, lb)) <= 1e-6
    ma, mb = final_model(a), final_model(b)
    assert all(torch.allclose(ma[k].double(), mb[k].double(), atol=1e-6, rtol=0) for k in ma)
    # the interrupted epoch's record counts every rank's samples once, as the uninterrupted run's
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb] and [r["steps"] for r in ra] == [r["steps"] for r in rb]
    for key in ("train_loss", "train_accuracy", "val_loss"):
        assert max(abs(x[key] - y[key]) for x, y in zip(ra, rb)) <= 1e-6, (key, ra, rb)


def test_world_size_change_on_resume(two_ranks):
    work, results = two_ranks
    out = work / "shrink"
    assert codes(results, "shrink_stop") == [75, 75]
    assert "checkpoint ckpt-e0000-s0000004.pt written" in results["shrink_stop"]["ranks"][0]["stderr"]
    done = run_train(smoke_args(out, ["--epochs", "2", "--synthetic-size", "512"]))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "world size changed 2 -> 1" in done.stdout
    assert "resuming epoch 0 at step 8" in done.stdout  # 4 steps x 64 images = 8 steps x 32
    rows = read_jsonl(out / "metrics.jsonl")
    assert [m["epoch"] for m in rows] == [0, 1]
    assert json.loads((out / "config.json").read_text())["world_size"] == 1
    # 256 samples before the stop (on 2 ranks) + 256 after (on 1): each counted once, not partial
    assert rows[0]["steps"] == rows[1]["steps"] == 16 and "partial" not in rows[0]


@pytest.mark.quick
def test_incompatible_checkpoint_is_a_one_line_error(tmp_path):
    out = tmp_path / "run"
    assert run_train(smoke_args(out)).returncode == 0
    proc = run_train([*smoke_args(out), "--model", "simple_cnn", "--epochs", "2"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model='small_cnn'" in lines[0] and "simple_cnn" in lines[0]


@pytest.mark.quick
def test_resume_refuses_another_recipe_and_allows_more_epochs(tmp_path):
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


def test_resume_path_into_another_finished_run_is_refused(tmp_path):
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


@pytest.mark.quick
def test_prune_never_keeps_a_corrupt_file_instead_of_the_new_one(tmp_path):
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


@pytest.mark.quick
def test_resume_path_is_verified_best_pt_explained_and_advice_works(tmp_path):
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


@pytest.mark.quick
def test_longer_onecycle_run_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    assert run_train(smoke_args(out, ["--schedule", "onecycle"])).returncode == 0
    config = (out / "config.json").read_text()
    line = one_line(run_train(smoke_args(out, ["--schedule", "onecycle", "--epochs", "2"])))
    assert "onecycle" in line and "--epochs 2" in line
    assert (out / "config.json").read_text() == config


@pytest.mark.quick
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
    assert json.loads((out / "summary.json").read_text())["best_test_accuracy"] == json.loads(good)["best_test_accuracy"]


@pytest.mark.quick
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


@pytest.mark.quick
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


@pytest.mark.quick
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


def test_damaged_records_markers_and_foreign_files_are_one_line_each(tmp_path):
    """Reliability pass 3's minor list, on one finished run: a corrupt middle line and a
    non-object last line of metrics.jsonl do not block the rerun; a best.pt with a valid marker
    but another model's weights, a checkpoint without its model, hostile markers and a
    checkpoint renamed ahead of its content are each one line or ignored, never a traceback or a
    silent fresh start."""
    import shutil
    out = tmp_path / "run"
    args = smoke_args(out, ["--epochs", "1", "--wandb", "off"])
    assert run_train(args).returncode == 0
    good = read_jsonl(out / "metrics.jsonl")
    (out / "metrics.jsonl").write_text(json.dumps(good[0]) + "\n{not json\n[1, 2]\n")
    again = run_train(args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [0]
    latest = ckpt.find_latest(out)
    # a checkpoint renamed ahead of its content (marker copied along), then hostile markers: ignored
    ahead = out / "ckpt-e0009-s0000000.pt"
    shutil.copy(latest, ahead)
    shutil.copy(ckpt.marker_path(latest), ckpt.marker_path(ahead))
    assert ckpt.find_latest(out) == latest
    for hostile in ("[1, 2]", '{"file": "ckpt-e0009-s0000000.pt", "size": "big", "sha256": 5, "epoch": 9, "step": 0}'):
        ckpt.marker_path(ahead).write_text(hostile)
        assert ckpt.find_latest(out) == latest
    ahead.unlink()
    ckpt.marker_path(ahead).unlink()
    # best.pt with a valid marker but another model's weights: one line, the summary kept
    summary = (out / "summary.json").read_text()
    best = torch.load(out / "best.pt", weights_only=True)
    best["state_dict"] = {"fc.weight": torch.zeros(3, 3)}
    size, sha = ckpt.write_torch(out / "best.pt", best)
    ckpt.marker_path(out / "best.pt").write_text(json.dumps({"file": "best.pt", "size": size, "sha256": sha,
                                                             "epoch": best["epoch"]}))
    proc = run_train(args)
    assert proc.returncode == 2 and "does not hold this model's weights" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and (out / "summary.json").read_text() == summary
    # a committed checkpoint without its model entry: refused, not a fresh start
    blob = ckpt.load(latest)
    del blob["model"]
    size, sha = ckpt.write_torch(latest, blob)
    marker = json.loads(ckpt.marker_path(latest).read_text())
    ckpt.marker_path(latest).write_text(json.dumps({**marker, "size": size, "sha256": sha}))
    ckpt._VERIFIED.clear()
    proc = run_train(smoke_args(out, ["--epochs", "2", "--wandb", "off"]))
    assert proc.returncode == 2 and "lacks its model state" in proc.stderr, proc.stderr[-2000:]
