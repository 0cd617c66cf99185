"""--parallel {ddp,hybrid,fsdp}: the sharded head and FSDP2 against one process and against DDP,
resharding checkpoints, and bytes on the wire against dist_cifar.cost. Real torchrun jobs on gloo."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import base_env, read_jsonl, ROOT, run_torchrun, run_train, smoke_args, torchrun_jobs
from dist_cifar import checkpoint as ckpt, cost, shards
from dist_cifar.models import build_model


WORKER = "tests/parallel_worker.py"


def worker(out, designs, nproc, *extra):
    """parallel_worker.py for these designs in one launch: {design: its result}."""
    cmd = ([sys.executable, WORKER] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", WORKER])
    proc = subprocess.run([*cmd, str(out), ",".join(designs), *map(str, extra)], cwd=ROOT, env=base_env(),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {d: torch.load(f"{out}-{d}.pt", weights_only=True) for d in designs}


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def plain(state):
    return json.loads(json.dumps(state, default=lambda t: t.tolist()))  # tuples and lists compare equal


@pytest.fixture(scope="module")
def one_steps(tmp_path_factory):
    """One step as one process (ddp), and of hybrid and fsdp at 2 and at 3 ranks (3 also loading the
    single process's state and consolidating it again), and of the 2-D hybrid at 6 ranks as 3 x 2 and
    2 x 3: four launches serve every design."""
    work = tmp_path_factory.mktemp("one_step")
    clipped = ["ddp:clip", "hybrid:clip", "fsdp:clip"]
    ref = worker(work / "one", ["ddp", "ddp:clip", "ddp:fp16", "ddp:sgd"], 1)
    two = worker(work / "two", ["hybrid", "fsdp", *clipped], 2)
    three = worker(work / "three", ["hybrid", "fsdp", *clipped], 3, "--load", work / "one-ddp.pt")
    six = worker(work / "six", [f"hybrid-tp{tp}{v}" for tp in (2, 3) for v in ("", ":clip", ":fp16")]
                 + ["hybrid-tp2:bf16hook"], 6)
    return ref, {2: two, 3: three, 6: six}


def test_the_2d_hybrid_equals_one_process(one_steps):
    """#32: the head sharded over tp groups of 2 (6 ranks: 3 groups x 2) and of 3 (6 ranks: 2 x 3,
    FC1's 64 neurons split 22/21/21), its slices averaged over the groups: one step gives the single
    process's gradients and weights (fp32, as the flat layout), the same clipped norm, and under
    fp16 with the GradScaler (an SGD step) the single fp16 process's step to fp16's precision (that
    process itself differs from fp32 by ~5 %). Every group's copy of the head stays identical (the worker's
    replica check covers the slices too)."""
    refs, by_world = one_steps
    for world, tp in ((6, 2), (6, 3)):
        for variant, ref in (("", refs["ddp"]), (":clip", refs["ddp:clip"])):
            got = by_world[world][f"hybrid-tp{tp}{variant}"]
            for name in ref["grads"]:
                assert relative(got["grads"][name], ref["grads"][name]) <= 1e-5, (world, variant, name)
                assert relative(got["weights"][name], ref["weights"][name]) <= 1e-5, (world, variant, name)
            assert got["weights"]["fc1.weight"].shape == (64, 1024)
        clipped = by_world[world][f"hybrid-tp{tp}:clip"]
        assert abs(clipped["norm"] - refs["ddp:clip"]["norm"]) <= 1e-5 * refs["ddp:clip"]["norm"]
        half, ref = by_world[world][f"hybrid-tp{tp}:fp16"], refs["ddp:fp16"]
        assert half["scale"] == ref["scale"] == 65536.0  # the step was taken, not skipped for overflow
        for name in ref["grads"]:
            assert relative(half["grads"][name], ref["grads"][name]) <= 3e-3, (world, name)
            assert relative(half["weights"][name], ref["weights"][name]) <= 1e-3, (world, name)
    # --ddp-comm-hook bf16: DDP's buckets and the slices' all-reduce across groups go in bf16
    hooked, ref = by_world[6]["hybrid-tp2:bf16hook"], refs["ddp:sgd"]
    for name in ref["grads"]:
        assert relative(hooked["grads"][name], ref["grads"][name]) <= 1e-2, name
        assert relative(hooked["weights"][name], ref["weights"][name]) <= 5e-3, name  # bf16: 2^-8


@pytest.mark.parametrize("design", ["hybrid", "fsdp"])
def test_one_step_equals_one_process_and_reshards_exactly(one_steps, design):
    """fp32, no dropout or BatchNorm: one step on 2 and 3 ranks (3 splits FC1's 64 neurons
    22/21/21) gives the single process's gradients and Adam-updated weights; a plain state loaded
    at 3 ranks and consolidated again is bit-identical."""
    refs, by_world = one_steps
    ref = refs["ddp"]
    for world in (2, 3):
        got = by_world[world][design]
        assert sorted(got["grads"]) == sorted(ref["grads"])
        for name in ref["grads"]:
            assert ref["grads"][name].abs().max() > 0
            assert relative(got["grads"][name], ref["grads"][name]) <= 1e-5, (world, name)
            assert relative(got["weights"][name], ref["weights"][name]) <= 1e-5, (world, name)
        assert got["weights"]["fc1.weight"].shape == (64, 1024)  # consolidated, not a slice
    again = got["round_trip"]
    assert all(torch.equal(again["weights"][k], ref["weights"][k]) for k in ref["weights"])
    assert plain(again["optimizer"]) == plain(ref["optimizer"])


@pytest.mark.parametrize("design", ["ddp", "hybrid", "fsdp"])
def test_gradient_clipping_equals_one_process(one_steps, design):
    """--clip-grad-norm (#31): the global norm over all parameters, whatever the layout (the
    hybrid sums its head slices' squared norms over the ranks, FSDP2 its shards'), so one clipped
    step at 2 and 3 ranks gives the single process's norm, clipped gradients and weights."""
    refs, by_world = one_steps
    ref = refs["ddp:clip"]
    assert ref["norm"] > 0.05 * 2  # the clip acted
    clipped_norm = sum(g.double().pow(2).sum() for g in ref["grads"].values()).sqrt().item()
    assert abs(clipped_norm - 0.05) < 1e-6
    for world in (2, 3):
        got = by_world[world][f"{design}:clip"]
        assert abs(got["norm"] - ref["norm"]) <= 1e-5 * ref["norm"], (world, got["norm"], ref["norm"])
        for name in ref["grads"]:
            assert relative(got["grads"][name], ref["grads"][name]) <= 1e-5, (world, name)
            assert relative(got["weights"][name], ref["weights"][name]) <= 1e-5, (world, name)


