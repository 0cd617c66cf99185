"""pyproject.toml: `pip install` into a fresh venv, the console scripts, torchrun from another folder."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import base_env, read_jsonl, ROOT, smoke_args, write_official_cifar


def test_pip_install_then_console_script_under_torchrun_from_another_folder(tmp_path):
    """`pip install .` from a clean copy of the checkout into a fresh venv (its dependencies are
    the ones already installed, seen through a .pth: no index is asked), then the console script
    runs from an unrelated folder, alone and under torchrun, importing the installed package."""
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    src = tmp_path / "clone"
    for rel in tracked:
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes((ROOT / rel).read_bytes())
    venv = tmp_path / "venv"
    # --without-pip: pip and the build backend (setuptools) come from the test venv through the .pth
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site_dir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (Path(site_dir) / "_test_deps.pth").write_text("\n".join(deps) + "\n")
    env = {k: v for k, v in base_env().items() if k != "PYTHONPATH"}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-build-isolation", str(src)],
                             capture_output=True, text=True, timeout=300, env=env)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import dist_cifar; print(dist_cifar.__file__, dist_cifar.__version__)"],
                           cwd=elsewhere, capture_output=True, text=True, env=env, timeout=60).stdout
    from dist_cifar import __version__
    assert where.startswith(site_dir) and where.split()[1] == __version__, where
    script = venv / "bin" / "dist-cifar-train"
    version = subprocess.run([str(script), "--version"], cwd=elsewhere, capture_output=True, text=True, env=env, timeout=60)
    assert version.stdout.strip() == f"dist_cifar {where.split()[1]}"
    out = elsewhere / "run"
    proc = subprocess.run([str(python), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--no-python", str(script), *smoke_args(out)], cwd=elsewhere, capture_output=True,
                          text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["dist_cifar_version"] == where.split()[1]
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [0]
    fetch = subprocess.run([str(venv / "bin" / "dist-cifar-fetch"), str(elsewhere / "data")], cwd=elsewhere,
                           capture_output=True, text=True, env=env, timeout=120)
    assert fetch.returncode == 1 and len(fetch.stderr.strip().splitlines()) == 1 and "--no-download" in fetch.stderr

    # dist-cifar-ablate from an empty folder: the variants run there, on paths relative to it
    write_official_cifar(elsewhere / "mydata", per_batch=20, n_test=20)
    tiny = ["batchnorm", "--variants", "with_bn", "--epochs", "1", "--out", "abl",
            "--extra", "--split full --val-size 20 --no-download --batch-size 16"]
    ablate = venv / "bin" / "dist-cifar-ablate"
    first = subprocess.run([str(ablate), *tiny, "--dataset", "cifar10", "--data-dir", "mydata"], cwd=elsewhere,
                           capture_output=True, text=True, env=env, timeout=240)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    variant = elsewhere / "abl" / "batchnorm-e1" / "with_bn"
    summary = json.loads((variant / "summary.json").read_text())
    assert json.loads((variant / "config.json").read_text())["data_dir"] == str(elsewhere / "mydata")
    row = next(l for l in (variant.parent / "report.md").read_text().splitlines() if l.startswith("| with_bn"))
    assert f"{summary['best_test_accuracy']:.2f}" in row  # numbers, not just "ok"
    assert not (Path(site_dir) / "runs").exists() and not (Path(site_dir) / "mydata").exists()
    # the same study on other data trains again, beside the first, and says so in one line
    stamp = (variant / "summary.json").stat().st_mtime_ns
    second = subprocess.run([str(ablate), *tiny, "--dataset", "synthetic", "--synthetic-size", "128"], cwd=elsewhere,
                            capture_output=True, text=True, env=env, timeout=240)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    moved = [l for l in second.stdout.splitlines() if "holds results on other data" in l]
    assert len(moved) == 1 and "dataset 'cifar10', not 'synthetic'" in moved[0], second.stdout
    sibling = [d for d in (elsewhere / "abl").iterdir() if d.name.startswith("batchnorm-e1-synthetic-")]
    assert len(sibling) == 1 and (sibling[0] / "with_bn" / "summary.json").exists()
    assert json.loads((sibling[0] / "with_bn" / "config.json").read_text())["dataset"] == "synthetic"
    assert (variant / "summary.json").stat().st_mtime_ns == stamp
