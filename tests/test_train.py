import json

import pytest
import torch

from conftest import read_jsonl, run_train, smoke_args
from dist_cifar.config import CHOICES, build_parser, field_docs, make_config, parse_config, TrainConfig

OUTPUTS = ("config.json", "metrics.jsonl", "summary.json", "best.pt", "loss_curves.png", "confusion_matrix.png")


def test_two_epoch_small_cnn_run_learns_and_writes_everything(tmp_path):
    out = tmp_path / "run"
    proc = run_train(["--dataset", "synthetic", "--synthetic-size", "1024", "--model", "small_cnn",
                      "--epochs", "2", "--batch-size", "32", "--out-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [0, 1]
    assert metrics[1]["train_loss"] < metrics[0]["train_loss"]
    for m in metrics:
        assert m["epoch_time_s"] > 0 and m["images_per_s"] > 0 and 0 <= m["val_accuracy"] <= 100
    summary = json.loads((out / "summary.json").read_text())
    for key in ("num_params", "train_accuracy", "val_accuracy", "test_accuracy", "best_epoch", "total_time_s"):
        assert key in summary
    assert summary["num_params"] == 69_050 and summary["test_accuracy"] > 20  # chance is 10
    assert summary["best_epoch"] == min(metrics, key=lambda m: m["val_loss"])["epoch"]
    assert sum(map(sum, summary["confusion_matrix"])) == 256
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "small_cnn" and config["world_size"] == 1 and config["global_batch_size"] == 32
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["model_name"] == "small_cnn" and "fc1.weight" in best["state_dict"]
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_refuses_to_overwrite_out_dir(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    proc = run_train(smoke_args(out), timeout=120)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (out / "precious.txt").read_text() == "keep me" and not (out / "metrics.jsonl").exists()
    proc = run_train(smoke_args(out, ["--overwrite"]), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "precious.txt").exists()  # --overwrite replaces the run's files, not yours


BAD_FLAGS = [
    (["--epochs", "-1"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "0"], "--lr"),
    (["--preset", "report", "--dataset", "synthetic", "--synthetic-size", "100"], "--split"),
    (["--preset", "report", "--max-train", "30000"], "--max-train"),
    (["--device", "cpu", "--backend", "nccl"], "--backend"),
    (["--backend", "nccl"], "--backend"),          # a CPU host, device auto
    (["--device", "cuda"], "--device"),             # no GPU here
    (["--label-smoothing", "1.5"], "--label-smoothing"),
    (["--model", "nope"], "--model"),
    (["--weight-decay", "nan"], "--weight-decay"), (["--momentum", "-1"], "--momentum"),
    (["--dist-timeout", "nan"], "--dist-timeout"), (["--lr", "inf"], "--lr"),
    (["--label-smoothing", "nan"], "--label-smoothing"), (["--ddp-bucket-mb", "0"], "--ddp-bucket-mb"),
    (["--epoch", "3"], "did you mean --epochs"), (["--optimizer", "lbfgs"], "lbfgs"), (["--epochs", "x"], "--epochs"),
    # GPU combinations that cannot work: refused at config time, never at step 1
    (["--parallel", "fsdp", "--ddp-comm-hook", "bf16"], "--ddp-comm-hook"),
    (["--parallel", "fsdp", "--optimizer", "sgd", "--optimizer-kernel", "fused", "--resolve-as", "cuda"],
     "--optimizer-kernel"),
    (["--resolve-as", "tpu"], "--resolve-as"),
]


@pytest.mark.parametrize("flags,named", BAD_FLAGS)
def test_bad_flags_are_refused_naming_the_flag(flags, named):
    """In-process: parse + resolve (the whole up-front check) raise one line naming the flag."""
    from dist_cifar.config import ConfigError
    from dist_cifar.runtime import resolve
    with pytest.raises(ConfigError) as info:
        resolve(parse_config(flags))
    assert named in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("flags,named", [BAD_FLAGS[6], BAD_FLAGS[10], BAD_FLAGS[16]])
def test_bad_flags_fail_fast_with_one_line(tmp_path, flags, named):
    """The same through the real entry point: exit 2, one line on stderr, nothing created."""
    proc = run_train([*flags, "--out-dir", str(tmp_path / "o")], timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()


def test_wandb_online_without_wandb_installed_is_one_line(tmp_path):
    """A wandb that fails to import, as on a host without it: exit 2 before any work."""
    shadow = tmp_path / "shadow" / "wandb"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    from conftest import ROOT, base_env
    env = base_env()
    env["PYTHONPATH"] = f"{tmp_path / 'shadow'}:{ROOT}"
    proc = run_train(["--wandb", "online", "--out-dir", str(tmp_path / "o")], timeout=60, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--wandb" in lines[0] and "pip install wandb" in lines[0]
    assert not (tmp_path / "o").exists()


def test_argparse_rejects_unknown_choice(tmp_path):
    proc = run_train(["--optimizer", "lbfgs"], timeout=60)
    assert proc.returncode == 2 and "--optimizer" in proc.stderr


def other_value(name: str, default):
    """A valid value for field `name` that differs from its default, as (argv, expected)."""
    flag = "--" + name.replace("_", "-")
    if default is None:  # Optional[bool]: None is "auto" (resolved per device)
        return [flag], True
    if isinstance(default, bool):
        return ([flag.replace("--", "--no-", 1)] if default else [flag]), not default
    if name in CHOICES:
        value = next(o for o in CHOICES[name] if o and o != default)
        return [flag, value], value
    special = {"model": "vgg_truncated", "resume": "some/ckpt.pt", "val_size": 7}
    if name in special:
        return [flag, str(special[name])], special[name]
    if isinstance(default, int):
        return [flag, str(default + 3)], default + 3
    if isinstance(default, float):
        value = default / 2 if default else 0.25
        return [flag, repr(value)], value
    return [flag, "x-value"], "x-value"


def test_every_field_is_documented_and_round_trips_through_its_flag():
    """Each field, set alone to a non-default value on the command line, arrives in the config
    with that value and type (bools through --flag / --no-flag, choices, ints, floats)."""
    docs = field_docs()
    import dataclasses
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        assert len(docs.get(f.name, "")) > 10, f"{f.name} has no docstring"
        argv, expected = other_value(f.name, getattr(defaults, f.name))
        value = getattr(parse_config(argv), f.name)
        assert value == expected and type(value) is type(expected), (f.name, argv, value)
    assert len(dataclasses.fields(TrainConfig)) >= 60


def test_flags_the_readme_uses_exist():
    """README.md is written by hand: every trainer flag it shows must be accepted."""
    import re
    from conftest import ROOT
    launcher_flags = {"--standalone", "--nnodes", "--node_rank", "--nproc_per_node", "--rdzv-backend",
                      "--rdzv-endpoint", "--rdzv-id", "--max-restarts", "--signal", "--requeue", "--array",
                      "--gres", "--cpus-per-task", "--nodes", "--slurm", "--wait", "--sbatch-args", "--out",
                      "--report-only", "--variants", "--smoke", "--extra", "--dataset-dir", "--gpus", "--help",
                      "--print-config", "--wandb-mode", "--rungs", "--nproc", "--no-python",
                      # launch/two_hosts.sh and benchmarks/scaling.py
                      "--rate", "--nproc-per-host", "--designs", "--check-scaleout",
                      # pip, and the benchmark scripts' own flags
                      "--no-index", "--no-build-isolation", "--publish", "--models", "--rounds"}
    known = {a for action in build_parser()._actions for a in action.option_strings}
    used = set(re.findall(r"(--[a-z][a-z0-9_-]*[a-z0-9])", (ROOT / "README.md").read_text()))
    unknown = sorted(used - known - launcher_flags)
    assert not unknown, unknown


def test_preset_then_explicit_flags_override():
    cfg = parse_config(["--preset", "report", "--lr", "0.01", "--epochs", "3"])
    assert cfg.batch_size == 32 and cfg.eval_batch_size == 128 and cfg.normalize == "half"
    assert cfg.split == "report" and cfg.weight_decay == 0.01 and cfg.seed == 42
    assert cfg.lr == 0.01 and cfg.epochs == 3
    assert make_config(preset="report", weight_decay=0.0).weight_decay == 0.0