TWENTY = ["--dataset", "synthetic", "--synthetic-size", "512", "--model", "small_cnn", "--batch-size", "16",
          "--epochs", "2", "--steps-per-epoch", "10", "--record-step-losses", "--val-size", "33",
          "--eval-batch-size", "16", "--quiet"]


def exact(out, epochs, *extra):
    return ["--dataset", "synthetic", "--synthetic-size", "512", "--model", "small_cnn", "--batch-size", "16",
            "--epochs", str(epochs), "--augment", "--record-step-losses", "--quiet", "--out-dir", str(out), *extra]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """This file's 2-rank trainer jobs in one torchrun launch (conftest.torchrun_jobs), in order:
    the twenty-step runs of each design, the hybrid's uninterrupted / preempted / resumed runs, and
    the compressed comm hooks."""
    work = tmp_path_factory.mktemp("parallel")
    jobs = [(f"twenty_{d}", [*TWENTY, "--parallel", d, "--out-dir", str(work / f"twenty_{d}")], {})
            for d in ("ddp", "hybrid", "fsdp")]
    jobs += [("resume_a", exact(work / "resume_a", 2, "--parallel", "hybrid"), {}),
             ("resume_b_stop", exact(work / "resume_b", 2, "--parallel", "hybrid"),
              {"DIST_CIFAR_FAULT": "preempt:rank=1:step=20"}),
             ("resume_b_again", exact(work / "resume_b", 2, "--parallel", "hybrid"), {})]
    jobs += [(f"hook_{h}", smoke_args(work / f"hook_{h}", ["--epochs", "3", "--synthetic-size", "512",
                                                            "--ddp-comm-hook", h]), {}) for h in ("fp16", "bf16")]
    jobs += [(f"accum_{d}_{k}", accumulation(work / f"accum_{d}_{k}", k, "--parallel", d), {})
             for d in ("ddp", "hybrid", "fsdp") for k in (1, 2)]
    jobs += [(f"ema_{d}", accumulation(work / f"ema_{d}", 1, "--parallel", d, *EMA_FLAGS), {})
             for d in ("ddp", "hybrid", "fsdp")]
    jobs += [("ema_stop", accumulation(work / "ema_resumed", 1, *EMA_FLAGS), {"DIST_CIFAR_FAULT": "preempt:rank=0:step=1"}),
             ("ema_again", accumulation(work / "ema_resumed", 1, *EMA_FLAGS), {})]
    jobs += [("auto", smoke_args(work / "auto", ["--parallel", "auto", "--precision", "bf16"]), {})]
    every_two_steps = ("--parallel", "hybrid", "--checkpoint-every-steps", "2")
    jobs += [("shard_fail", exact(work / "shard_fail", 1, *every_two_steps), {"DIST_CIFAR_FAULT": "fail_save:step=4"})]
    return work, torchrun_jobs(2, [{"name": n, "argv": a, "env": e} for n, a, e in jobs], work, timeout=900)


