"""Data-parallel scaling: the same job under torchrun with 1..N processes, plus a model.

    python benchmarks/scaling.py --model small_cnn --batch-size 128          # CPU: 1 and 2 processes
    python benchmarks/scaling.py --model vgg16_cifar --batch-size 512 --max-nproc 8   # GPUs

Measured: global images/s per process count (per-process batch fixed, i.e. weak scaling) and
efficiency = images/s(N) / (N x images/s(1)) on GPUs. On CPU the cores are shared, so 1 process
gets all threads (--threads-total), N processes split them, and efficiency is images/s(N) /
images/s(1): does DDP on one host beat one process using the same cores?

Model: epoch time for 1..64 GPUs from the measured single-device step time t1, the model's
gradient bytes and a link bandwidth, for fp32 and bf16-compressed all-reduce:
    t_step(N) = t1 + (1 - overlap) * ring(N)   (ring(N) = 2 (N-1)/N x bytes / bandwidth)
reported for no overlap (0) and full overlap (t_step = max(t1, ring)).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import RESULTS, data_args, provenance, run_trainer, table, write_json
from dist_cifar.cost import TRAIN_IMAGES, measure, ring_allreduce_s


def model_rows(t1: float, batch: int, grad_bytes: int, link_gbs: float) -> list[dict]:
    rows = []
    for gpus in (1, 2, 4, 8, 16, 32, 64):
        steps = TRAIN_IMAGES // (batch * gpus)
        row = {"gpus": gpus, "steps_per_epoch": steps, "compute_s": steps * t1}
        for name, nbytes in (("fp32", grad_bytes), ("bf16", grad_bytes // 2)):
            ring = ring_allreduce_s(nbytes, gpus, link_gbs)
            row[f"epoch_s_{name}_no_overlap"] = steps * (t1 + ring)
            row[f"epoch_s_{name}_overlap"] = steps * max(t1, ring)
            row[f"comm_share_{name}"] = ring / (t1 + ring)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--max-nproc", type=int, default=0, help="largest process count (0: GPUs, or 2 on CPU)")
    p.add_argument("--dataset", default="auto")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--steps-per-epoch", type=int, default=60)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads-total", type=int, default=2, help="CPU only: threads shared by the processes")
    p.add_argument("--link-gbs", type=float, default=400.0, help="model: all-reduce bandwidth per GPU, GB/s")
    p.add_argument("--extra", default="", help="extra trainer flags, e.g. '--precision bf16 --channels-last'")
    p.add_argument("--assume-t1-ms", type=float, default=0.0,
                   help="model only: take this single-device step time instead of measuring (says so in the JSON)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    import torch
    gpus = torch.cuda.device_count()
    max_nproc = args.max_nproc or (gpus if gpus else 2)
    counts = [] if args.assume_t1_ms else [n for n in (1, 2, 4, 8, 16) if n <= max_nproc]
    base = ["--model", args.model, "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
            "--steps-per-epoch", str(args.steps_per_epoch), "--split", "full", "--val-size", "0",
            "--no-save-best", *data_args(args.dataset, args.data_dir), *args.extra.split()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            threads = [] if gpus else ["--threads", str(max(args.threads_total // n, 1))]
            env = {} if gpus else {"OMP_NUM_THREADS": str(max(args.threads_total // n, 1))}
            last = run_trainer([*base, *threads], Path(tmp) / f"n{n}", nproc=n, env=env)[-1]
            rows.append({"processes": n, "threads_each": 0 if gpus else max(args.threads_total // n, 1),
                         "images_per_s": last["images_per_s"], "step_ms": 1000 * last["epoch_time_s"] / last["steps"],
                         "rank_time_spread_s": last["rank_time_max_s"] - last["rank_time_min_s"]})
            print(f"{n} process(es): {last['images_per_s']:,.0f} img/s", flush=True)
    for row in rows:  # GPUs: each process brings a device; CPU: the processes share the same cores
        ideal = rows[0]["images_per_s"] * (row["processes"] if gpus else 1)
        row["efficiency"] = row["images_per_s"] / ideal
    print()
    print(table(rows, ["processes", "threads_each", "images_per_s", "efficiency", "step_ms", "rank_time_spread_s"]))
    cost = measure(args.model)
    t1 = args.assume_t1_ms / 1000 if args.assume_t1_ms else rows[0]["step_ms"] / 1000
    predicted = model_rows(t1, args.batch_size, cost.grad_bytes_fp32, args.link_gbs)
    print(f"\nmodel: t1 = {1000 * t1:.2f} ms/step at batch {args.batch_size}, {cost.grad_bytes_fp32 / 1e6:.2f} MB fp32 "
          f"gradients, {args.link_gbs:g} GB/s links")
    print(table(predicted, ["gpus", "steps_per_epoch", "compute_s", "epoch_s_fp32_no_overlap", "epoch_s_fp32_overlap",
                            "epoch_s_bf16_no_overlap", "comm_share_fp32", "comm_share_bf16"]))
    meta = provenance()
    kind = "model" if args.assume_t1_ms else ("gpu" if gpus else "cpu")
    out = Path(args.out) if args.out else RESULTS / f"scaling_{args.model}_{kind}.json"
    write_json(out, {"benchmark": "scaling", "provenance": meta, "args": vars(args), "measured": rows,
                     "model": {"t1_s": t1, "t1_source": "assumed" if args.assume_t1_ms else "measured",
                               "grad_bytes_fp32": cost.grad_bytes_fp32, "link_gbs": args.link_gbs,
                               "rows": predicted}})
    from charts import scaling_chart
    scaling_chart(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
