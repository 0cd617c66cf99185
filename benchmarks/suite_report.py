"""The GPU suite's bookkeeping: distil a trainer run into one JSON (with MFU), and write the
suite's summary (provenance, every stage's status, the headline numbers, what was skipped).

    python benchmarks/suite_report.py run RUN_DIR OUT.json [--peak-tflops 989]
    python benchmarks/suite_report.py rehearsal SCRATCH OUT.json
    python benchmarks/suite_report.py summary OUT_DIR STAGES.tsv --data WHAT --suite-id ID [--rehearsal R.json] [--smoke]

The summary reads only result files whose provenance carries this suite's id: a stage that
failed this time never reports an earlier suite's numbers.
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
        "test_accuracy": summary.get("best_test_accuracy"), "train_accuracy": summary.get("best_train_accuracy"),
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


REHEARSED = (("fsdp", "bf16"), ("hybrid", "fp16"))  # the suite's first minute: gpu_suite.sh's rehearse()


def rehearsal(scratch: Path, out: Path) -> list[dict]:
    """One row per configuration of the suite's first minute: exit code, the epoch's train loss,
    the last error line."""
    rows = []
    if not any((scratch / f"rehearsal-{d}-{p}.log").exists() for d, p in REHEARSED):
        return rows  # the stage did not run (skipped): nothing to report, no file
    for design, precision in REHEARSED:
        stem = scratch / f"rehearsal-{design}-{precision}"
        code_file, log = stem.with_suffix(".exit"), stem.with_suffix(".log")
        code = int(code_file.read_text()) if code_file.exists() else None
        metrics = read_jsonl(stem / "metrics.jsonl") if (stem / "metrics.jsonl").exists() else []
        config = json.loads((stem / "config.json").read_text()) if (stem / "config.json").exists() else {}
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        errors = [l for l in lines if l.startswith("error:") or "Error" in l]
        status = "ok" if code == 0 else ("cut" if code is None else "failed")
        rows.append({"design": design, "precision": precision, "model": config.get("model"), "steps": 2,
                     "exit": code, "status": status, "train_loss": metrics[0]["train_loss"] if metrics else None,
                     "error": None if code == 0 else (errors[-1][:300] if errors else
                                                      f"no error line ({status}; {len(metrics)} epoch(s) logged)")})
    write_json(out, {"rows": rows, "provenance": provenance()})
    return rows


def ours(path: Path, suite_id: str):
    """A result file's content if this suite wrote it (its provenance carries the suite's id)."""
    if not path.exists():
        return None
    content = json.loads(path.read_text())
    return content if content.get("provenance", {}).get("suite_id") == suite_id else None


def summary(out_dir: Path, stages_tsv: Path, data: str, smoke: bool, *, suite_id: str,
            rehearsal_json: Path | None = None) -> dict:
    stages = []
    for line in stages_tsv.read_text().splitlines():
        name, status, seconds, note = (line.split("\t") + ["", "", "", ""])[:4]
        stages.append({"stage": name, "status": status, "seconds": float(seconds or 0), "note": note})
    fast, headline, peers, ladder = (ours(out_dir / name, suite_id) for name in
                                     ("fast_run.json", "headline.json", "peers.json", "ladder.json"))
    result = {"benchmark": "gpu_suite", "smoke": smoke, "data": data, "provenance": provenance(), "stages": stages}
    rehearsed = ours(rehearsal_json, suite_id) if rehearsal_json else None
    if rehearsed:
        result["rehearsal"] = rehearsed["rows"]
    if fast and fast.get("epochs_run"):  # a run that failed before its first epoch has no numbers
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
    skipped += [f"rehearsal {r['design']} + {r['precision']} ({r['status']}: {r['error']})"
                for r in result.get("rehearsal", []) if r["status"] != "ok"]
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
    summ.add_argument("--suite-id", required=True)
    summ.add_argument("--rehearsal", type=Path)
    reh = sub.add_parser("rehearsal")
    reh.add_argument("scratch", type=Path)
    reh.add_argument("out", type=Path)
    args = p.parse_args(argv)
    if args.command == "run":
        distil_run(args.run_dir, args.out, args.peak_tflops)
    elif args.command == "rehearsal":
        rehearsal(args.scratch, args.out)
    else:
        summary(args.out_dir, args.stages, args.data, args.smoke, suite_id=args.suite_id,
                rehearsal_json=args.rehearsal)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
