"""Flip test-time augmentation on trained weights: each run's kept weights (best.pt) evaluated on
its own test split twice, plain and with `--tta-flip`, so the difference is TTA alone. Runs with
bit-identical weights (a study's shared baseline) count once.

    python benchmarks/tta.py runs/ablations/*/*/        # any finished run folders

Writes JSON + a table to benchmarks/results/tta_<device>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
from pathlib import Path

import torch

from common import add_output_flags, output_path, provenance, table, write_json
from dist_cifar import distributed as D
from dist_cifar.assembly import assemble
from dist_cifar.parallel import FlipAveraged
from dist_cifar.config import TrainConfig, make_config
from dist_cifar.data import load_source, make_splits
from dist_cifar.engine import evaluate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    add_output_flags(p, "tta_cpu.json")
    args = p.parse_args(argv)
    info = D.DistInfo(device=torch.device("cpu"))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    rows, loaded, seen = [], {}, {}
    for run_dir in args.runs:
        if not all((run_dir / name).exists() for name in ("best.pt", "config.json", "summary.json")):  # finished runs
            continue
        weights = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)["state_dict"]
        digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in weights.values())).hexdigest()
        if digest in seen:  # the same recipe trained twice (studies share their baseline): count it once
            print(f"{run_dir}: the same weights as {seen[digest]}, skipped")
            continue
        seen[digest] = run_dir
        saved = json.loads((run_dir / "config.json").read_text())
        fields = {k: v for k, v in saved.items() if k in names and k not in ("preset", "batch_size", "global_batch_size")}
        key = (fields["dataset"], fields["data_dir"], fields["split"], fields["val_size"], fields["max_train"])
        if key not in loaded:
            loaded[key] = make_splits(load_source(fields["dataset"], fields["data_dir"]), fields["split"],
                                      fields["val_size"], fields["max_train"])
        splits = loaded[key]
        result = {"run": f"{run_dir.parent.name}/{run_dir.name}", "model": fields["model"],
                  "augment": fields["augment"]}
        run = assemble(make_config(**dict(fields, batch_size=saved["batch_size"], tta_flip=False, compile=False,
                                          device="cpu", wandb="off")), info, splits)
        run.model.module.load_state_dict(weights)
        test_shards = run.shards(splits.test)
        for suffix, model in (("", run.model.eval_model), ("_flip", FlipAveraged(run.model.eval_model))):
            test = evaluate(model, test_shards, run.precision, info)
            result["test_acc" + suffix], result["test_loss" + suffix] = test.accuracy, test.loss
        result["gain_points"] = result["test_acc_flip"] - result["test_acc"]
        rows.append(result)
        print(f"{result['run']:<40} {result['test_acc']:6.2f} -> {result['test_acc_flip']:6.2f}", flush=True)
    print(table(rows, ["run", "model", "augment", "test_acc", "test_acc_flip", "gain_points", "test_loss", "test_loss_flip"]))
    gains = [r["gain_points"] for r in rows]
    summary = {"runs": len(rows), "median_gain_points": statistics.median(gains) if gains else None,
               "min_gain_points": min(gains, default=None), "max_gain_points": max(gains, default=None)}
    print(summary)
    out = output_path(args, "tta_cpu.json")
    write_json(out, {"benchmark": "tta", "provenance": provenance(), "summary": summary, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
