"""A model on two emulated hosts: ddp, ddp + bf16 hook, hybrid (flat, 2-D), fsdp, auto over shaped links.

    sudo .venv/bin/python benchmarks/scaleout.py                       # 1 and 10 Gbit/s, 4 images per rank
    .venv/bin/python benchmarks/scaleout.py --rates 1gbit --designs ddp hybrid --batch-size 8
    .venv/bin/python benchmarks/scaleout.py --model vgg_truncated --nproc-per-host 2 --rates 20mbit \
        --designs ddp hybrid_flat hybrid auto --batch-size 8 --steps 2      # the 2-D layout: 2 hosts x 2 ranks

Each run is the real trainer under launch/two_hosts.sh: two network namespaces joined by a veth
pair shaped with tc tbf, one rank in each (or --nproc-per-host N: then `hybrid` is the 2-D layout,
the head sharded inside each host, and `hybrid_flat` shards it over all ranks), torchrun
--nnodes=2 with c10d rendezvous, gloo over the link; synthetic 32x32 data (the step time does not
depend on the pixels). Designs run interleaved, link by link. Per run: the steady step time (the
second epoch's training time over its steps; the first epoch warms up), the bytes each rank sends
per step as the collectives recorded them (ring accounting, `wire_bytes_per_step`), what the
link's counters saw the second host's namespace send over the whole run (headers, setup and
gloo's own algorithms included) against dist_cifar.cost's prediction of what a host sends over the
link per step (`bytes_across_link_per_node`, gloo's reduce-scatter counted as the all-reduce it
runs), rank 0's peak memory (max RSS on CPU), and under `auto` (--parallel auto) what it chose.
Prints a table, writes JSON and a PNG to benchmarks/results/ (or --out);
`benchmarks/scaling.py --check-scaleout` compares its model with these step times.
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
    "hybrid": ["--parallel", "hybrid"],  # the default layout: 2-D with several ranks per host
    "hybrid_flat": ["--parallel", "hybrid", "--tp-size", "{world}"],
    "fsdp": ["--parallel", "fsdp"],
    "auto": ["--parallel", "auto"],
}


def predicted_link_mb(config: dict, nodes: int = 2) -> float:
    """dist_cifar.cost's bytes per step that one host sends over the link (gloo's reduce-scatter
    counted as the all-reduce it runs), for the design the run trained."""
    from dist_cifar.cost import bytes_across_link_per_node, step_collectives
    tp = config.get("tp_resolved") or 0
    collectives = step_collectives(config["parallel_resolved"], config["model"], batch_per_rank=config["batch_size"],
                                   world=config["world_size"], precision=config["precision_resolved"],
                                   comm_hook=config["ddp_comm_hook"], tp=tp)
    return bytes_across_link_per_node(collectives, world=config["world_size"], nodes=nodes, gloo=True) / 1e6


def run_one(design: str, rate: str, args, scratch: Path) -> dict:
    out = scratch / f"{design}-{rate}"
    saves = ["--checkpoint-every", "1", "--keep-last", "1"] if args.checkpoints else ["--checkpoint-every", "0"]
    trainer = ["--model", args.model, "--dataset", "synthetic", "--synthetic-size", str(args.synthetic_size),
               "--val-size", "0", "--batch-size", str(args.batch_size), "--epochs", "2",
               "--steps-per-epoch", str(args.steps), "--no-final-eval", "--no-save-best", *saves,
               "--checkpoint-interval-min", "0", "--wandb", "off", "--quiet", "--threads", str(args.threads),
               "--dist-timeout", "900", "--out-dir", str(out),
               *[flag.replace("{world}", str(2 * args.nproc_per_host)) for flag in DESIGNS[design]]]
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    shaping = [] if rate == "unshaped" else ["--rate", rate]
    proc = subprocess.run(["bash", "launch/two_hosts.sh", *shaping, "--nproc-per-host", str(args.nproc_per_host),
                           "--", *trainer], cwd=ROOT, env=env,
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
    predicted, steps_total = predicted_link_mb(config), sum(m["steps"] for m in metrics)
    return {**row, "step_s": steady["epoch_time_s"] / steady["steps"],
            "warmup_step_s": metrics[0]["epoch_time_s"] / metrics[0]["steps"],
            "wire_mb_per_step": steady["wire_bytes_per_step"] / 1e6,
            "predicted_mb_per_step": sum(config["wire_predicted"].values()) / 1e6,
            "link_mb_rank1_total": sent[1] / 1e6 if len(sent) == 2 else None,  # the second host's namespace
            "predicted_link_mb_per_step": predicted,
            # the link's counters over the whole run (setup, DDP's first broadcast and, under auto, the
            # probes included) per training step, against the prediction
            "link_over_predicted": sent[1] / steps_total / 1e6 / predicted if len(sent) == 2 and predicted else None,
            "layout": config["parallel_resolved"] + (f" tp {config['tp_resolved']}" if config.get("tp_resolved") else ""),
            "auto_chose": (config.get("parallel_auto") or {}).get("chosen"),
            "steps_total": steps_total,
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
    # what the link's counters saw the second host send, per training step (setup and, under auto,
    # its probes included), with dist_cifar.cost's prediction as a black tick
    seen = [first[d]["link_mb_rank1_total"] / first[d]["steps_total"] if first.get(d, {}).get("link_mb_rank1_total")
            else 0 for d in designs]
    axes[1].bar(range(len(designs)), seen)
    predicted = [first.get(d, {}).get("predicted_link_mb_per_step") for d in designs]
    if any(p is not None for p in predicted):
        axes[1].scatter([i for i, p in enumerate(predicted) if p is not None], [p for p in predicted if p is not None],
                        marker="_", s=900, color="black", label="predicted (dist_cifar.cost)", zorder=3)
        axes[1].legend(fontsize=8)
    axes[1].set_ylabel("MB one host sent over the link per step\n(auto: its link probes included)")
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
    parser.add_argument("--nproc-per-host", type=int, default=1, help="ranks per emulated host (2: the 2-D layout)")
    parser.add_argument("--synthetic-size", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--checkpoints", action="store_true",
                        help="save a checkpoint after each epoch (sharded under hybrid/fsdp, one file under ddp): "
                             "its stall and write time (benchmarks/resume_memory.py: its memory)")
    parser.add_argument("--out", default="", help="folder for the JSON and PNG (default runs/benchmarks/)")
    parser.add_argument("--publish", action="store_true", help="write to benchmarks/results/ (the committed results)")
    args = parser.parse_args(argv)
    if args.batch_size <= 0 or args.steps <= 0 or args.threads <= 0 or args.nproc_per_host <= 0:
        parser.error("--batch-size, --steps, --threads and --nproc-per-host must be > 0")
    rows = []
    out = Path(args.out) if args.out else RESULTS if args.publish else RUNS
    layout = f"_{args.nproc_per_host}perhost" if args.nproc_per_host > 1 else ""
    stem = f"scaleout_{args.model}_bs{args.batch_size}{layout}_cpu" + ("_checkpoints" if args.checkpoints else "")
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
    columns = ["rate", "design", "layout", "auto_chose", "step_s", "speedup_vs_ddp", "wire_mb_per_step",
               "bytes_ratio_ddp_over", "predicted_link_mb_per_step", "link_mb_rank1_total", "link_over_predicted",
               "peak_memory_mb", "warmup_step_s",
               *(["checkpoint_blocked_s", "checkpoint_write_s"] if args.checkpoints else []), "error"]
    text = table(rows, columns)
    print(text)
    summary = {"provenance": provenance(), "args": vars(args), "rows": rows,
               "median_step_s": {d: statistics.median([r["step_s"] for r in rows if r["design"] == d and "step_s" in r] or [0])
                                 for d in args.designs}}
    write_json(out / f"{stem}.json", summary)
    files.atomic_write_text(out / f"{stem}.txt", text + "\n")
    if not args.checkpoints:
        draw(rows, out / f"{stem}.png", f"{args.model}, 2 emulated hosts ({args.nproc_per_host} CPU rank(s) each, gloo), "
                                         f"{args.batch_size} images/rank")
    return 0


if __name__ == "__main__":
    sys.exit(main())