def accumulation(out, accum: int, *extra) -> list[str]:
    """Four SGD steps of 16 images per rank: as one batch, or (accum=2) as two micro-batches of 8.
    No BatchNorm (its statistics depend on the batch), no dropout or augmentation (their random
    draws per micro-batch differ), plain SGD (the update is linear in the gradient)."""
    return ["--dataset", "synthetic", "--synthetic-size", "256", "--model", "small_cnn", "--no-batchnorm",
            "--no-dropout", "--optimizer", "sgd", "--momentum", "0", "--lr", "0.1", "--epochs", "1",
            "--steps-per-epoch", "4", "--batch-size", str(16 // accum), "--grad-accum-steps", str(accum),
            "--record-step-losses", "--quiet", "--out-dir", str(out), *extra]


def final_weights(out) -> dict:
    return ckpt.plain_model_state(ckpt.find_latest(out))


def final_ema(out) -> tuple[int, dict]:
    """(updates, the plain averages) of the newest checkpoint: a single file's consolidated EMA, or
    a sharded folder's `ema.` tensors (the parameters only) and its state.pt's count."""
    path = ckpt.find_latest(out)
    if path.is_dir():
        return ckpt.load(path)["ema_updates"], shards.read_plain(path, "ema.")
    blob = ckpt.load(path)
    return blob["ema"]["updates"], blob["ema"]["weights"]


@pytest.mark.parametrize("design", ["ddp", "hybrid", "fsdp"])
def test_gradient_accumulation_equals_the_whole_batch(two_ranks, tmp_path, design):
    """--grad-accum-steps 2 at batch 8 = one batch of 16 (#31): the same step losses and weights
    after four steps, at two ranks under every design (gradients synchronised once per step: DDP's
    no_sync, FSDP2's requires_gradient_sync, the hybrid's head collectives every micro-batch) and
    on one process; the global batch, steps and schedule count optimizer steps."""
    work, results = two_ranks
    runs = {k: work / f"accum_{design}_{k}" for k in (1, 2)}
    for k, out in runs.items():
        rank0(results, f"accum_{design}_{k}")
        config = json.loads((out / "config.json").read_text())
        assert (config["global_batch_size"], config["steps_per_epoch_resolved"]) == (32, 4)
    if design == "ddp":  # and the same on one process
        for k in (1, 2):
            assert run_train(accumulation(tmp_path / f"one_{k}", k)).returncode == 0
        runs.update({f"one_{k}": tmp_path / f"one_{k}" for k in (1, 2)})
    for whole, split in ((1, 2), ("one_1", "one_2")) if design == "ddp" else ((1, 2),):
        a = [r["loss"] for r in read_jsonl(runs[whole] / "step_losses.jsonl")]
        b = [r["loss"] for r in read_jsonl(runs[split] / "step_losses.jsonl")]
        assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
        wa, wb = final_weights(runs[whole]), final_weights(runs[split])
        assert all(relative(wb[k], wa[k]) <= 1e-5 for k in wa), design


EMA_FLAGS = ("--ema", "0.5", "--eval-weights", "ema")


def test_ema_is_the_same_average_under_every_design_and_across_a_resume(two_ranks):
    """--ema (#31): each rank averages what it holds (the hybrid's slices, FSDP2's shards); the
    checkpoint's consolidated average equals DDP's under hybrid and fsdp at two ranks, and a run
    preempted after step 1 and resumed ends with the uninterrupted run's average; each epoch logs
    the average's validation figures, and best.pt holds the average (--eval-weights ema)."""
    work, results = two_ranks
    averages = {}
    for name in ("ema_ddp", "ema_hybrid", "ema_fsdp", "ema_again"):
        rank0(results, name)
        out = work / ("ema_resumed" if name == "ema_again" else name)
        updates, averages[name] = final_ema(out)
        assert updates == 4
        row = read_jsonl(out / "metrics.jsonl")[-1]
        assert row["ema_val_loss"] > 0 and 0 <= row["ema_val_accuracy"] <= 100
    assert codes_of(results, "ema_stop") == [75, 75]
    for name in ("ema_hybrid", "ema_fsdp", "ema_again"):
        assert all(relative(averages[name][k], averages["ema_ddp"][k]) <= 1e-5 for k in averages[name]), name
    assert set(averages["ema_hybrid"]) == set(averages["ema_ddp"])  # sharded: every parameter (no BatchNorm here)
    best = torch.load(work / "ema_ddp" / "best.pt", weights_only=True)["state_dict"]
    trained = final_weights(work / "ema_ddp")
    assert any(not torch.equal(best[k], trained[k]) for k in trained)  # the average, not the last weights


def codes_of(results: dict, name: str) -> list:
    return [r["code"] for r in results[name]["ranks"]]


def rank0(results: dict, name: str, code: int = 0) -> dict:
    for rank, r in enumerate(results[name]["ranks"]):
        assert r["code"] == code, f"{name} rank {rank} exit {r['code']}: {r['stderr'][-3000:]}"
    return results[name]["ranks"][0]


def test_twenty_steps_match_ddp_and_bytes_match_the_prediction(two_ranks):
    """BatchNorm and dropout on: hybrid and fsdp follow DDP's 20 losses to 1e-4 (BatchNorm uses each
    rank's own batch statistics under all three); evaluation stays exact with uneven shards (33
    validation images, 17/16 per rank, in batches of 16: the second rank pads a whole batch); every
    rank's bytes per step, recorded from the collectives, equal dist_cifar.cost's prediction."""
    work, results = two_ranks
    runs = {}
    for design in ("ddp", "hybrid", "fsdp"):
        out = work / f"twenty_{design}"
        stdout = rank0(results, f"twenty_{design}")["stdout"]
        runs[design] = out
        config = json.loads((out / "config.json").read_text())
        assert config["parallel_resolved"] == design and config["num_params"] == 69_050
        predicted = cost.predict_wire(design, "small_cnn", batch_per_rank=16, world=2)
        assert config["wire_predicted"] == predicted
        metrics = read_jsonl(out / "metrics.jsonl")
        assert [m["wire_bytes_per_step"] for m in metrics] == [sum(predicted.values())] * 2
        assert "on the wire (predicted)" in stdout and "warning: each rank sent" not in stdout
    ddp_losses = [r["loss"] for r in read_jsonl(runs["ddp"] / "step_losses.jsonl")]
    assert len(ddp_losses) == 20
    for design in ("hybrid", "fsdp"):
        losses = [r["loss"] for r in read_jsonl(runs[design] / "step_losses.jsonl")]
        assert max(abs(a - b) for a, b in zip(losses, ddp_losses)) <= 1e-4, design
        assert losses[-1] < losses[0]
        for key in ("val_loss", "val_accuracy"):
            a = [m[key] for m in read_jsonl(runs[design] / "metrics.jsonl")]
            b = [m[key] for m in read_jsonl(runs["ddp"] / "metrics.jsonl")]
            assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-4, (design, key)
        summary = json.loads((runs[design] / "summary.json").read_text())
        assert abs(summary["best_test_loss"] - json.loads((runs["ddp"] / "summary.json").read_text())["best_test_loss"]) < 1e-4
    # hybrid sends less than DDP even on this small model; FSDP more (3 passes over the parameters)
    sent = {d: read_jsonl(runs[d] / "metrics.jsonl")[0]["wire_bytes_per_step"] for d in runs}
    assert sent["hybrid"] < sent["ddp"] < sent["fsdp"]


@pytest.mark.quick
def test_vgg16_prediction_is_the_issue_arithmetic():
    """vgg16_cifar at 4 images per rank on 2 ranks: DDP all-reduces 1.33 GB of fp32 gradients,
    the hybrid head sends ~59 MB (the trunk's 14,172,618 parameters plus the features)."""
    ddp = sum(cost.predict_wire("ddp", "vgg16_cifar", batch_per_rank=4, world=2).values())
    hybrid = sum(cost.predict_wire("hybrid", "vgg16_cifar", batch_per_rank=4, world=2).values())
    assert ddp == 332_943_818 * 4
    assert 58e6 < hybrid < 60e6 and ddp / hybrid > 22


def test_a_failed_sharded_write_stops_every_rank_and_keeps_the_last_commit(two_ranks):
    """Every rank writes its shard of a sharded checkpoint; when the writes of step 4 fail (a full
    disk, injected on every rank), no rank hangs in DCP's collectives: the job stops at the next
    save with one line and exit 2, the step-2 folder stays committed and intact, and the failed
    write's temporary folder is gone."""
    work, results = two_ranks
    assert codes_of(results, "shard_fail") == [2, 2]
    stderr = results["shard_fail"]["ranks"][0]["stderr"]
    assert "a checkpoint write in" in stderr.strip().splitlines()[-1] and "Traceback" not in stderr
    out = work / "shard_fail"
    kept = ckpt.find_latest(out)
    assert kept.name == "ckpt-e0000-s0000002.dcp" and ckpt.verify(kept)
    assert not list(out.glob(".tmp-*"))


def test_resume_same_world_is_bit_exact(two_ranks, tmp_path):
    # the hybrid here; fsdp resumes in test_resume_at_another_world_size_reshards
    work, results = two_ranks
    a, b = work / "resume_a", work / "resume_b"
    rank0(results, "resume_a")
    stop = rank0(results, "resume_b_stop", code=75)
    assert "preempted" in stop["stderr"]
    assert "resumed from" in rank0(results, "resume_b_again")["stdout"]
    assert (a / "step_losses.jsonl").read_text() == (b / "step_losses.jsonl").read_text()
    ma, mb = final_weights(a), final_weights(b)
    assert ckpt.committed(a)[-1].suffix == ".dcp"  # sharded: every rank wrote its own slices
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert ma["fc1.weight"].shape == (64, 1024)  # the checkpoint holds the plain model's tensors
    # python -m dist_cifar.evaluate reads the sharded folder whole: its last epoch's validation loss
    from dist_cifar.evaluate import main as evaluate_main
    assert evaluate_main([str(ckpt.committed(a)[-1]), "--split", "val", "--json", str(tmp_path / "dcp.json")]) == 0
    measured = json.loads((tmp_path / "dcp.json").read_text())
    assert abs(measured["loss"] - read_jsonl(a / "metrics.jsonl")[-1]["val_loss"]) < 1e-5, measured["loss"]


@pytest.mark.slow  # ~45 s: bash benchmarks/slow_tests.sh
def test_resume_at_another_world_size_reshards(tmp_path):
    """2 -> 3 (flat), 2 -> 4 (2-D: 2 x 2), 2 -> 1, 1 -> 2 (fsdp) and fsdp -> hybrid at 3 ranks: each
    resume reshards the head (hybrid) or FSDP2's shards from a sharded folder or a single file and
    continues; the 2-rank run re-evaluated
    at 3 ranks and as the 2-D layout gives its test loss; best.pt is the plain state_dict (strict
    load into models.build_model)."""
    out = tmp_path / "run"
    hybrid = ("--parallel", "hybrid")
    assert run_torchrun(2, exact(out, 1, *hybrid, "--no-save-best")).returncode == 0
    first = json.loads((out / "summary.json").read_text())["best_test_loss"]
    same = run_torchrun(3, exact(out, 1, *hybrid, "--no-save-best"))  # nothing left to train: resharded, evaluated
    assert same.returncode == 0, same.stderr[-2000:]
    assert "world size changed 2 -> 3" in same.stdout
    assert abs(json.loads((out / "summary.json").read_text())["best_test_loss"] - first) < 1e-5
    as_grid = (*hybrid, "--tp-size", "2", "--no-save-best")
    grid = run_torchrun(4, exact(out, 1, *as_grid))
    assert grid.returncode == 0, grid.stderr[-2000:]
    assert "world size changed 2 -> 4" in grid.stdout and "2-D: 2 groups of 2 ranks" in grid.stdout
    assert abs(json.loads((out / "summary.json").read_text())["best_test_loss"] - first) < 1e-5
    alone = run_train(exact(out, 2, *hybrid, "--no-save-best"))
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert "world size changed 2 -> 1" in alone.stdout
    up = run_torchrun(2, exact(out, 3, "--parallel", "fsdp", "--no-save-best"))
    assert up.returncode == 0, up.stderr[-2000:]
    assert "world size changed 1 -> 2" in up.stdout and "fsdp (FSDP2" in up.stdout
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["world_size"] for m in metrics] == [2, 1, 2] and metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    # FSDP2's sharded checkpoint (dim-0 chunks) read back as the hybrid's uneven slices at 3 ranks
    assert ckpt.find_latest(out).suffix == ".dcp"
    fsdp_loss = json.loads((out / "summary.json").read_text())["best_test_loss"]
    across = run_torchrun(3, exact(out, 3, *hybrid, "--no-save-best"))
    assert across.returncode == 0, across.stderr[-2000:]
    assert "world size changed 2 -> 3" in across.stdout
    assert abs(json.loads((out / "summary.json").read_text())["best_test_loss"] - fsdp_loss) < 1e-5

    single = tmp_path / "single"
    proc = run_torchrun(2, exact(single, 1, *hybrid))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"hybrid \(convolutions data-parallel; fc1 column-parallel, fc2 row-parallel: 32 neurons",
                     proc.stdout)
    best = torch.load(single / "best.pt", weights_only=True)["state_dict"]
    build_model("small_cnn").load_state_dict(best, strict=True)


