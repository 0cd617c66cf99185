"""The GPU suite's bookkeeping: distil a trainer run into one JSON (with MFU), and write the
suite's summary (provenance, every stage's status, the headline numbers, what was skipped).

    python benchmarks/suite_report.py run RUN_DIR OUT.json [--peak-tflops 989]
    python benchmarks/suite_report.py summary OUT_DIR STAGES.tsv --data WHAT [--smoke]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import provenance, write_json
from dist_cifar.cost import measure
from dist_cifar.files import read_jsonl

# Dense bf16 peak of an H200 SXM: the data sheet's 989.4 TFLOP/s without sparsity, and the ~790
# TFLOP/s that large bf16 matmuls measure there (what a model can reach at best).
H200_BF16_PEAK_TFLOPS = 989.4
H200_BF16_MEASURED_TFLOPS = 790.0


def distil_run(run_dir: Path, out: Path, peak_tflops: float) -> dict:
    """A trainer run folder -> accuracy, steady epoch time, images/s, MFU, compile, checkpoint, memory."""
    config = json.loads((run_dir / "config.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    # the first epoch warms up (and compiles): never a steady one, even when it is all there is
    steady = [r for r in metrics[1:] if r.get("compile_s") is None]
    images_per_s = statistics.median(r["images_per_s"] for r in steady) if steady else None
    flops = measure(config["model"]).train_flops_per_image
    blocked = [r["checkpoint_blocked_s"] for r in metrics if r.get("checkpoint_blocked_s")]
    world = config.get("world_size") or 1

    def mfu(peak_tflops_per_gpu: float):
        return images_per_s * flops / (peak_tflops_per_gpu * 1e12 * world) if images_per_s else None

    result = {
        "model": config["model"], "preset": config.get("preset"), "world_size": config.get("world_size"),
        "global_batch_size": config.get("global_batch_size"), "epochs_run": len(metrics),
        "epochs_planned": config.get("epochs"), "complete": bool(summary),
        "test_accuracy": summary.get("test_accuracy"), "train_accuracy": summary.get("train_accuracy"),
        "steady_epoch_time_s": statistics.median(r["epoch_time_s"] for r in steady) if steady else None,
        "steady_epoch_time_reason": None if steady else
        f"{len(metrics)} epoch(s) finished and the first warms up (compiles): no steady epoch to report",
        "first_epoch_time_s": metrics[0]["epoch_time_s"] if metrics else None,
        "images_per_s": images_per_s, "train_flops_per_image": flops,
        "mfu": mfu(peak_tflops), "mfu_vs_measured_790": mfu(H200_BF16_MEASURED_TFLOPS),
        "parallel": config.get("parallel_resolved"), "wire_bytes_per_step": metrics[-1].get("wire_bytes_per_step")
        if metrics else None,
        "peak_tflops_assumed": peak_tflops,
        "compile_s": metrics[0].get("compile_s") if metrics else None,
        "checkpoint_blocked_s": blocked, "checkpoint_write_s": [r["checkpoint_write_s"] for r in metrics
                                                                if r.get("checkpoint_write_s")],
        "peak_memory_mb": max((r.get("peak_memory_mb") or 0) for r in metrics) if metrics else None,
        "resolved": {k: config.get(k) for k in ("precision_resolved", "backend_resolved", "compile", "channels_last",
                                                  "loader", "ddp_comm_hook", "batch_size", "data_source")},
        "metrics": metrics, "provenance": provenance(),
    }
    write_json(out, result)
    return result


def summary(out_dir: Path, stages_tsv: Path, data: str, smoke: bool) -> dict:
    stages = []
    for line in stages_tsv.read_text().splitlines():
        name, status, seconds, note = (line.split("\t") + ["", "", "", ""])[:4]
        stages.append({"stage": name, "status": status, "seconds": float(seconds or 0), "note": note})
    load = lambda name: json.loads((out_dir / name).read_text()) if (out_dir / name).exists() else None  # noqa: E731
    fast, headline, peers, ladder = load("fast_run.json"), load("headline.json"), load("peers.json"), load("ladder.json")
    result = {"benchmark": "gpu_suite", "smoke": smoke, "data": data, "provenance": provenance(), "stages": stages}
    if fast:
        result["fast"] = {k: fast.get(k) for k in ("test_accuracy", "complete", "epochs_run", "steady_epoch_time_s",
                                                   "steady_epoch_time_reason", "images_per_s", "mfu",
                                                   "mfu_vs_measured_790", "compile_s", "checkpoint_blocked_s",
                                                   "checkpoint_write_s", "peak_memory_mb")}
    if headline and fast and fast.get("steady_epoch_time_s") and headline.get("steady_epoch_time_s"):
        result["headline_over_fast_epoch_time"] = headline["steady_epoch_time_s"] / fast["steady_epoch_time_s"]
    if peers:
        for model, block in peers["models"].items():
            result[f"peers_{model}"] = {r.get("key", r["contestant"]): {"images_per_s": r.get("images_per_s"),
                                                                     "dist_cifar_ratio": r.get("dist_cifar_ratio")}
                                        for r in block["rows"]}
    if ladder:
        result["ladder"] = {r["rung"]: r["images_per_s"] for r in ladder["rungs"]}
        bare, wrapped = result["ladder"].get("+tensor loader"), result["ladder"].get("+DDP + bf16 hook at world size 1")
        if bare and wrapped:
            result["ddp_at_world_size_1_speed"] = wrapped / bare  # < 1: the default (no DDP at one rank) is faster
    skipped = [f"{s['stage']} ({s['status']}{': ' + s['note'] if s['note'] else ''})" for s in stages if s["status"] != "ok"]
    if fast and not fast.get("complete"):
        skipped.append("fast's final evaluation (the run was cut before summary.json: no test accuracy)")
    if data == "synthetic":
        skipped.append("real CIFAR-10 (no .gpu_data/cifar10-jpeg.tar.gz: every stage trained on synthetic data)")
    result["skipped"] = "; ".join(skipped) or "nothing"
    write_json(out_dir / "suite_summary.json", result)
    print(f"[suite] skipped: {result['skipped']}")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("run_dir", type=Path)
    run.add_argument("out", type=Path)
    run.add_argument("--peak-tflops", type=float, default=H200_BF16_PEAK_TFLOPS)
    summ = sub.add_parser("summary")
    summ.add_argument("out_dir", type=Path)
    summ.add_argument("stages", type=Path)
    summ.add_argument("--data", required=True)
    summ.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.command == "run":
        distil_run(args.run_dir, args.out, args.peak_tflops)
    else:
        summary(args.out_dir, args.stages, args.data, args.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
