"""dist_cifar/config.py, runtime.py, host.py: flags, presets, --help, the per-device resolution (--resolve-as), one-line errors for bad input."""
from __future__ import annotations

import json
import re
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import base_env, make_tree, read_jsonl, ROOT, run_torchrun, run_train, smoke_args, write_official_cifar
from dist_cifar import data as D
from dist_cifar.config import build_parser, CHOICES, ConfigError, field_docs, make_config, parse_config, TrainConfig
from dist_cifar.runtime import resolve, settle
from dist_cifar.data import DataError


def test_sync_bn_on_cpu_is_a_clear_error(tmp_path):
    proc = run_torchrun(2, smoke_args(tmp_path / "o", ["--sync-bn"]), timeout=120)
    assert proc.returncode != 0 and "--sync-bn needs GPUs" in proc.stderr


def test_auto_values_resolve_per_device():
    cfg = make_config(precision="fp16")  # explicit: a CPU-only torch cannot answer is_bf16_supported
    gpu = settle(cfg, "cuda", 1)
    assert (gpu.channels_last, gpu.compile, gpu.guard_every, gpu.loader) == (True, True, 25, "tensor")
    cpu = settle(make_config(), "cpu", 1)
    assert (cpu.precision, cpu.channels_last, cpu.compile, cpu.guard_every) == ("fp32", False, False, 1)
    explicit = settle(make_config(channels_last=False, compile=False, guard_every=5, precision="fp32"), "cuda", 1)
    assert (explicit.channels_last, explicit.compile, explicit.guard_every) == (False, False, 5)
    assert settle(gpu, "cuda", 1) == gpu  # idempotent


@pytest.mark.quick
def test_config_json_records_resolved_values(tmp_path):
    out = tmp_path / "run"
    assert run_train(smoke_args(out)).returncode == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["device"], config["precision"], config["channels_last"], config["compile"],
            config["guard_every"], config["backend"]) == ("cpu", "fp32", False, False, 1, "gloo")
    # the run's own config.json, passed back with --config, resolves to the same config
    from dist_cifar.config import RUN_FACTS, TrainConfig, parse_command
    again, _ = resolve(parse_command(["--config", str(out / "config.json")])[0])
    fields = set(TrainConfig.__dataclass_fields__)
    assert set(config) <= fields | set(RUN_FACTS), set(config) - fields - set(RUN_FACTS)
    assert again.to_dict() == {k: v for k, v in config.items() if k in fields}