def test_two_emulated_hosts_ddp_and_the_2d_hybrid(tmp_path):
    """Two network namespaces joined by a veth pair (launch/two_hosts.sh): torchrun --nnodes=2 with
    c10d rendezvous on the first namespace's address, gloo over the veth; ddp with one rank per
    host, and the hybrid with two per host, which makes it the 2-D layout (the head sharded inside
    each host by default). The link's own counters saw at least the bytes dist_cifar.cost puts on
    it. (Every design on one host: the tests above; flat and 2-D measured on the link:
    benchmarks/scaleout.py.)"""
    for design, per_host in (("ddp", 1), ("hybrid", 2)):
        out = tmp_path / design
        proc = subprocess.run(["bash", "launch/two_hosts.sh", "--nproc-per-host", str(per_host), "--", "--dataset",
                               "synthetic", "--synthetic-size", "256", "--batch-size", "16", "--epochs", "1",
                               "--model", "small_cnn", "--quiet", "--parallel", design, "--out-dir", str(out),
                               "--dist-timeout", "60"],
                              cwd=ROOT, env=base_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=240)
        if proc.returncode == 77:
            pytest.skip(proc.stderr.strip().splitlines()[-1])
        assert proc.returncode == 0, proc.stderr[-3000:]
        config = json.loads((out / "config.json").read_text())
        assert config["world_size"] == 2 * per_host and config["parallel_resolved"] == design
        metrics = read_jsonl(out / "metrics.jsonl")[0]
        collectives = cost.step_collectives(design, "small_cnn", batch_per_rank=16, world=2 * per_host,
                                            tp=config["tp_resolved"] or 0)
        across = cost.bytes_across_link_per_node(collectives, world=2 * per_host, nodes=2, gloo=True)
        sent = [int(x) for x in re.findall(r"host\d=(\d+)", proc.stderr)]
        assert len(sent) == 2 and min(sent) >= across * metrics["steps"] > 0, proc.stderr[-1000:]
        assert json.loads((out / "summary.json").read_text())["best_test_accuracy"] > 0
    assert config["tp_resolved"] == 2 and "2-D: 2 groups of 2 ranks" in proc.stdout
    assert metrics["wire_bytes_per_step"] == sum(config["wire_predicted"].values())
    assert not [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if n.startswith(("dcA", "dcB"))]  # the namespaces are gone


