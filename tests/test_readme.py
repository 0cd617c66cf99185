"""Every command of README.md, taken from the README itself and run the way it says: from the
checkout's root with the venv activated, on a copy of the checkout whose data/ holds a small
CIFAR-10 in the official format and a small image tarball. Tiny inputs are appended flags (later
flags win); a command this table does not know fails the test, so the text cannot drift from the
code again."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

from conftest import base_env, ROOT, write_image_tarball, write_official_cifar


TINY_REPORT = "--epochs 1 --max-train 64"  # the report split on the official-format data/


TINY_IMAGES = "--epochs 1 --max-train 32 --split full --val-size 10"  # the small image tarball


TINY_FAST = "--model small_cnn --no-compile --global-batch-size 32 --epochs 1 --steps-per-epoch 2 --max-train 512"


@dataclass
class Rule:
    """How the test runs one README command."""
    pattern: str                       # regex the whole command matches
    append: str = ""                   # tiny inputs, appended
    env: Optional[dict] = None         # tiny inputs given as the environment
    expect: int = 0                    # exit code
    expect_text: str = ""              # in stdout + stderr
    check_flags: bool = False          # cannot run here (other hosts, GPUs): only the trainer flags are checked
    skip: str = ""                     # why not at all, and which test covers it
    slurm: bool = False                # an sbatch: wait for the job and check its run
    before: Optional[Callable[[Path], None]] = None


def tiny_runs_for_tta(repo: Path) -> None:
    for variant, flags in (("with_bn", []), ("without_bn", ["--no-batchnorm"])):
        out = repo / "runs" / "ablations" / "batchnorm" / variant
        proc = subprocess.run([sys.executable, "-m", "dist_cifar.train", "--model", "small_cnn", *flags, "--dataset",
                               "synthetic", "--synthetic-size", "256", "--epochs", "1", "--out-dir", str(out),
                               "--wandb", "off"], cwd=repo, capture_output=True, text=True, timeout=120, env=sandbox_env())
        assert proc.returncode == 0, proc.stderr[-2000:]


RULES = [
    Rule(r"bash launch/setup_env\.sh"),
    Rule(r"source \.venv/bin/activate", skip="every command here runs after it"),
    Rule(r"pip install \.", skip="test_newcomer.py installs a clean copy into a fresh venv (here it would change "
                                 "the shared .venv)"),
    Rule(r"bash launch/quickstart\.sh", append=TINY_REPORT, expect_text="test acc"),
    Rule(r"python -m dist_cifar\.train --model small_cnn --dataset synthetic --epochs 2", append="--synthetic-size 256"),
    Rule(r"python -m dist_cifar\.train --help", expect_text="--parallel"),
    Rule(r"python -m dist_cifar\.cost .*", expect_text="90.7"),
    Rule(r"python -m dist_cifar\.fetch data"),
    Rule(r"python -m dist_cifar\.train --preset report --model vgg_truncated .*", append=TINY_IMAGES),
    Rule(r"torchrun --standalone --nproc_per_node=4 .*", append=TINY_FAST),
    Rule(r"bash launch/single_node\.sh 4 -- .*", append=TINY_FAST),
    Rule(r"torchrun --standalone --nproc_per_node=2 -m dist_cifar\.train --resolve-as cuda .*",
         append="--no-compile --synthetic-size 256 --batch-size 16", expect_text="rehearsed on cpu"),
    Rule(r"torchrun --nnodes=2 .*", check_flags=True),
    Rule(r"bash launch/multi_node\.sh 2 0 node0:29500 8 -- .*", check_flags=True),
    Rule(r"sudo bash launch/two_hosts\.sh .*", append="--synthetic-size 256", expect_text="link tx_bytes host0="),
    Rule(r"sbatch slurm/train\.sbatch .*", append="--epochs 1 --synthetic-size 256", slurm=True),
    Rule(r"sbatch --nodes=2 --gres=gpu:8 .*", check_flags=True),
    Rule(r"NPROC_PER_NODE=2 sbatch .*", append="--synthetic-size 256", slurm=True),
    Rule(r"python -m dist_cifar\.ablate batchnorm --dataset imagefolder .*",
         append='--epochs 1 --max-train 32 --extra "--split full --val-size 10"', expect_text="batchnorm-e1/report.md"),
    Rule(r"python -m dist_cifar\.ablate all --out runs/ablations", append=f"{TINY_REPORT} --variants with_bn",
         expect_text="REPORT.md"),
    # no GPUs in this cluster (or no cluster): the flag list must reach sbatch, which refuses it
    Rule(r'python -m dist_cifar\.ablate weight_decay --slurm --wait --sbatch-args "--gres=gpu:1"',
         append="--variants wd_0 --epochs 1", expect=2, expect_text="sbatch"),
    Rule(r'dist-cifar-ablate dropout --weight-decay 0 --extra "--no-download"',
         append=f"{TINY_REPORT} --variants with_dropout", expect_text="dropout-e1-wd0/report.md"),
    Rule(r"python benchmarks/peers\.py .*", append="--rounds 1 --steps 2 --global-batch-size 32",
         expect_text="data: cifar10"),
    Rule(r"python benchmarks/epoch_time\.py .*", append="--steps-per-epoch 2 --epochs 1 --rungs 0,1 --batch-size 32",
         expect_text="data: cifar10"),
    Rule(r"python benchmarks/scaling\.py --model vgg16_cifar --designs", expect_text="hybrid"),
    Rule(r"python benchmarks/tta\.py .*", before=tiny_runs_for_tta, expect_text="median_gain_points"),
    Rule(r"python benchmarks/charts\.py benchmarks/results", expect_text="redrew"),
    Rule(r'bash benchmarks/ablations_cpu\.sh "batchnorm --epochs 1"',
         env={"EXTRA": "--split full --val-size 10 --max-train 32"}, expect_text="runs/ablations"),
    Rule(r"bash launch/run_tests\.sh", skip="this suite"),
]


def readme_commands() -> list[str]:
    """The README's indented code blocks, one command per line."""
    lines = (ROOT / "README.md").read_text().splitlines()
    commands, in_block = [], False
    for previous, line in zip([""] + lines, lines):
        in_block = line.startswith("    ") and line.strip() != "" and (in_block or previous.strip() == "")
        if in_block:
            commands.append(line.strip())
    return commands


