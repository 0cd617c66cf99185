"""Correctness on the training device: every precision x loader trains two finite steps;
channels_last and torch.compile outputs match eager NCHW. Prints a table, writes JSON.

    python benchmarks/device_checks.py [--out PATH]
"""
from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path

import torch

from common import add_output_flags, output_path, provenance, table, write_json
from dist_cifar import distributed as D
from dist_cifar.assembly import assemble
from dist_cifar.config import make_config
from dist_cifar.data import make_splits, make_synthetic
from dist_cifar.engine import EpochStart, StepHooks, train_epoch
from dist_cifar.models import build_model


def two_steps(device, precision: str, loader_kind: str, compile_model: bool, channels_last: bool) -> dict:
    cfg = make_config(model="small_cnn", precision=precision, optimizer="adamw", loader=loader_kind, batch_size=64,
                      augment=True, channels_last=channels_last, compile=compile_model, steps_per_epoch=2,
                      num_workers=0, seed=0)
    info = D.DistInfo(device=device)
    run = assemble(cfg, info, make_splits(make_synthetic(512), "full"))
    t0 = time.perf_counter()
    result = train_epoch(run.step_parts, run.loader, info, EpochStart(0), StepHooks(record_step_losses=True))
    losses = result.step_losses
    ok = result.steps == 2 and all(torch.isfinite(torch.tensor(losses)))
    return {"ok": bool(ok), "losses": losses, "seconds": time.perf_counter() - t0}


def outputs_match(device) -> list[dict]:
    torch.manual_seed(0)
    model = build_model("vgg_truncated").to(device).eval()
    x = torch.randn(32, 3, 32, 32, device=device)
    with torch.no_grad():
        ref = model(x)
        cl = build_model("vgg_truncated").to(device).eval()
        cl.load_state_dict(model.state_dict())
        cl = cl.to(memory_format=torch.channels_last)
        out_cl = cl(x.contiguous(memory_format=torch.channels_last))
        out_c = torch.compile(model, dynamic=False)(x)
    rows = []
    for name, out in (("channels_last", out_cl), ("compile", out_c)):
        rel = ((out - ref).norm() / ref.norm()).item()
        rows.append({"check": f"{name} vs eager NCHW", "rel_error": rel, "ok": rel < 1e-2})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_flags(p, "device_checks_<device>.json")
    args = p.parse_args(argv)
    device = D.local_device("auto", 0)
    rows = []
    combos = [(prec, loader, False, False) for prec in ("fp32", "bf16", "fp16") for loader in ("tensor", "torch")]
    combos += [("bf16", "tensor", False, True), ("bf16", "tensor", True, True), ("fp16", "tensor", True, False)]
    for prec, loader, comp, cl in combos:
        name = f"{prec} {loader}{' compile' if comp else ''}{' channels_last' if cl else ''}"
        try:
            res = two_steps(device, prec, loader, comp, cl)
        except Exception as exc:
            res = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
        rows.append({"check": name, **res})
        print(f"{name:<36} {'ok' if res['ok'] else 'FAIL'}", flush=True)
    rows += outputs_match(device)
    print(table(rows, ["check", "ok", "seconds", "rel_error"]))
    out = output_path(args, f"device_checks_{device.type}.json")
    write_json(out, {"benchmark": "device_checks", "provenance": provenance(), "rows": rows,
                     "all_ok": all(r["ok"] for r in rows)})
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
