"""The CUDA path's defaults and its CPU-checkable guarantees: per-device auto values, the global
batch, a non-finite guard that is true at any --guard-every, fp16 skip counting, no evaluation
recompiles, setup errors that reach every rank, and a setup that reuses an installed torch."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, base_env, read_jsonl, run_torchrun, run_train, smoke_args
from dist_cifar import checkpoint as ckpt
from dist_cifar import distributed as D
from dist_cifar.assembly import assemble
from dist_cifar.config import ConfigError, make_config, parse_config
from dist_cifar.data import make_splits, make_synthetic
from dist_cifar.engine import EpochStart, NonFiniteLoss, StepHooks, train_epoch
from dist_cifar.runtime import resolve, settle


def test_auto_values_resolve_per_device():
    cfg = make_config(precision="fp16")  # explicit: a CPU-only torch cannot answer is_bf16_supported
    gpu = settle(cfg, "cuda", 1)
    assert (gpu.channels_last, gpu.compile, gpu.guard_every, gpu.loader) == (True, True, 25, "tensor")
    cpu = settle(make_config(), "cpu", 1)
    assert (cpu.precision, cpu.channels_last, cpu.compile, cpu.guard_every) == ("fp32", False, False, 1)
    explicit = settle(make_config(channels_last=False, compile=False, guard_every=5, precision="fp32"), "cuda", 1)
    assert (explicit.channels_last, explicit.compile, explicit.guard_every) == (False, False, 5)
    assert settle(gpu, "cuda", 1) == gpu  # idempotent


def test_config_json_records_resolved_values(tmp_path):
    out = tmp_path / "run"
    assert run_train(smoke_args(out)).returncode == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["device"], config["precision"], config["channels_last"], config["compile"],
            config["guard_every"], config["backend"]) == ("cpu", "fp32", False, False, 1, "gloo")


def test_global_batch_divides_over_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    fast, _ = resolve(parse_config(["--preset", "fast", "--device", "cpu", "--precision", "fp32"]))
    assert (fast.batch_size, fast.global_batch_size) == (128, 512)  # the fast recipe's global batch
    mine, _ = resolve(parse_config(["--preset", "fast", "--device", "cpu", "--batch-size", "64"]))
    assert (mine.batch_size, mine.global_batch_size) == (64, 256)  # an explicit per-process batch wins
    both, _ = resolve(parse_config(["--global-batch-size", "256", "--batch-size", "64", "--device", "cpu"]))
    assert both.batch_size == 64
    alone, _ = resolve(parse_config(["--global-batch-size", "256", "--device", "cpu"]))  # no preset
    assert (alone.batch_size, alone.global_batch_size) == (64, 256)
    with pytest.raises(ConfigError, match="disagrees"):
        resolve(parse_config(["--global-batch-size", "256", "--batch-size", "32", "--device", "cpu"]))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="multiple of 3"):
        resolve(parse_config(["--global-batch-size", "256", "--device", "cpu"]))


def test_global_batch_under_torchrun(tmp_path):
    out = tmp_path / "run"
    proc = run_torchrun(2, [*smoke_args(out), "--global-batch-size", "64"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert (config["batch_size"], config["global_batch_size"], config["world_size"]) == (32, 64, 2)
    assert "batch 32 per process = global batch 64" in proc.stdout
    assert read_jsonl(out / "metrics.jsonl")[0]["steps"] == 256 // 64


def test_nan_between_guard_steps_is_caught_and_never_checkpointed(tmp_path):
    """--guard-every 25 with 8 steps an epoch: only step 0 of each epoch is a guard step. A NaN at
    global step 10 (epoch 1, step 2) is applied by the optimizer; the end-of-epoch check must stop
    the run before epoch 1's checkpoint, and say that steps were applied."""
    out = tmp_path / "run"
    proc = run_train(smoke_args(out, ["--epochs", "3", "--guard-every", "25"]), DIST_CIFAR_FAULT="nan:rank=0:step=10")
    assert proc.returncode == 3, proc.stderr[-2000:]
    line = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(line) == 1 and "first at epoch 1 step 2" in line[0] and "applied" in line[0], proc.stderr
    assert "stopped before" not in line[0]
    assert [p.name for p in ckpt.committed(out)] == ["ckpt-e0001-s0000000.pt"]
    for path in ckpt.committed(out):
        weights = ckpt.load(path)["model"]
        assert all(torch.isfinite(t.float()).all() for t in weights.values())


def test_fp16_overflow_counter_counts_skipped_steps():
    """Ten steps that all overflow (a huge initial loss scale), --max-skipped-steps 3 and
    --guard-every 25: counting guard intervals would never stop; counting steps stops at the
    epoch-end check with the true count."""
    cfg = make_config(precision="fp16", batch_size=16, steps_per_epoch=10, max_skipped_steps=3, guard_every=25)
    run = assemble(cfg, D.DistInfo(), make_splits(make_synthetic(256), "full"))
    run.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)
    before = [p.detach().clone() for p in run.model.module.parameters()]
    hooks = StepHooks(guard_every=25, max_skipped_steps=3)
    with pytest.raises(NonFiniteLoss, match=r"^10 fp16 overflow"):
        train_epoch(run.step_parts, run.loader, D.DistInfo(), EpochStart(0), hooks)
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.module.parameters()))  # all skipped