def rule_for(command: str) -> Rule:
    matching = [r for r in RULES if re.fullmatch(r.pattern, command)]
    assert len(matching) == 1, (f"README command {command!r} matches {len(matching)} rules in tests/test_readme.py: "
                                f"say there how to run it on tiny inputs")
    return matching[0]


def test_every_rule_is_a_readme_command():
    commands = readme_commands()
    assert len(commands) >= 20
    for rule in RULES:
        assert any(re.fullmatch(rule.pattern, c) for c in commands), f"no README command matches {rule.pattern!r}"
    for command in commands:
        rule_for(command)


def sandbox_env(**extra) -> dict:
    env = {k: v for k, v in base_env(**extra).items() if k not in ("PYTHONPATH", "DIST_CIFAR_DATA", "VIRTUAL_ENV")}
    return {**env, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A copy of the checkout (tracked and new files), the same .venv, and small data in data/."""
    repo = tmp_path_factory.mktemp("readme") / "dist_cifar"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    for rel in listed:
        if (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            (repo / rel).write_bytes((ROOT / rel).read_bytes())
            (repo / rel).chmod((ROOT / rel).stat().st_mode)
    # a .venv of its own (setup_env.sh writes into it), seeing this one's packages through a .pth
    venv = repo / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (Path(site) / "_test_deps.pth").write_text("\n".join(deps) + "\n")
    setup = subprocess.run(["bash", "launch/setup_env.sh"], cwd=repo, env=sandbox_env(), capture_output=True,
                           text=True, timeout=600)
    assert setup.returncode == 0, setup.stderr[-2000:]
    # the report split needs 25,000 training and 5,000 test images
    write_official_cifar(repo / "data", per_batch=5000, n_test=5000)
    write_image_tarball(repo / "data" / "cifar10-jpeg.tar.gz", per_class=8,
                        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"))
    return repo


def trainer_args(command: str) -> list[str]:
    """The trainer's part of a launcher command line."""
    words = shlex.split(command)
    for marker in ("dist_cifar.train", "--", "slurm/train.sbatch"):
        if marker in words:
            return words[words.index(marker) + 1:]
    raise AssertionError(f"no trainer arguments in {command!r}")


def run_in(repo: Path, command: str, env: dict, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"source .venv/bin/activate && {command}"], cwd=repo, capture_output=True,
                          text=True, timeout=timeout, env=env)


def wait_for_job(submitted: str, repo: Path) -> None:
    job = re.search(r"Submitted batch job (\d+)", submitted).group(1)
    deadline = time.monotonic() + 300
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=30).stdout.strip():
        assert time.monotonic() < deadline, f"job {job} still running"
        time.sleep(2)
    summary = repo / "runs" / f"slurm-{job}" / "summary.json"
    log = next(repo.glob(f"*{job}*.out"), None)
    assert summary.exists(), log.read_text()[-3000:] if log else f"no log of job {job}"


@pytest.mark.parametrize("command", readme_commands(), ids=lambda c: c[:70])
def test_readme_command(command, repo):
    rule = rule_for(command)
    if rule.skip:
        pytest.skip(rule.skip)
    env = sandbox_env(**(rule.env or {}))
    if rule.check_flags:
        proc = run_in(repo, shlex.join(["python", "-m", "dist_cifar.train", *trainer_args(command), "--print-config"]),
                      env, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return
    if rule.slurm:
        from test_slurm import cluster_up
        problem = cluster_up()
        if problem and os.environ.get("DIST_CIFAR_REQUIRE_SLURM") != "1":
            pytest.skip(f"no SLURM cluster: {problem}")
    if command.startswith("sudo "):
        if os.geteuid() != 0:
            pytest.skip("needs root (network namespaces)")
        command = command[len("sudo "):]
    if rule.before:
        rule.before(repo)
    proc = run_in(repo, f"{command} {rule.append}".strip(), env)
    output = proc.stdout + proc.stderr
    if "two_hosts" in command and proc.returncode == 77:
        pytest.skip(f"no network namespaces here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == rule.expect, f"exit {proc.returncode}\n{output[-3000:]}"
    assert "expected one argument" not in output and "Traceback" not in output, output[-3000:]
    assert rule.expect_text in output, output[-3000:]
    if rule.slurm:
        wait_for_job(proc.stdout, repo)
