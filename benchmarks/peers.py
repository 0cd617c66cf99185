"""dist_cifar side by side with what a research engineer would use instead, in one run:
the same model, data, global batch, optimizer (AdamW) and number of steps, three ways,
interleaved round by round, steady-state throughput (the second half of 2 x --steps steps):

  dist_cifar           its defaults for the device (the real trainer under torchrun)
  Lightning            Trainer(strategy="ddp") with its best flags for the device (peer_lightning.py)
  plain DDP loop       fp32 eager + torchvision DataLoader, pytorch/examples style (peer_plain_ddp.py)

    python benchmarks/peers.py                                   # CPU: 2 processes on gloo, small_cnn + vgg_truncated
    python benchmarks/peers.py --models vgg16_cifar --global-batch-size 512 --steps 30   # GPUs (NCCL)

Lightning is a benchmark-only extra (pip install .[bench]); without it its row says why it is
missing. Writes JSON, a table and a bar chart (PNG) under runs/benchmarks/ (benchmarks/results/
with --publish, and only when every contestant ran). Exits 1 when a contestant failed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (ROOT, RUNS, add_output_flags, busy_warning, data_args, data_label, files, output_path, provenance,
                    report_warnings, run_bounded, run_trainer, spread_warning, table, write_json)

HERE = Path(__file__).resolve().parent
CONTESTANTS = ("dist_cifar", "lightning", "plain")


def lightning_missing() -> str:
    try:
        import lightning  # noqa: F401
    except ImportError as exc:
        return f"lightning is not installed ({exc}); pip install .[bench]"
    return ""


def run_peer(script: str, args, model: str, env: dict) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           str(HERE / script), "--model", model, "--dataset", args.dataset, "--data-dir", args.data_dir,
           "--global-batch-size", str(args.global_batch_size), "--steps", str(args.steps), "--lr", str(args.lr),
           "--weight-decay", str(args.weight_decay), "--num-workers", str(args.num_workers)]
    code, out, err, timed_out = run_bounded(cmd, timeout=args.timeout, env=env)
    lines = [l for l in out.splitlines() if l.startswith("PEER_RESULT ")]
    if timed_out:
        raise RuntimeError(f"{script} did not finish in --timeout {args.timeout:g} s")
    if code != 0 or not lines:
        tail = [l for l in err.strip().splitlines() if l.strip()][-1:] or [f"exit {code}"]
        raise RuntimeError(f"{script} failed ({code}): {tail[0][:300]}")
    return json.loads(lines[-1].split(" ", 1)[1])


def run_dist_cifar(args, model: str, env: dict, scratch: Path) -> dict:
    flags = ["--model", model, "--dataset", args.dataset, "--data-dir", args.data_dir,
             "--global-batch-size", str(args.global_batch_size), "--steps-per-epoch", str(args.steps),
             "--epochs", "2", "--optimizer", "adamw", "--lr", str(args.lr), "--weight-decay", str(args.weight_decay),
             "--schedule", "constant", "--augment", "--normalize", "cifar", "--split", "full", "--val-size", "0",
             "--no-save-best", "--no-final-eval", "--wandb", "off"]
    records = run_trainer(flags, scratch / "dist_cifar", nproc=args.nproc, env=env, timeout=args.timeout)
    config = json.loads((scratch / "dist_cifar" / "config.json").read_text())
    last = records[-1]  # the first epoch warms up (and compiles on GPUs)
    return {"contestant": "dist_cifar (defaults: " + f"{config['precision_resolved']}, "
            f"{'compile' if config['compile'] else 'eager'}, {config['loader']} loader)",
            "images_per_s": last["images_per_s"], "timed_steps": last["steps"], "last_loss": last["train_loss"]}


def peer_rows(runs: dict[str, list[dict]], errors: dict[str, str], skip_lightning: str) -> list[dict]:
    """One row per contestant: the median over rounds, or why it has no number."""
    rows = []
    for contestant in CONTESTANTS:
        if not runs[contestant]:
            why = skip_lightning if contestant == "lightning" and skip_lightning else errors.get(contestant, "not run")
            rows.append({"contestant": contestant, "key": contestant, "skipped": why})
            continue
        rates = [r["images_per_s"] for r in runs[contestant]]
        rows.append({"contestant": runs[contestant][0]["contestant"], "key": contestant,
                     "images_per_s": statistics.median(rates), "per_round": rates,
                     "last_loss": runs[contestant][-1]["last_loss"]})
    ours = rows[0].get("images_per_s")
    for row in rows:
        if "images_per_s" in row and ours:
            row["dist_cifar_ratio"] = ours / row["images_per_s"]
    return rows


def peer_table(rows: list[dict]) -> str:
    return table([r for r in rows if "images_per_s" in r], ["contestant", "images_per_s", "dist_cifar_ratio", "last_loss"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="small_cnn,vgg_truncated")
    p.add_argument("--nproc", type=int, default=0, help="processes (default: GPUs, else 2)")
    p.add_argument("--global-batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40, help="timed steps per run, after as many warm-up steps")
    p.add_argument("--rounds", type=int, default=2, help="each contestant runs once per round; the median is kept")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--num-workers", type=int, default=-1, help="peers' DataLoader workers per process (default: 2 on CPU, 8 on GPUs)")
    p.add_argument("--dataset", default="auto",
                   help="auto: the real CIFAR-10 in data/ or $DIST_CIFAR_DATA, else synthetic (the table says which)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--timeout", type=float, default=900, help="seconds per contestant run")
    add_output_flags(p, "peers_<device>.json")
    p.add_argument("--no-txt", action="store_true", help="write only the JSON and the PNG (the GPU suite's file budget)")
    args = p.parse_args(argv)
    flags = data_args(args.dataset, args.data_dir, synthetic_size=4096)
    args.dataset, args.data_dir = flags[1], flags[3] if flags[1] != "synthetic" else "data"
    busy = busy_warning()

    import torch
    gpus = torch.cuda.device_count()
    args.nproc = args.nproc or gpus or 2
    if args.num_workers < 0:
        args.num_workers = 8 if gpus else 2
    if args.global_batch_size % args.nproc:
        p.error(f"--global-batch-size {args.global_batch_size} does not divide over {args.nproc} processes")
    threads = 0 if gpus else max((os.cpu_count() or 2) // args.nproc, 1)
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled",
               **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    skip_lightning = lightning_missing()
    results: dict[str, dict] = {}
    meta = provenance()
    device = "gpu" if gpus else "cpu"
    published = output_path(args, f"peers_{device}.json")
    # with --publish, progress goes to runs/benchmarks/ and the committed file is replaced only at a clean end
    out = RUNS / published.name if args.publish else published
    warnings: list[str] = []
    failures: list[str] = []

    def save() -> None:
        write_json(out, {"benchmark": "peers", "provenance": meta, "args": vars(args), "data": flags,
                         "world": {"processes": args.nproc, "threads_per_process": threads or None,
                                   "backend": "nccl" if gpus else "gloo", "ddp": args.nproc > 1},
                         "models": results, "warnings": warnings})

    with tempfile.TemporaryDirectory(dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None) as tmp:
        for model in args.models.split(","):
            runs: dict[str, list[dict]] = {c: [] for c in CONTESTANTS}
            errors: dict[str, str] = {}
            for round_ in range(args.rounds):
                order = CONTESTANTS[round_ % 3:] + CONTESTANTS[:round_ % 3]  # no contestant always goes first
                for contestant in order:
                    if contestant == "lightning" and skip_lightning:
                        continue
                    try:  # one contestant's failure is its row, not the end of the comparison
                        if contestant == "dist_cifar":
                            result = run_dist_cifar(args, model, env, Path(tmp))
                        else:
                            result = run_peer(f"peer_{'lightning' if contestant == 'lightning' else 'plain_ddp'}.py",
                                              args, model, env)
                    except (RuntimeError, subprocess.TimeoutExpired, OSError, KeyError) as exc:
                        errors[contestant] = str(exc)
                        failures.append(f"{model} {contestant}")
                        print(f"{model:<14} round {round_ + 1}  {contestant}: {exc}", flush=True)
                        continue
                    runs[contestant].append(result)
                    print(f"{model:<14} round {round_ + 1}  {result['contestant']:<52} "
                          f"{result['images_per_s']:>10,.0f} img/s", flush=True)
                    results[model] = {"rows": peer_rows(runs, errors, skip_lightning)}
                    save()  # after every contestant: a time-boxed run keeps what finished
            rows = peer_rows(runs, errors, skip_lightning)
            results[model] = {"rows": rows}
            print()
            print(data_label(flags))
            print(peer_table(rows))
            warnings += [w for c in CONTESTANTS
                         if (w := spread_warning(f"{model} {c}", [r["images_per_s"] for r in runs[c]], limit=0.1))]
            if skip_lightning:
                print(f"Lightning skipped: {skip_lightning}")
            print()
    warnings[:0] = [busy] if busy else []
    report_warnings(warnings)
    save()
    if failures:
        print(f"peers: {', '.join(failures)} failed" + (f"; kept the published {published}" if args.publish else ""),
              file=sys.stderr)
        return 1
    if out != published:
        write_json(published, json.loads(out.read_text()))
        out = published
    lines = []
    for model, result in results.items():
        lines += [f"## {model}", peer_table(result["rows"]), ""]
    if not args.no_txt:
        files.atomic_write_text(out.with_suffix(".txt"), "\n".join(lines))
    from charts import peers_chart
    peers_chart(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
