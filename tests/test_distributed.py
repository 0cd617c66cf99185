"""Real torchrun jobs on gloo (CPU): the DDP contract."""
import json
import subprocess
import sys
import time

import torch

from conftest import (ROOT, base_env, free_port, read_jsonl, run_torchrun, run_train, smoke_args,
                      torchrun_cmd)
from dist_cifar.data import Split
from dist_cifar.loaders import LoaderSpec, TensorLoader, sampler_indices, steps_in_epoch


def test_two_process_run_rank0_writes_outputs(tmp_path):
    out = tmp_path / "run"
    proc = run_torchrun(2, smoke_args(out, ["--epochs", "2"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch_size"] == 64 and config["batch_size"] == 32
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [0, 1]  # one writer: no duplicated lines
    assert all(m["world_size"] == 2 and m["rank_time_max_s"] >= m["rank_time_min_s"] > 0 for m in metrics)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert proc.stdout.count("epoch   0") == 1  # only rank 0 prints
    assert "global batch 64" in proc.stdout
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "run"]
    assert leftovers == []


def test_sampler_shards_are_disjoint_and_cover_the_data():
    n = 1001
    e0 = [sampler_indices(n, r, 2, seed=42, epoch=0) for r in range(2)]
    assert not set(e0[0]) & set(e0[1])
    assert len(set(e0[0]) | set(e0[1])) == n - n % 2  # drop_last remainder only
    e1 = [sampler_indices(n, r, 2, seed=42, epoch=1) for r in range(2)]
    assert e1[0] != e0[0]  # reshuffled each epoch
    assert sampler_indices(n, 0, 2, seed=42, epoch=1) == e1[0]  # reproducible with the seed
    assert sampler_indices(n, 0, 2, seed=43, epoch=1) != e1[0]
    # the tensor loader walks exactly that sequence
    split = Split(torch.zeros(n, 32, 32, 3, dtype=torch.uint8), torch.arange(n))
    for rank in range(2):
        loader = TensorLoader(split, torch.device("cpu"), LoaderSpec(64, rank=rank, world=2, seed=42))
        loader.set_epoch(1)
        labels = torch.cat([y for _, y in loader.batches()]).tolist()
        assert labels == e1[rank][: len(labels)] and len(labels) == 7 * 64


def test_uneven_data_same_steps_on_every_rank(tmp_path):
    assert steps_in_epoch(1001, 2, 64) == 7
    split = Split(torch.zeros(1001, 32, 32, 3, dtype=torch.uint8), torch.zeros(1001, dtype=torch.long))
    lens = [len(TensorLoader(split, torch.device("cpu"), LoaderSpec(64, rank=r, world=2))) for r in range(2)]
    assert lens == [7, 7]
    out = tmp_path / "run"
    # synthetic 1001 -> exactly 1001 training images; a rank with an extra step would hang DDP
    proc = run_torchrun(2, ["--dataset", "synthetic", "--synthetic-size", "1001", "--batch-size", "64",
                            "--epochs", "1", "--out-dir", str(out), "--dist-timeout", "60"], timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["split_sizes"]["train"] == 1001
    assert read_jsonl(out / "metrics.jsonl")[0]["steps"] == 7


def test_validation_split_smaller_than_the_world(tmp_path):
    """One validation image, two ranks: rank 1's shard is empty and it must still join every
    evaluation all-reduce (a truthiness check on the shard would skip it and hang the job)."""
    out = tmp_path / "run"
    proc = run_torchrun(2, ["--dataset", "synthetic", "--synthetic-size", "256", "--batch-size", "32",
                            "--epochs", "2", "--val-size", "1", "--out-dir", str(out), "--dist-timeout", "30"],
                        timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [0, 1] and all("val_loss" in m for m in metrics)
    assert json.loads((out / "config.json").read_text())["split_sizes"]["val"] == 1
    assert all(m["val_accuracy"] in (0.0, 100.0) for m in metrics)  # one image: right or wrong


def test_exact_distributed_eval_matches_single_process(tmp_path):
    from dist_cifar.models import build_model
    torch.manual_seed(1)
    weights = tmp_path / "w.pt"
    torch.save(build_model("small_cnn").state_dict(), weights)
    single = subprocess.run([sys.executable, "tests/dist_eval_worker.py", str(tmp_path / "one.json"), str(weights)],
                            cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "tests/dist_eval_worker.py", str(tmp_path / "two.json"), str(weights)],
                          cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["count"] == two["count"] == 1001
    assert two["local"] in (500, 501)
    assert one["correct"] == two["correct"] and one["confusion"] == two["confusion"]
    assert abs(one["loss"] - two["loss"]) < 1e-6


def final_weights(out):
    from dist_cifar.checkpoint import committed
    return torch.load(committed(out)[-1], weights_only=True)["model"]


def test_one_step_on_two_ranks_equals_one_process(tmp_path):
    # no dropout, no BatchNorm: the 2x16 DDP step must equal the 1x32 step over the same images
    common = ["--dataset", "synthetic", "--synthetic-size", "256", "--model", "small_cnn", "--no-batchnorm",
              "--no-dropout", "--optimizer", "sgd", "--momentum", "0", "--lr", "0.1", "--epochs", "1",
              "--steps-per-epoch", "1", "--keep-last", "1"]
    one = run_train([*common, "--batch-size", "32", "--out-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_torchrun(2, [*common, "--batch-size", "16", "--out-dir", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    from dist_cifar.models import build_model
    torch.manual_seed(42)
    init = build_model("small_cnn", batchnorm=False, dropout=False).state_dict()
    assert any((a[k] - init[k]).abs().max() > 1e-4 for k in a)  # the step did something
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=0), key


def test_sync_bn_on_cpu_is_a_clear_error(tmp_path):
    proc = run_torchrun(2, smoke_args(tmp_path / "o", ["--sync-bn"]), timeout=120)
    assert proc.returncode != 0 and "--sync-bn needs GPUs" in proc.stderr


def test_multi_node_simulated_with_c10d(tmp_path):
    port = free_port()
    out = tmp_path / "run"
    args = smoke_args(out, ["--epochs", "2"])
    logs = [open(tmp_path / f"node{r}.log", "w") for r in range(2)]  # files, not pipes: no full-pipe stalls
    procs = [subprocess.Popen(torchrun_cmd(1, args, ["--nnodes=2", f"--node_rank={r}", "--rdzv-backend=c10d",
                                                     f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=sim"]),
                              cwd=ROOT, env=base_env(), stdout=logs[r], stderr=subprocess.STDOUT)
             for r in range(2)]
    deadline = time.monotonic() + 240
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        for p in procs:
            p.kill()
        for f in logs:
            f.close()
    text = "".join((tmp_path / f"node{r}.log").read_text()[-2000:] for r in range(2))
    assert [p.returncode for p in procs] == [0, 0], text
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1]


def test_crash_on_one_rank_fails_whole_job_fast(tmp_path):
    out = tmp_path / "run"
    start = time.monotonic()
    proc = run_torchrun(2, smoke_args(out, ["--epochs", "5", "--dist-timeout", "120"]), timeout=120,
                        DIST_CIFAR_FAULT="crash:rank=1:step=3")
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 60, f"took {elapsed:.0f}s"
    assert "injected crash" in proc.stderr and "ChildFailedError" in proc.stderr
    assert "rank      : 1" in proc.stderr or "rank: 1" in proc.stderr  # torchrun's error record names it
