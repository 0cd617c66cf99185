"""Training time per epoch along the feature ladder, every rung measured in one run.

    python benchmarks/epoch_time.py --model small_cnn --batch-size 256 --steps-per-epoch 60
    python benchmarks/epoch_time.py --model vgg16_cifar --batch-size 512 --nproc 8   # GPUs

Rungs (each adds one feature to the previous): fp32 eager + torch DataLoader, +bf16,
+channels_last, +compile, +tensor loader, and under torchrun (--nproc > 1) +bf16 comm hook, or with one process +DDP + bf16 hook at world size 1
(what the trainer skips by default there).
Each rung is the real trainer in its own process; the time per epoch is the steady state
(the last epoch; the first one compiles/warms up), projected to a full pass when
--steps-per-epoch caps it. CUDA epochs are timed after a device sync.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import (add_output_flags, busy_warning, data_args, data_label, output_path, provenance, report_warnings,
                    run_trainer, single_rank_env, table, write_json)

# Every rung names each feature on or off: on GPUs the trainer's defaults turn them all on.
RUNGS = [
    ("fp32 eager, torch loader", ["--precision", "fp32", "--loader", "torch", "--no-channels-last", "--no-compile"]),
    ("+bf16", ["--precision", "bf16", "--loader", "torch", "--no-channels-last", "--no-compile"]),
    ("+channels_last", ["--precision", "bf16", "--loader", "torch", "--channels-last", "--no-compile"]),
    ("+compile", ["--precision", "bf16", "--loader", "torch", "--channels-last", "--compile"]),
    ("+tensor loader", ["--precision", "bf16", "--loader", "tensor", "--channels-last", "--compile"]),
]
HOOK_RUNG = ("+bf16 comm hook", ["--precision", "bf16", "--loader", "tensor", "--channels-last", "--compile",
                                 "--ddp-comm-hook", "bf16"])
# One GPU: what DDP and its bf16 hook cost at world size 1 (by default the trainer skips both there);
# run in a one-rank process group
SINGLE_DDP_RUNG = ("+DDP + bf16 hook at world size 1", ["--precision", "bf16", "--loader", "tensor", "--channels-last",
                                                        "--compile", "--ddp-single", "--ddp-comm-hook", "bf16"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--batch-size", type=int, default=256, help="per process")
    p.add_argument("--dataset", default="auto", help="auto: the real CIFAR-10 in data/ or $DIST_CIFAR_DATA, else synthetic (the table says which)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--steps-per-epoch", type=int, default=50)
    p.add_argument("--epochs", type=int, default=2, help="per rung; the last one is reported")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun when > 1)")
    p.add_argument("--num-workers", type=int, default=2, help="torch loader workers")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch default)")
    p.add_argument("--rungs", default="", help="comma-separated rung numbers to run (0-based; default all)")
    p.add_argument("--extra", default="", help="trainer flags appended to every rung, e.g. --extra=--no-compile")
    add_output_flags(p, "epoch_time_<model>_bs<batch>_<device>.json")
    args = p.parse_args(argv)

    rungs = RUNGS + ([HOOK_RUNG] if args.nproc > 1 else [SINGLE_DDP_RUNG])
    try:
        chosen = {int(r) for r in args.rungs.split(",") if r.strip()} or set(range(len(rungs)))
    except ValueError:
        p.error(f"--rungs takes comma-separated numbers, got {args.rungs!r}")
    if not chosen <= set(range(len(rungs))) or args.epochs <= 0 or args.steps_per_epoch <= 0:
        p.error(f"--rungs must be within 0..{len(rungs) - 1} and --epochs, --steps-per-epoch > 0")
    common = ["--model", args.model, "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
              "--steps-per-epoch", str(args.steps_per_epoch), "--num-workers", str(args.num_workers),
              "--split", "full", "--val-size", "0", "--no-save-best", "--no-final-eval",
              *data_args(args.dataset, args.data_dir)] + (["--threads", str(args.threads)] if args.threads else [])
    busy = busy_warning()
    meta = provenance()
    device = "gpu" if meta["gpus"] else "cpu"
    out = output_path(args, f"epoch_time_{args.model}_bs{args.batch_size}_{device}.json")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for number, (name, flags) in enumerate(rungs):
            if number not in chosen:
                continue
            group = single_rank_env() if "--ddp-single" in flags else None
            records = run_trainer([*common, *flags, *args.extra.split()], Path(tmp) / "run", nproc=args.nproc,
                                  env=group)
            config = json.loads((Path(tmp) / "run" / "config.json").read_text())
            last = records[-1]
            full_steps = config["split_sizes"]["train"] // (args.batch_size * args.nproc)
            step_s = last["epoch_time_s"] / last["steps"]
            rows.append({"rung": name, "images_per_s": last["images_per_s"], "step_ms": 1000 * step_s,
                         "epoch_s_measured": last["epoch_time_s"], "steps_measured": last["steps"],
                         "epoch_s_full": step_s * full_steps, "full_epoch_steps": full_steps,
                         "data_wait_s": last["data_wait_s"], "peak_memory_mb": last["peak_memory_mb"],
                         "first_epoch_s": records[0]["epoch_time_s"], "compile_s": records[0].get("compile_s"),
                         "flags": " ".join(flags)})
            for row in rows:
                row["speedup"] = row["images_per_s"] / rows[0]["images_per_s"]
            print(f"{name:<28} {last['images_per_s']:>10,.0f} img/s", flush=True)
            # after every rung, so a time-boxed run (the GPU suite) keeps the rungs it finished
            write_json(out, {"benchmark": "epoch_time", "provenance": meta, "args": vars(args), "data": common,
                             "rungs": rows, "complete": len(rows) == len(chosen), "warnings": [busy] if busy else []})
    cols = ["rung", "images_per_s", "speedup", "step_ms", "epoch_s_full", "data_wait_s", "peak_memory_mb", "first_epoch_s"]
    print()
    print(data_label(data_args(args.dataset, args.data_dir)))
    print(table(rows, cols))
    report_warnings([busy])
    from charts import ladder_chart
    ladder_chart(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
