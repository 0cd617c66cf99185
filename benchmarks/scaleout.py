"""vgg16_cifar on two emulated hosts: ddp, ddp + bf16 hook, hybrid, fsdp over shaped links.

    sudo .venv/bin/python benchmarks/scaleout.py                       # 1 and 10 Gbit/s, 4 images per rank
    .venv/bin/python benchmarks/scaleout.py --rates 1gbit --designs ddp hybrid --batch-size 8

Each run is the real trainer under launch/two_hosts.sh: two network namespaces joined by a veth
pair shaped with tc tbf, one rank in each, torchrun --nnodes=2 with c10d rendezvous, gloo over
the link; synthetic 32x32 data (the step time does not depend on the pixels). Designs run
interleaved, link by link. Per run: the steady step time (the second epoch's training time over
its steps; the first epoch warms up), the bytes each rank sends per step as the collectives
recorded them (ring accounting, `wire_bytes_per_step`), what the link's counters saw rank 1's
namespace send over the whole run (headers, setup and gloo's own algorithms included), and
rank 0's peak memory (max RSS on CPU). Prints a table, writes JSON and a PNG to
benchmarks/results/ (or --out); `benchmarks/scaling.py --check-scaleout` compares its model
with these step times.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, ROOT, RUNS, files, provenance, read_jsonl, table, write_json

DESIGNS = {  # label -> trainer flags
    "ddp": ["--parallel", "ddp"],
    "ddp_bf16_hook": ["--parallel", "ddp", "--ddp-comm-hook", "bf16"],
    "hybrid": ["--parallel", "hybrid"],
    "fsdp": ["--parallel", "fsdp"],
}


def run_one(design: str, rate: str, args, scratch: Path) -> dict:
    out = scratch / f"{design}-{rate}"
    saves = ["--checkpoint-every", "1", "--keep-last", "1"] if args.checkpoints else ["--checkpoint-every", "0"]
    trainer = ["--model", args.model, "--dataset", "synthetic", "--synthetic-size", str(args.synthetic_size),
               "--val-size", "0", "--batch-size", str(args.batch_size), "--epochs", "2",
               "--steps-per-epoch", str(args.steps), "--no-final-eval", "--no-save-best", *saves,
               "--checkpoint-interval-min", "0", "--wandb", "off", "--quiet", "--threads", str(args.threads),
               "--dist-timeout", "900", "--out-dir", str(out), *DESIGNS[design]]
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    shaping = [] if rate == "unshaped" else ["--rate", rate]
    proc = subprocess.run(["bash", "launch/two_hosts.sh", *shaping, "--", *trainer], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=args.timeout)
    row = {"design": design, "rate": rate}
    if proc.returncode == 77:
        raise SystemExit(f"error: {proc.stderr.strip().splitlines()[-1]}: run as root where ip netns works")
    if proc.returncode != 0:
        return {**row, "error": proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else f"exit {proc.returncode}"}
    metrics = read_jsonl(out / "metrics.jsonl")
    steady = metrics[-1]
    sent = [int(x) for x in re.findall(r"host\d=(\d+)", proc.stderr)]
    config = json.loads((out / "config.json").read_text())
    return {**row, "step_s": steady["epoch_time_s"] / steady["steps"],
            "warmup_step_s": metrics[0]["epoch_time_s"] / metrics[0]["steps"],
            "wire_mb_per_step": steady["wire_bytes_per_step"] / 1e6,
            "predicted_mb_per_step": sum(config["wire_predicted"].values()) / 1e6,
            "link_mb_rank1_total": sent[1] / 1e6 if len(sent) == 2 else None,
            "steps_total": sum(m["steps"] for m in metrics),
            "peak_memory_mb": steady["peak_memory_mb"],  # max RSS so far on CPU: epoch 0's save included
            **({"checkpoint_blocked_s": metrics[0]["checkpoint_blocked_s"],
                "checkpoint_write_s": metrics[-1]["checkpoint_write_s"]} if args.checkpoints else {})}


def draw(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rates = list(dict.fromkeys(r["rate"] for r in rows))
    designs = list(dict.fromkeys(r["design"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    width = 0.8 / len(rates)
    for k, rate in enumerate(rates):
        got = {r["design"]: r for r in rows if r["rate"] == rate and "error" not in r}
        xs = [i + k * width for i in range(len(designs))]
        axes[0].bar(xs, [got.get(d, {}).get("step_s", 0) for d in designs], width, label=rate)
    axes[0].set_ylabel("steady step time (s)")
    first = {r["design"]: r for r in rows if r["rate"] == rates[0] and "error" not in r}
    axes[1].bar(range(len(designs)), [first.get(d, {}).get("wire_mb_per_step", 0) for d in designs])
    axes[1].set_ylabel("MB each rank sends per step (ring)")
    axes[1].set_yscale("log")
    axes[2].bar(range(len(designs)), [first.get(d, {}).get("peak_memory_mb", 0) / 1024 for d in designs])
    axes[2].set_ylabel("peak memory per rank (GB, max RSS)")
    for ax in axes:
        ax.set_xticks([i + width * (len(rates) - 1) / 2 for i in range(len(designs))] if ax is axes[0] else
                      range(len(designs)))
        ax.set_xticklabels(designs, rotation=15)
    axes[0].legend(title="link")
    fig.suptitle(title)
    fig.tight_layout()
    with files.atomic_writer(Path(path)) as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16_cifar")
    parser.add_argument("--batch-size", type=int, default=4, help="images per rank")
    parser.add_argument("--steps", type=int, default=2, help="steps per epoch (2 epochs: warm-up, timed)")
    parser.add_argument("--rates", nargs="+", default=["1gbit", "10gbit"], help="tc tbf rates, or unshaped")
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    parser.add_argument("--synthetic-size", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--checkpoints", action="store_true",
                        help="save a checkpoint after each epoch: what consolidating the state on rank 0 costs")
    parser.add_argument("--out", default="", help="folder for the JSON and PNG (default runs/benchmarks/)")
    parser.add_argument("--publish", action="store_true", help="write to benchmarks/results/ (the committed results)")
    args = parser.parse_args(argv)
    if args.batch_size <= 0 or args.steps <= 0 or args.threads <= 0:
        parser.error("--batch-size, --steps and --threads must be > 0")
    rows = []
    out = Path(args.out) if args.out else RESULTS if args.publish else RUNS
    stem = f"scaleout_{args.model}_bs{args.batch_size}_cpu" + ("_checkpoints" if args.checkpoints else "")
    with tempfile.TemporaryDirectory(prefix="scaleout-", dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None) as tmp:
        for rate in args.rates:
            for design in args.designs:
                row = run_one(design, rate, args, Path(tmp))
                rows.append(row)
                print(json.dumps(row), flush=True)
                write_json(out / f"{stem}.json", {"provenance": provenance(), "args": vars(args), "rows": rows})
    for rate in args.rates:
        ddp = next((r for r in rows if r["rate"] == rate and r["design"] == "ddp" and "error" not in r), None)
        for r in rows:
            if r["rate"] == rate and ddp and "error" not in r:
                r["speedup_vs_ddp"] = ddp["step_s"] / r["step_s"]
                r["bytes_ratio_ddp_over"] = ddp["wire_mb_per_step"] / r["wire_mb_per_step"]
    columns = ["rate", "design", "step_s", "speedup_vs_ddp", "wire_mb_per_step", "bytes_ratio_ddp_over",
               "link_mb_rank1_total", "peak_memory_mb", "warmup_step_s",
               *(["checkpoint_blocked_s", "checkpoint_write_s"] if args.checkpoints else []), "error"]
    text = table(rows, columns)
    print(text)
    summary = {"provenance": provenance(), "args": vars(args), "rows": rows,
               "median_step_s": {d: statistics.median([r["step_s"] for r in rows if r["design"] == d and "step_s" in r] or [0])
                                 for d in args.designs}}
    write_json(out / f"{stem}.json", summary)
    files.atomic_write_text(out / f"{stem}.txt", text + "\n")
    if not args.checkpoints:
        draw(rows, out / f"{stem}.png", f"{args.model}, 2 emulated hosts (1 CPU rank each, gloo), {args.batch_size} images/rank")
    return 0


if __name__ == "__main__":
    sys.exit(main())