def test_world_size_one_trains_the_bare_module(tmp_path):
    """One rank under torchrun: no DDP wrapper and no comm hook unless --ddp-single; the losses
    are the same either way (the fp32 hook changes nothing), only the overhead differs."""
    flags = ["--ddp-comm-hook", "allreduce", "--record-step-losses"]
    results = torchrun_jobs(1, [{"name": "bare", "argv": smoke_args(tmp_path / "bare", flags), "env": {}},
                                {"name": "ddp", "argv": smoke_args(tmp_path / "ddp", [*flags, "--ddp-single"]), "env": {}}],
                            tmp_path)
    bare, wrapped = rank0(results, "bare"), rank0(results, "ddp")
    assert "no DDP wrapper or comm hook" in bare["stdout"] and "(--ddp-single)" in wrapped["stdout"]
    assert read_jsonl(tmp_path / "bare" / "metrics.jsonl")[0].get("comm_s") is None  # no hook ran
    assert read_jsonl(tmp_path / "ddp" / "metrics.jsonl")[0]["comm_s"] > 0
    a = [r["loss"] for r in read_jsonl(tmp_path / "bare" / "step_losses.jsonl")]
    b = [r["loss"] for r in read_jsonl(tmp_path / "ddp" / "step_losses.jsonl")]
    assert len(a) == len(b) > 0 and max(abs(x - y) for x, y in zip(a, b)) < 1e-6


