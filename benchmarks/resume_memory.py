"""What a checkpoint costs each rank: peak memory while saving and while resuming against the same
run's training peak, and how long the step loop stands still per save; per design, side by side.

    python benchmarks/resume_memory.py [--model vgg16_cifar] [--nproc 2] [--publish]
    sudo .venv/bin/python benchmarks/resume_memory.py --model vgg_truncated --designs ddp hybrid \
        --two-hosts --nproc-per-host 2 --rate 1gbit --publish     # 2 emulated hosts x 2 ranks (#32)

Four launches of the real trainer per design, same flags (`--steps` steps per epoch of `--model`
on synthetic data, no best.pt, no final evaluation):

  trained       two epochs, no checkpoint at all: the training peak
  checkpointed  two epochs, a checkpoint after each (the first written in the background while
                the second epoch trains): the peak of training and saving together, and the
                step loop's stall per save (`checkpoint_blocked_s`, rank 0, which waits for all)
  preempted     stopped after step 1 (DIST_CIFAR_FAULT=preempt), checkpointing there
  resumed       the same command again: loads that checkpoint, then finishes its two epochs

Each rank's peak resident memory (VmHWM, read by `resume_memory_worker.py` when the trainer
returns) is reported per launch, and per rank the ratios checkpointed / trained and resumed /
trained. Under ddp rank 0 copies the whole state into host buffers to write it; under hybrid and
fsdp every rank copies only its own shard (sharded checkpoints). On a GPU those host buffers are
pinned host memory and the device holds nothing extra; on this CPU machine they are the same RAM
as training, so they show in the ratios (`staging_gb`: their size per rank).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, RUNS, add_output_flags, output_path, provenance, read_jsonl, table, write_json

HERE = Path(__file__).resolve().parent


def launch(args, flags: list[str], out_dir: Path, env: dict) -> tuple[int, list[float]]:
    """One launch (torchrun, or both emulated hosts); (exit code, peak RSS in GB per rank)."""
    if args.two_hosts:
        cmd = ["bash", "launch/two_hosts.sh", "--nproc-per-host", str(args.nproc_per_host), "--module",
               "resume_memory_worker", *(["--rate", args.rate] if args.rate else []), "--"]
        env = {**env, "PYTHON": sys.executable, "PYTHONPATH": f"{ROOT}:{HERE}"}
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               str(HERE / "resume_memory_worker.py")]
    proc = subprocess.run([*cmd, *flags, "--out-dir", str(out_dir)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=args.timeout)
    if proc.returncode == 77:
        raise SystemExit(f"error: {proc.stderr.strip().splitlines()[-1]}: run as root where ip netns works")
    # the ranks of both hosts print into one pipe: lines may interleave
    peaks = {int(rank): int(kb) * 1024 / 1e9 for rank, kb in re.findall(r"PEAK_RSS (\d+) (\d+) END", proc.stdout)}
    world = 2 * args.nproc_per_host if args.two_hosts else args.nproc
    if len(peaks) != world:
        raise RuntimeError(f"launch exited {proc.returncode} without every rank's peak:\n{proc.stderr[-3000:]}")
    return proc.returncode, [peaks[r] for r in sorted(peaks)]


def checkpoint_sizes(out: Path, world: int) -> dict:
    """The newest checkpoint's size on disk, its kind, and what each rank copied off the device to
    write it (its staging buffers): rank 0 all of a single file; under sharding each rank its own
    DCP file (rank 0's also holds the replicated tensors)."""
    from dist_cifar.checkpoint import committed
    newest = committed(out)[-1]
    if newest.is_dir():
        mine = [sum(f.stat().st_size for f in newest.glob(f"__{r}_*.distcp")) / 1e9 for r in range(world)]
        total, kind = sum(f.stat().st_size for f in newest.iterdir()) / 1e9, "sharded"
    else:
        total, kind = newest.stat().st_size / 1e9, "one file"
        mine = [total] + [0.0] * (world - 1)
    return {"checkpoint_gb": total, "kind": kind, **{f"rank{r}_staging_gb": g for r, g in enumerate(mine)}}


def measure(design: str, args, work: Path, env: dict) -> list[dict]:
    flags = ["--model", args.model, "--dataset", "synthetic", "--synthetic-size", "512", "--batch-size",
             str(args.batch_size), "--steps-per-epoch", str(args.steps), "--epochs", "2", "--no-save-best",
             "--no-final-eval", "--checkpoint-interval-min", "0", "--wandb", "off", "--quiet", "--val-size", "0",
             "--parallel", design, "--dist-timeout", "900"]
    rows = []

    def row(name: str, out: Path, extra_env: dict | None = None, *more: str) -> list[float]:
        code, peaks = launch(args, [*flags, *more], out, {**env, **(extra_env or {})})
        record = {"design": design, "launch": name, "exit": code, **{f"rank{r}_peak_gb": g for r, g in enumerate(peaks)}}
        if name == "checkpointed":
            metrics = read_jsonl(out / "metrics.jsonl")
            record["blocked_s_per_save"] = metrics[0]["checkpoint_blocked_s"]  # the first save, its write overlapping epoch 1
            record.update(checkpoint_sizes(out, len(peaks)))
        rows.append(record)
        print(json.dumps(record), flush=True)
        return peaks

    trained = row("trained", work / f"{design}-trained", None, "--checkpoint-every", "0")
    saved = row("checkpointed", work / f"{design}-saved", None, "--checkpoint-every", "1")
    # preemption saves whatever the cadence; the resumed launch saves nothing more: its peak is the
    # resume's and the training's alone
    row("preempted", work / f"{design}-resumed", {"DIST_CIFAR_FAULT": "preempt:rank=0:step=1"}, "--checkpoint-every", "0")
    resumed = row("resumed", work / f"{design}-resumed", None, "--checkpoint-every", "0")
    rows.append({"design": design, "launch": "ratios",
                 **{f"rank{r}_save_over_train": s / t for r, (s, t) in enumerate(zip(saved, trained))},
                 **{f"rank{r}_resume_over_train": s / t for r, (s, t) in enumerate(zip(resumed, trained))}})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg16_cifar")
    p.add_argument("--designs", nargs="+", default=["ddp"], choices=["ddp", "hybrid", "fsdp"])
    p.add_argument("--nproc", type=int, default=2, help="ranks (one host)")
    p.add_argument("--two-hosts", action="store_true", help="launch/two_hosts.sh: two emulated hosts (needs root)")
    p.add_argument("--nproc-per-host", type=int, default=2)
    p.add_argument("--rate", default="1gbit", help="tc tbf rate of the emulated link ('' unshaped)")
    p.add_argument("--steps", type=int, default=3, help="steps per epoch")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--timeout", type=float, default=1800)
    add_output_flags(p, "resume_memory_{model}_cpu.json")
    args = p.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("DIST_CIFAR_FAULT", None)
    rows = []
    RUNS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="resume-memory-", dir=RUNS) as tmp:
        for design in args.designs:
            rows += measure(design, args, Path(tmp), env)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    text = table(rows, columns)
    print(text)
    where = f"_2hosts_{args.nproc_per_host}perhost" if args.two_hosts else ""
    path = output_path(args, f"resume_memory_{args.model}{where}_cpu.json")
    write_json(path, {"benchmark": "resume_memory", "provenance": provenance(), "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
