"""The GPU configuration, rehearsed on CPU: every design x precision x optimizer under
`--resolve-as cuda` (bf16/fp16 autocast, GradScaler, fused optimizers, channels_last, compile,
an agreement every 25 steps), at 2 ranks and, for the sharded designs, 3 (uneven splits). Each
cell trains two steps, checkpoints, and resumes for two more. One torchrun launch per world
size runs every cell (tests/jobs_worker.py), plus the fault cells of the drift guard."""
from __future__ import annotations

import json
import math

import pytest

from conftest import read_jsonl, torchrun_jobs


DESIGNS, PRECISIONS, OPTIMIZERS = ("ddp", "hybrid", "fsdp"), ("bf16", "fp16"), ("adam", "adamw", "sgd")


COMPILED = {("ddp", "bf16", "adamw"), ("hybrid", "fp16", "adam"), ("fsdp", "bf16", "sgd")}  # one per design


def cell_argv(out, design: str, precision: str, optimizer: str, *, model: str = "small_cnn",
              compile_: bool = False) -> list[str]:
    return ["--model", model, "--dataset", "synthetic", "--synthetic-size", "128", "--batch-size", "8",
            "--eval-batch-size", "32", "--steps-per-epoch", "2", "--resolve-as", "cuda", "--wandb", "off",
            "--quiet", "--parallel", design, "--precision", precision, "--optimizer", optimizer,
            "--compile" if compile_ else "--no-compile", "--out-dir", str(out)]


def launch(tmp_path_factory, nproc: int, jobs: list[dict], timeout: float) -> dict[str, dict]:
    work = tmp_path_factory.mktemp(f"matrix{nproc}")
    results = torchrun_jobs(nproc, jobs, work, timeout=timeout)
    for name, result in results.items():
        result["out"] = work / name.split("/")[0]
    return results


def matrix_jobs(cells, *, compiled=COMPILED) -> list[dict]:
    jobs = []
    for design, precision, optimizer in cells:
        name = f"{design}-{precision}-{optimizer}"
        argv = cell_argv("{work}/" + name, design, precision, optimizer,
                         compile_=(design, precision, optimizer) in compiled)
        jobs.append({"name": f"{name}/train", "argv": argv + ["--epochs", "1", "--no-final-eval"], "env": {}})
        # a compiled cell resumes eagerly: its checkpoint is the plain module's, whatever ran it
        jobs.append({"name": f"{name}/resume", "argv": argv + ["--epochs", "2", "--no-compile"], "env": {}})
    return jobs


FAULT_CELLS = {
    # name: (design, precision, fault, expected exit code)
    "overflow-hybrid": ("hybrid", "fp16", "overflow:rank=1:step=2", 0),
    "overflow-ddp": ("ddp", "fp16", "overflow:rank=1:step=2", 4),  # injected after DDP's all-reduce: a split skip
    "drift-ddp": ("ddp", "bf16", "drift:rank=1:step=2", 4),
    "drift-hybrid": ("hybrid", "fp16", "drift:rank=1:step=2", 4),
}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    cells = [(d, p, o) for d in DESIGNS for p in PRECISIONS for o in OPTIMIZERS]
    jobs = matrix_jobs(cells)
    # the reported crash: vgg_truncated (BatchNorm in every block) under fsdp + bf16
    jobs.append({"name": "vgg-fsdp-bf16/train", "argv": cell_argv("{work}/vgg-fsdp-bf16", "fsdp", "bf16", "adam",
                                                                  model="vgg_truncated") + ["--epochs", "1"], "env": {}})
    for name, (design, precision, fault, _) in FAULT_CELLS.items():
        argv = cell_argv("{work}/" + name, design, precision, "adam") + ["--epochs", "2", "--steps-per-epoch", "3"]
        jobs.append({"name": f"{name}/run", "argv": argv, "env": {"DIST_CIFAR_FAULT": fault}})
    return launch(tmp_path_factory, 2, jobs, timeout=900)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    cells = [(d, p, o) for d in ("hybrid", "fsdp") for p in PRECISIONS for o in OPTIMIZERS]
    return launch(tmp_path_factory, 3, matrix_jobs(cells, compiled=()), timeout=900)  # compiled at 2 ranks


