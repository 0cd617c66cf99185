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

Designs (`--designs`, model only, no process started): step time of ddp, ddp + bf16 hook, hybrid
and fsdp for 1-8 GPUs on one node and 2-4 nodes of 8, at a fixed global batch, as
    t_step = FLOPs per image x images per GPU / (peak x MFU) + bytes per GPU / link
with the bytes from dist_cifar.cost.step_collectives (ring accounting; a collective whose ranks
span nodes runs at the inter-node bandwidth, one inside a node at NVLink's: the 2-D hybrid's head)
and no overlap of communication with compute. The
assumptions are printed with the table. `--check-scaleout FILE` puts the same arithmetic against
benchmarks/scaleout.py's measured step times on the emulated link: compute is taken from the
fastest-communicating run there and every design's step predicted as compute + bytes / rate.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import (add_output_flags, busy_warning, data_args, data_label, output_path, provenance, report_warnings,
                    run_trainer, table, write_json)
from dist_cifar.cost import TRAIN_IMAGES, measure, predict_comm_s, ring_allreduce_s, step_collectives

# label -> (--parallel, DDP hook, head ranks: 0 every rank, "node" a node's GPUs)
DESIGN_FLAGS = {"ddp": ("ddp", "none", 0), "ddp_bf16_hook": ("ddp", "bf16", 0), "hybrid": ("hybrid", "bf16", 0),
                "hybrid_2d": ("hybrid", "bf16", "node"), "fsdp": ("fsdp", "none", 0)}
GPUS_PER_NODE = 8


def design_rows(model: str, *, global_batch: int, peak_tflops: float, mfu: float, nvlink_gbs: float,
                internode_gbs: float) -> list[dict]:
    """Predicted step time and scaling efficiency of each design, bf16 compute, 1-8 GPUs on one
    node and 2-4 nodes of 8 GPUs; `hybrid_2d` shards the head over each node's GPUs only (the
    same as `hybrid` on one node). Also the bytes each GPU sends across nodes."""
    flops = measure(model).train_flops_per_image
    single = flops * global_batch / (peak_tflops * 1e12 * mfu)
    rows = []
    for nodes, gpus in [(1, g) for g in (1, 2, 4, 8)] + [(n, GPUS_PER_NODE * n) for n in (2, 3, 4)]:
        per_gpu = global_batch // gpus
        compute = flops * per_gpu / (peak_tflops * 1e12 * mfu)
        row = {"nodes": nodes, "gpus": gpus, "images_per_gpu": per_gpu, "compute_ms": 1000 * compute}
        for label, (design, hook, head) in DESIGN_FLAGS.items():
            tp = min(gpus, GPUS_PER_NODE) if head == "node" else 0
            comm = predict_comm_s(step_collectives(design, model, batch_per_rank=per_gpu, world=gpus, precision="bf16",
                                                   comm_hook=hook, tp=tp),
                                  nodes=nodes, intra_gbs=nvlink_gbs, inter_gbs=internode_gbs)
            step = compute + comm["comm_s"]
            row[f"{label}_ms"] = 1000 * step
            row[f"{label}_eff"] = single / (gpus * step)
            row[f"{label}_mb_across"] = comm["bytes_across_nodes"] / 1e6
        rows.append(row)
    return rows


