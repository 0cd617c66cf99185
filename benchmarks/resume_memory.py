"""Peak host memory per rank of a resume against an uninterrupted run, side by side.

    python benchmarks/resume_memory.py [--model vgg16_cifar] [--nproc 2] [--publish]

Three torchrun launches of the real trainer, same flags (a few steps of `--model` on synthetic
data, one checkpoint written at the stop or the end, no best.pt, no final evaluation):

  uninterrupted   runs its steps and checkpoints at the end
  preempted       stopped after step 1 (DIST_CIFAR_FAULT=preempt), checkpointing there
  resumed         the same command again: loads that checkpoint on every rank, then finishes

Each rank's peak resident memory (VmHWM, read by `resume_memory_worker.py` when the trainer
returns) is reported per launch, with the ratio resumed / uninterrupted per rank: a resume that
loaded a private copy of the whole state on every rank (before mmap loading) adds the
checkpoint's size to each rank's peak.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, RUNS, add_output_flags, output_path, provenance, table, write_json

HERE = Path(__file__).resolve().parent


def launch(nproc: int, flags: list[str], out_dir: Path, env: dict, timeout: float) -> tuple[int, list[float]]:
    """One torchrun launch; (exit code, peak RSS in GB per rank)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE / "resume_memory_worker.py"), *flags, "--out-dir", str(out_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    peaks = {}
    for line in proc.stdout.splitlines():
        if line.startswith("PEAK_RSS "):
            _, rank, kb = line.split()
            peaks[int(rank)] = int(kb) * 1024 / 1e9
    if len(peaks) != nproc:
        raise RuntimeError(f"launch exited {proc.returncode} without every rank's peak:\n{proc.stderr[-3000:]}")
    return proc.returncode, [peaks[r] for r in sorted(peaks)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg16_cifar")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="steps of the one epoch")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--timeout", type=float, default=1800)
    add_output_flags(p, "resume_memory_{model}_cpu.json")
    args = p.parse_args(argv)
    flags = ["--model", args.model, "--dataset", "synthetic", "--synthetic-size", "512", "--batch-size",
             str(args.batch_size), "--steps-per-epoch", str(args.steps), "--epochs", "1", "--no-save-best",
             "--no-final-eval", "--checkpoint-interval-min", "0", "--wandb", "off", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("DIST_CIFAR_FAULT", None)
    rows = []
    RUNS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="resume-memory-", dir=RUNS) as tmp:
        work = Path(tmp)
        code, whole = launch(args.nproc, flags, work / "a", env, args.timeout)
        rows.append({"launch": "uninterrupted", "exit": code, **{f"rank{r}_peak_gb": g for r, g in enumerate(whole)}})
        code, stopped = launch(args.nproc, flags, work / "b", {**env, "DIST_CIFAR_FAULT": "preempt:rank=0:step=1"},
                               args.timeout)
        rows.append({"launch": "preempted", "exit": code, **{f"rank{r}_peak_gb": g for r, g in enumerate(stopped)}})
        checkpoint_gb = sum(f.stat().st_size for f in (work / "b").glob("ckpt-*.pt")) / 1e9
        code, resumed = launch(args.nproc, flags, work / "b", env, args.timeout)
        rows.append({"launch": "resumed", "exit": code, **{f"rank{r}_peak_gb": g for r, g in enumerate(resumed)}})
    ratios = [r / w for r, w in zip(resumed, whole)]
    print(table(rows, list(rows[0])))
    print(f"checkpoint {checkpoint_gb:.2f} GB; resumed / uninterrupted peak per rank: "
          + ", ".join(f"rank {r} {x:.2f}x" for r, x in enumerate(ratios)))
    write_json(output_path(args, f"resume_memory_{args.model}_cpu.json"),
               {"benchmark": "resume_memory", "provenance": provenance(), "args": vars(args), "flags": flags,
                "checkpoint_gb": checkpoint_gb, "rows": rows, "resumed_over_uninterrupted": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