def check_cell(results: dict, design: str, precision: str, optimizer: str, world: int) -> None:
    compiled = world == 2 and (design, precision, optimizer) in COMPILED
    name = f"{design}-{precision}-{optimizer}"
    for phase in ("train", "resume"):
        for rank, r in enumerate(results[f"{name}/{phase}"]["ranks"]):
            assert r["code"] == 0, f"{name} {phase} rank {rank}: {r['stderr'][-2500:]}"
    out = results[f"{name}/train"]["out"]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1], name
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in rows), rows
    assert "resumed from" in results[f"{name}/resume"]["ranks"][0]["stdout"]
    config = json.loads((out / "config.json").read_text())
    kernel = "foreach" if (design, optimizer) == ("fsdp", "sgd") else "fused"
    assert (config["device"], config["resolve_as"], config["precision"], config["optimizer_kernel"],
            config["channels_last"], config["guard_every"], config["world_size"], config["parallel_resolved"]) == \
        ("cpu", "cuda", precision, kernel, True, 25, world, design)
    assert config["compile"] is False  # config.json is the resumed run's; the first one compiled:
    assert ("compile on" in results[f"{name}/train"]["ranks"][0]["stdout"]) == compiled
    assert (rows[0]["skipped_steps"] is None) == (precision == "bf16")
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["best_test_accuracy"] <= 100


@pytest.mark.parametrize("design", DESIGNS)
def test_every_cell_trains_and_resumes_at_two_ranks(two_ranks, design):
    for precision in PRECISIONS:
        for optimizer in OPTIMIZERS:
            check_cell(two_ranks, design, precision, optimizer, world=2)


@pytest.mark.parametrize("design", ("hybrid", "fsdp"))
def test_sharded_designs_train_and_resume_on_uneven_splits(three_ranks, design):
    for precision in PRECISIONS:
        for optimizer in OPTIMIZERS:
            check_cell(three_ranks, design, precision, optimizer, world=3)
    if design == "hybrid":  # 64 neurons of fc1 over 3 ranks
        start = three_ranks["hybrid-bf16-adam/train"]["ranks"][0]["stdout"]
        assert "22/21/21 neurons per rank" in start


def test_fsdp_bf16_with_batchnorm_trains(two_ranks):
    """The reported step-1 crash (BatchNorm's weight cast to bf16 beside fp32 running statistics)."""
    for rank in two_ranks["vgg-fsdp-bf16/train"]["ranks"]:
        assert rank["code"] == 0, rank["stderr"][-2500:]
    assert "BatchNorm fp32" in two_ranks["vgg-fsdp-bf16/train"]["ranks"][0]["stdout"]


def test_an_fp16_overflow_in_one_slice_skips_the_step_on_every_rank(two_ranks):
    ranks = two_ranks["overflow-hybrid/run"]["ranks"]
    assert [r["code"] for r in ranks] == [0, 0], ranks[1]["stderr"][-2000:]
    assert "the fp16 GradScaler skipped 1 step(s) on every rank, the first at step 2" in ranks[0]["stdout"]
    rows = read_jsonl(two_ranks["overflow-hybrid/run"]["out"] / "metrics.jsonl")
    assert [r["skipped_steps"] for r in rows] == [1, 0]


@pytest.mark.parametrize("cell", ("overflow-ddp", "drift-ddp", "drift-hybrid"))
def test_replicas_that_drift_apart_stop_the_run_with_one_line(two_ranks, cell):
    ranks = two_ranks[f"{cell}/run"]["ranks"]
    for r in ranks:
        assert r["code"] == 4, r["stderr"][-2000:]
        errors = [line for line in r["stderr"].splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("error: replicas diverged"), r["stderr"][-2000:]
        assert "conv1.weight differs on rank 1 from rank 0" in errors[0] and "Traceback" not in r["stderr"]
    out = two_ranks[f"{cell}/run"]["out"]
    assert not (out / "summary.json").exists()