def check_scaleout(path: Path) -> list[dict]:
    """Measured step times on the emulated link against compute + bytes / rate."""
    measured = [r for r in json.loads(path.read_text())["rows"] if "step_s" in r]
    rate_bps = {r["rate"]: float(r["rate"].replace("gbit", "")) * 1e9 / 8 for r in measured}
    # compute: the run that sends least, at the fastest link, less its own transfer time
    base = min(measured, key=lambda r: (r["wire_mb_per_step"] * 1e6 / rate_bps[r["rate"]], -rate_bps[r["rate"]]))
    compute = base["step_s"] - base["wire_mb_per_step"] * 1e6 / rate_bps[base["rate"]]
    rows = []
    for r in measured:
        predicted = compute + r["wire_mb_per_step"] * 1e6 / rate_bps[r["rate"]]
        rows.append({"rate": r["rate"], "design": r["design"], "measured_s": r["step_s"], "predicted_s": predicted,
                     "measured_over_predicted": r["step_s"] / predicted})
    return rows


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
    add_output_flags(p, "scaling_<model>_<device>.json")
    p.add_argument("--designs", action="store_true", help="model only: the designs' step times for 1-32 GPUs")
    p.add_argument("--global-batch", type=int, default=512, help="--designs: global batch")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="--designs: bf16 peak per GPU (H200 measured)")
    p.add_argument("--mfu", type=float, default=0.4, help="--designs: ASSUMED fraction of the peak the compute reaches")
    p.add_argument("--nvlink-gbs", type=float, default=350.0, help="--designs: ring bus bandwidth in a node, GB/s")
    p.add_argument("--internode-gbs", type=float, default=50.0, help="--designs: per-GPU bandwidth between nodes, GB/s")
    p.add_argument("--check-scaleout", default="", help="a benchmarks/scaleout.py JSON to check the model against")
    args = p.parse_args(argv)
    if args.designs or args.check_scaleout:
        return design_main(args)
    import torch
    gpus = torch.cuda.device_count()
    max_nproc = args.max_nproc or (gpus if gpus else 2)
    counts = [] if args.assume_t1_ms else [n for n in (1, 2, 4, 8, 16) if n <= max_nproc]
    base = ["--model", args.model, "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
            "--steps-per-epoch", str(args.steps_per_epoch), "--split", "full", "--val-size", "0",
            "--no-save-best", *data_args(args.dataset, args.data_dir), *args.extra.split()]
    rows = []
    busy = busy_warning()
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
    print(data_label(data_args(args.dataset, args.data_dir)))
    print(table(rows, ["processes", "threads_each", "images_per_s", "efficiency", "step_ms", "rank_time_spread_s"]))
    warnings = report_warnings([busy, *(f"WARNING: {r['processes']} processes at {r['efficiency']:.2f} efficiency is "
                                        f"impossible: the machine's load changed between the runs" for r in rows
                                        if r["efficiency"] > 1.1)])
    cost = measure(args.model)
    t1 = args.assume_t1_ms / 1000 if args.assume_t1_ms else rows[0]["step_ms"] / 1000
    predicted = model_rows(t1, args.batch_size, cost.grad_bytes_fp32, args.link_gbs)
    print(f"\nmodel: t1 = {1000 * t1:.2f} ms/step at batch {args.batch_size}, {cost.grad_bytes_fp32 / 1e6:.2f} MB fp32 "
          f"gradients, {args.link_gbs:g} GB/s links")
    print(table(predicted, ["gpus", "steps_per_epoch", "compute_s", "epoch_s_fp32_no_overlap", "epoch_s_fp32_overlap",
                            "epoch_s_bf16_no_overlap", "comm_share_fp32", "comm_share_bf16"]))
    meta = provenance()
    kind = "model" if args.assume_t1_ms else ("gpu" if gpus else "cpu")
    out = output_path(args, f"scaling_{args.model}_{kind}.json")
    write_json(out, {"benchmark": "scaling", "provenance": meta, "args": vars(args), "measured": rows,
                     "data": data_args(args.dataset, args.data_dir), "warnings": warnings,
                     "model": {"t1_s": t1, "t1_source": "assumed" if args.assume_t1_ms else "measured",
                               "grad_bytes_fp32": cost.grad_bytes_fp32, "link_gbs": args.link_gbs,
                               "rows": predicted}})
    from charts import scaling_chart
    scaling_chart(out)
    return 0


def design_main(args) -> int:
    payload = {"benchmark": "scaling_designs", "provenance": provenance(), "args": vars(args)}
    if args.designs:
        assumptions = (f"assumed: bf16 compute at {args.mfu:.0%} of {args.peak_tflops:g} TFLOP/s per GPU, "
                       f"{args.nvlink_gbs:g} GB/s ring bandwidth in a node, {args.internode_gbs:g} GB/s per GPU "
                       f"between nodes, no overlap of communication with compute, global batch {args.global_batch}")
        rows = design_rows(args.model, global_batch=args.global_batch, peak_tflops=args.peak_tflops, mfu=args.mfu,
                           nvlink_gbs=args.nvlink_gbs, internode_gbs=args.internode_gbs)
        print(f"{args.model}: {assumptions}")
        print(table(rows, ["nodes", "gpus", "images_per_gpu", "compute_ms", *[f"{d}_ms" for d in DESIGN_FLAGS],
                           *[f"{d}_eff" for d in DESIGN_FLAGS]]))
        payload.update(assumptions=assumptions, rows=rows)
    if args.check_scaleout:
        checked = check_scaleout(Path(args.check_scaleout))
        print("\nmodel against the emulated link (compute from the least-communicating run):")
        print(table(checked, ["rate", "design", "measured_s", "predicted_s", "measured_over_predicted"]))
        payload["check_scaleout"] = {"source": args.check_scaleout, "rows": checked}
    out = output_path(args, f"scaling_designs_{args.model}_model.json")
    write_json(out, payload)
    if args.designs:
        from charts import designs_chart
        designs_chart(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