def test_compiled_run_does_not_recompile_for_uneven_eval_batches(tmp_path):
    """300 synthetic images: validation 75 = 64 + 11, test 75, train 300: every evaluation ends
    on a short batch. Padding keeps one shape: the only recompile allowed is train -> eval."""
    out = tmp_path / "run"
    proc = run_train(smoke_args(out, ["--synthetic-size", "300", "--compile", "--epochs", "2"]), timeout=600,
                     TORCH_LOGS="recompiles")
    assert proc.returncode == 0, proc.stderr[-3000:]
    recompiles = re.findall(r"Recompiling function", proc.stderr)
    assert len(recompiles) <= 1, proc.stderr[-4000:]
    assert json.loads((out / "summary.json").read_text())["steady_epoch_time_s"] > 0


def test_setup_error_reaches_every_rank_as_one_line(tmp_path):
    empty = tmp_path / "nodata"
    empty.mkdir()
    proc = run_torchrun(2, ["--dataset", "cifar10", "--data-dir", str(empty), "--out-dir", str(tmp_path / "o"),
                            "--dist-timeout", "60"], timeout=180)
    assert proc.returncode != 0
    # one line from each rank (counted in the text: two ranks writing at once can share a line)
    assert proc.stderr.count("error: CIFAR-10 download from") == 2, proc.stderr[-3000:]
    assert "Connection closed" not in proc.stderr and "dist_cifar/" not in proc.stderr.replace(str(ROOT), "")
    assert not re.search(r'File ".*dist_cifar/.*\.py"', proc.stderr), proc.stderr[-3000:]


def fake_nvidia_smi(folder):
    folder.mkdir()
    tool = folder / "nvidia-smi"
    tool.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-00000000-0000-0000-0000-000000000000)'\n")
    tool.chmod(0o755)
    return folder


def test_gpus_the_driver_lists_but_torch_cannot_see_stop_the_trainer(tmp_path):
    """A driver reports a GPU (nvidia-smi stands in for it here) while this torch sees none: the
    trainer stops with one line instead of silently training on the CPU; --device cpu still runs."""
    bin_dir = fake_nvidia_smi(tmp_path / "bin")
    env = base_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = run_train(smoke_args(tmp_path / "o"), timeout=60, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "nvidia-smi lists 1 GPU" in lines[0], proc.stderr
    assert run_train(smoke_args(tmp_path / "o2", ["--device", "cpu"]), env=env).returncode == 0


def copy_of_the_checkout(tmp_path):
    copy = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for name in files + ["launch/setup_env.sh"]:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, copy / name)
    return copy


def test_setup_on_a_gpu_host_without_wandb_nor_index(tmp_path):
    """The GPU host: a usable torch, no wandb, no package index, and a torch that bounds
    setuptools (torch 2.11 wants <82; a stand-in dist-info says so here). Setup builds .venv, says
    in one line that W&B is off, and asks only for a setuptools within torch's bound."""
    shadow = tmp_path / "shadow"
    (shadow / "wandb").mkdir(parents=True)
    (shadow / "wandb" / "__init__.py").write_text("raise ImportError('no wandb on this host')\n")
    meta = shadow / f"torch-{torch.__version__.split('+')[0]}.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {torch.__version__}\n"
                                   "Requires-Dist: setuptools<82\n")
    copy = copy_of_the_checkout(tmp_path)
    env = base_env(PYTHON=sys.executable, PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/simple",
                   PYTHONPATH=f"{shadow}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(["bash", "launch/setup_env.sh"], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wandb_lines = [l for l in proc.stderr.splitlines() if "wandb" in l]
    assert wandb_lines == ["[setup] wandb is not installed and cannot be installed here: W&B logging is off until "
                           "'pip install wandb' (training is unaffected)"], proc.stderr
    assert "no setuptools>=70.1,<82 to be had" in proc.stderr, proc.stderr  # torch's bound is kept
    run = subprocess.run([str(copy / ".venv/bin/python"), "-m", "dist_cifar.train", "--dataset", "synthetic",
                          "--synthetic-size", "128", "--epochs", "1", "--batch-size", "32", "--model", "linear",
                          "--out-dir", str(tmp_path / "o")], cwd=copy, env={**env, "WANDB_MODE": ""},
                         capture_output=True, text=True, timeout=200)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "wandb is not installed; W&B logging is off" in run.stdout


def test_setup_reuses_an_installed_torch_without_a_package_index(tmp_path):
    """PYTHON has torch (and the rest) already, and no package index answers: setup must build
    .venv from what is installed and install nothing."""
    copy = copy_of_the_checkout(tmp_path)
    env = base_env(PYTHON=sys.executable, PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/simple")
    proc = subprocess.run(["bash", "launch/setup_env.sh"], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"using the installed torch {torch.__version__}" in proc.stderr and "installing" not in proc.stderr
    check = subprocess.run([str(copy / ".venv/bin/python"), "-c",
                            "import torch, dist_cifar; print(torch.__version__, dist_cifar.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120,
                           env={k: v for k, v in env.items() if k != "PYTHONPATH"})
    version, where = check.stdout.split()
    assert version == torch.__version__ and where.startswith(str(copy)), check.stderr
    again = subprocess.run(["bash", "launch/setup_env.sh"], cwd=copy, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and again.stderr == ""  # stamped: nothing to do