@pytest.mark.parametrize("hook", ["fp16", "bf16"])
def test_comm_hooks_under_two_process_torchrun(two_ranks, hook):
    work, results = two_ranks
    out = work / f"hook_{hook}"
    rank0(results, f"hook_{hook}")
    metrics = read_jsonl(out / "metrics.jsonl")
    assert all(m["comm_s"] > 0 for m in metrics)
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]  # compressed gradients still train
    assert json.loads((out / "config.json").read_text())["ddp_comm_hook"] == hook


@pytest.mark.quick
def test_the_hybrid_refuses_a_head_whose_second_linear_does_not_read_the_first_elementwise():
    """The hybrid shards FC1 by output and FC2 by input: anything but elementwise ops between them
    (a residual, a norm over features) would mix the ranks' slices. The report's models pass;
    such a head is refused with one line before any step."""
    from torch import nn
    from dist_cifar.parallel import head_pair_problem

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(torch.relu(h) + h)

    class Normed(Residual):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            return self.fc2(self.norm(self.fc1(x)))

    for name in ("simple_cnn", "small_cnn", "vgg_truncated", "vgg16_cifar"):
        with torch.device("meta"):  # tracing reads no weights
            net = build_model(name)
        first, second = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][:2]
        assert head_pair_problem(net, first, second) == "", name
    assert "used 2 times" in head_pair_problem(Residual(), "fc1", "fc2")
    assert "norm" in head_pair_problem(Normed(), "fc1", "fc2")