@pytest.mark.quick
def test_config_files_round_trip_and_rank_between_preset_and_flags(tmp_path, capsys):
    """--config (TOML or JSON): defaults < --preset < the file < flags; --print-config --format toml
    writes a file that --config reads back to the same resolved config; an unknown key or a value
    of the wrong type is one line naming it."""
    from dist_cifar.config import parse_command
    from dist_cifar.train import main
    assert main(["--preset", "fast", "--print-config", "--format", "toml"]) == 0
    (tmp_path / "fast.toml").write_text(capsys.readouterr().out)
    assert main(["--config", str(tmp_path / "fast.toml"), "--print-config"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert main(["--preset", "fast", "--print-config"]) == 0
    assert from_file == json.loads(capsys.readouterr().out)
    (tmp_path / "mine.toml").write_text('preset = "report"\nepochs = 3\nlr = 1\n')
    cfg = parse_command(["--config", str(tmp_path / "mine.toml"), "--epochs", "5"])[0]
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.split) == (5, 1.0, 32, "report")  # flag > file > preset
    (tmp_path / "mine.json").write_text(json.dumps({"train": {"weight-decay": 0.5}}))
    assert parse_command(["--config", str(tmp_path / "mine.json")])[0].weight_decay == 0.5
    for text, named in (("epoch = 3\n", "unknown setting 'epoch' (did you mean 'epochs'?)"),
                        ('epochs = "3"\n', "epochs = '3' is not a int"), ("epochs = \n", "neither valid TOML nor JSON")):
        (tmp_path / "bad.toml").write_text(text)
        with pytest.raises(ConfigError, match=re.escape(named)):
            parse_command(["--config", str(tmp_path / "bad.toml")])


@pytest.mark.quick
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


@pytest.mark.quick
def test_help_is_grouped_by_concern_and_shows_the_version():
    import dataclasses

    from dist_cifar import __version__
    from dist_cifar.config import TrainConfig, build_parser, flag_name
    parser = build_parser()
    text = parser.format_help()
    assert f"dist_cifar {__version__}" in text
    titles = [g.title for g in parser._action_groups]
    for concern in ("model", "data", "recipe", "speed", "distributed", "logging", "checkpoints"):
        assert any(t.split(" (")[0] == concern for t in titles), titles
    placed = {a.dest: g.title for g in parser._action_groups for a in g._group_actions}
    for field in dataclasses.fields(TrainConfig):  # every flag sits in a named group, not "options"
        assert placed[field.name] not in ("options", "other"), flag_name(field.name)
    assert placed["download"] == "data" and placed["wandb"].startswith("logging")
    assert placed["global_batch_size"] == "recipe" and placed["compile"].startswith("speed")


@pytest.mark.parametrize("cmd, named", [
    (["bash", "launch/single_node.sh", "abc", "--"], "NPROC must be a positive number"),
    (["bash", "launch/single_node.sh", "0", "--"], "NPROC must be a positive number"),
    (["bash", "slurm/train.sbatch"], "submit it with sbatch"),
    ([sys.executable, "-m", "dist_cifar.cost", "--peak-tflops", "0"], "must be > 0"),
    ([sys.executable, "-m", "dist_cifar.train", "--weight-decay", "1e308"], "overflow float32"),
    ([sys.executable, "-m", "dist_cifar.train", "--seed", "99999999999999999999"], "--seed must be in"),
    ([sys.executable, "benchmarks/epoch_time.py", "--rungs", "99"], "--rungs must be within"),
    ([sys.executable, "benchmarks/checkpoint.py", "--repeats", "0"], "--repeats must be > 0"),
])
def test_bad_input_is_one_line_not_a_traceback(cmd, named):
    """Cases 118, 124, 126, 127, 129."""
    proc = subprocess.run(cmd, cwd=ROOT, env=base_env(PYTHON=sys.executable, SLURM_JOB_ID=""), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert named in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.quick
def test_messages_say_what_is_true(tmp_path):
    """Cases 046/047 (another format told to --resume none, which was refused), 020 (--resume none
    'holds no checkpoint'), 088 (a valid .zip called a corrupt archive)."""
    from conftest import smoke_args
    from dist_cifar import checkpoint as ckpt
    out = tmp_path / "run"
    assert run_train(smoke_args(out)).returncode == 0
    path = ckpt.committed(out)[-1]
    blob = torch.load(path, weights_only=True)
    blob["format"] = 3
    torch.save(blob, path)
    ckpt.save(out, blob, 5, 0, keep_last=5)  # committed, but of another format
    proc = run_train(smoke_args(out, ["--epochs", "6"]))
    assert proc.returncode == 2 and "another dist_cifar version (format 3; this one reads 2)" in proc.stderr
    assert "--overwrite" in proc.stderr and "--resume none" not in proc.stderr
    none = run_train(smoke_args(out, ["--resume", "none"]))
    assert none.returncode == 2 and "--resume none: --out-dir" in none.stderr and "holds no checkpoint" not in none.stderr
    import zipfile
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("train/cat/0.png", b"x")
    with pytest.raises(DataError, match="is a zip file"):
        D.load_imagefolder(archive)


def test_odd_folders_and_flags_are_said_not_guessed(tmp_path):
    """Cases 079b (an empty class folder shifted every label), 095 (an image one folder too deep,
    silently ignored), 090e (11 names in batches.meta), 119 (--print-config printed 'auto'),
    121b/122 (ablate and plot tracebacks)."""
    tree = make_tree(tmp_path / "tree", per_class=1)
    (tree / "train" / "bird").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        D.load_imagefolder(tree)
    (tree / "train" / "bird").rmdir()
    deep = tree / "train" / "cat" / "more"
    deep.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(deep / "x.png")
    printed = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                              "from dist_cifar.data import load_imagefolder; load_imagefolder(Path(sys.argv[1]))",
                              str(tree)], cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=60)
    assert "ignoring 1 image(s) deeper than train/<class>/<image>" in printed.stdout, printed.stderr
    root = write_official_cifar(tmp_path / "data")
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(11)]}, f, protocol=2)
    with pytest.raises(DataError, match="names 11 classes"):
        D.load_cifar10(tmp_path / "data")
    shown = run_train(["--print-config"])
    config = json.loads(shown.stdout)
    assert config["precision"] == "fp32" and config["compile"] is False and config["guard_every"] == 1
    for cmd, named in (([sys.executable, "-m", "dist_cifar.ablate", "batchnorm", "--extra", "--lr '1"], "--extra"),
                       ([sys.executable, "-m", "dist_cifar.ablate", "batchnorm", "--out", str(tmp_path / "f.txt")],
                        "is a file"),
                       ([sys.executable, "-m", "dist_cifar.plot", str(tmp_path / "none")], "error:")):
        (tmp_path / "f.txt").write_text("x")
        proc = subprocess.run(cmd, cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and named in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    empty = subprocess.run([sys.executable, "-m", "dist_cifar.ablate", "all", "--report-only", "--out",
                            str(tmp_path / "missing")], cwd=ROOT, env=base_env(), capture_output=True, text=True,
                           timeout=60)
    assert empty.returncode == 0 and "Traceback" not in empty.stderr, empty.stderr


BAD_FLAGS = [
    (["--epochs", "-1"], "--epochs"),
    (["--epochs", "100000000000000000000"], "--epochs must be at most 1,000,000"),
    (["--profile-steps", "4:2"], "--profile-steps takes FIRST:END"),
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


@pytest.mark.quick
@pytest.mark.parametrize("flags,named", BAD_FLAGS)
def test_bad_flags_are_refused_naming_the_flag(flags, named):
    """In-process: parse + resolve (the whole up-front check) raise one line naming the flag."""
    from dist_cifar.config import ConfigError
    from dist_cifar.runtime import resolve
    with pytest.raises(ConfigError) as info:
        resolve(parse_config(flags))
    assert named in str(info.value) and "\n" not in str(info.value)


@pytest.mark.quick
@pytest.mark.parametrize("flags,named", [BAD_FLAGS[8], BAD_FLAGS[12], BAD_FLAGS[18]])
def test_bad_flags_fail_fast_with_one_line(tmp_path, flags, named):
    """The same through the real entry point: exit 2, one line on stderr, nothing created."""
    proc = run_train([*flags, "--out-dir", str(tmp_path / "o")], timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.quick
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
    if name == "eval_weights":  # the average needs an --ema to exist
        return [flag, "ema", "--ema", "0.9"], "ema"
    if name == "tp_size":  # only the hybrid has a tp group
        return [flag, "2", "--parallel", "hybrid"], 2
    if name in CHOICES:
        value = next(o for o in CHOICES[name] if o and o != default)
        return [flag, value], value
    special = {"model": "vgg_truncated", "resume": "some/ckpt.pt", "val_size": 7, "profile_steps": "2:4"}
    if name in special:
        return [flag, str(special[name])], special[name]
    if isinstance(default, int):
        return [flag, str(default + 3)], default + 3
    if isinstance(default, float):
        value = default / 2 if default else 0.25
        return [flag, repr(value)], value
    return [flag, "x-value"], "x-value"


@pytest.mark.quick
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


@pytest.mark.quick
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
                      "--rate", "--nproc-per-host", "--designs", "--check-scaleout", "--quick",
                      # pip, and the benchmark scripts' own flags
                      "--no-index", "--no-build-isolation", "--publish", "--models", "--rounds"}
    known = {a for action in build_parser()._actions for a in action.option_strings}
    used = set(re.findall(r"(--[a-z][a-z0-9_-]*[a-z0-9])", (ROOT / "README.md").read_text()))
    unknown = sorted(used - known - launcher_flags)
    assert not unknown, unknown


@pytest.mark.quick
def test_preset_then_explicit_flags_override():
    cfg = parse_config(["--preset", "report", "--lr", "0.01", "--epochs", "3"])
    assert cfg.batch_size == 32 and cfg.eval_batch_size == 128 and cfg.normalize == "half"
    assert cfg.split == "report" and cfg.weight_decay == 0.01 and cfg.seed == 42
    assert cfg.lr == 0.01 and cfg.epochs == 3
    assert make_config(preset="report", weight_decay=0.0).weight_decay == 0.0


@pytest.mark.quick
def test_threads_follow_the_usable_cpus_and_the_load(monkeypatch):
    """host.intra_op_threads: OMP_NUM_THREADS decides when set; else the usable CPUs (over the
    node's processes) less what other work keeps busy. --threads beyond 4x the CPUs is one line;
    the forecast's warning names the fix when the first steps got far less CPU than they asked."""
    from dist_cifar import budget, host
    from dist_cifar.runtime import resolve_threads
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert host.intra_op_threads() == (3, "OMP_NUM_THREADS=3")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(host, "usable_cpus", lambda: 2)
    monkeypatch.setattr(host, "machine_load", lambda: 0.0)
    assert host.intra_op_threads()[0] == 2 and host.intra_op_threads(local_world_size=2)[0] == 1
    monkeypatch.setattr(host, "machine_load", lambda: 2.0)  # two busy processes beside it
    threads, why = host.intra_op_threads()
    assert threads == 1 and "load 2.0" in why
    notes: list[str] = []
    assert resolve_threads(0, notes) == 1 and "results depend on the thread count" in notes[0]
    with pytest.raises(ConfigError, match="--threads 100000"):
        resolve_threads(100000, [])
    warning = budget.cpu_starved(0.5, 0.3, threads=2, local_world_size=1)
    assert warning and "--threads 1" in warning and "got 0.6 of the 2" in warning
    assert budget.cpu_starved(0.5, 0.95, threads=2, local_world_size=1) is None


@pytest.mark.quick
def test_warmup_ramps_then_holds_or_anneals(tmp_path):
    """--warmup-epochs / --warmup-lr (#31): linear from the warm-up lr to --lr over the warm-up
    steps, then constant or cosine to 0; refused with onecycle; part of the run's identity; a
    real run's lr at the end of its first epoch is halfway up a two-epoch warm-up."""
    from dist_cifar.assembly import warmup_factor
    from dist_cifar.checkpoint import RUN_IDENTITY
    for cosine, at_end in ((False, 1.0), (True, 0.0)):
        factor = [warmup_factor(t, warmup=15, total=30, start=0.1, cosine=cosine) for t in range(31)]
        assert factor[0] == pytest.approx(0.1) and factor[15] == pytest.approx(1.0)
        assert factor[5] == pytest.approx(0.1 + 0.9 * 5 / 15) and factor[30] == pytest.approx(at_end, abs=1e-9)
    with pytest.raises(ConfigError, match="onecycle warms up by itself"):
        make_config(schedule="onecycle", warmup_epochs=1)
    with pytest.raises(ConfigError, match="--warmup-epochs must be in 0..--epochs"):
        make_config(epochs=2, warmup_epochs=3)
    assert {"warmup_epochs", "warmup_lr"} <= set(RUN_IDENTITY)
    proc = run_train(smoke_args(tmp_path / "run", ["--epochs", "2", "--warmup-epochs", "2", "--lr", "0.002"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert lrs[0] == pytest.approx(0.001) and lrs[1] == pytest.approx(0.002)