def test_parallel_auto_measures_predicts_and_records_its_choice(two_ranks):
    """#32: --parallel auto at 2 ranks of one node: the all-reduce inside the node is measured,
    every design this run allows is predicted (bf16 training: the bf16 hook is a candidate), the
    one with the least predicted communication is chosen and trained, and config.json records the
    links, the predictions and the choice (the resolved design in its fields, so it reruns)."""
    work, jobs = two_ranks
    assert all(rank["code"] == 0 for rank in jobs["auto"]["ranks"]), jobs["auto"]["ranks"][0]["stderr"][-2000:]
    config = json.loads((work / "auto" / "config.json").read_text())
    auto = config["parallel_auto"]
    assert auto["links"]["nodes"] == 1 and auto["links"]["ranks_per_node"] == 2
    assert auto["links"]["inside_node_gbs"] > 0 and auto["links"]["across_nodes_gbs"] is None
    designs = {row["design"]: row for row in auto["predicted"]}
    assert set(designs) == {"ddp", "ddp + bf16 hook", "hybrid (flat)", "fsdp"}
    best = min(designs.values(), key=lambda row: row["comm_ms"])
    assert auto["chosen"] == best["design"] and config["parallel"] == config["parallel_resolved"] == best["parallel"]
    assert config["ddp_comm_hook"] == best["ddp_comm_hook"]
    # the bytes are dist_cifar.cost's, at this run's batch and precision
    predicted = cost.predict_wire("ddp", "small_cnn", batch_per_rank=32, world=2, precision="bf16")
    assert designs["ddp"]["mb_inside_nodes"] == pytest.approx(sum(predicted.values()) / 1e6)
    assert "--parallel auto: 1 node(s) x 2 rank(s)" in jobs["auto"]["ranks"][0]["stdout"]
