"""The trainer's step loop vs a minimal hand-written loop: same model, data, batch, optimizer.

    python benchmarks/overhead.py [--model small_cnn] [--batch-size 128] [--steps 150] [--repeats 5]

Both consume the same device-resident batches; the hand loop is forward, loss, backward,
step and nothing else. The trainer side is `engine.train_epoch` with everything the real
runs have (agreement check, device-side sums, progress reads, LR schedule). A and B alternate
and the median of each is compared, so drift of the shared machine hits both alike.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch.nn.functional as F

from common import (add_output_flags, busy_warning, data_label, load_data, output_path, provenance, report_warnings,
                    spread_warning, table, write_json)
from dist_cifar import distributed as D
from dist_cifar.assembly import assemble
from dist_cifar.config import make_config
from dist_cifar.data import make_splits
from dist_cifar.engine import EpochStart, StepHooks, train_epoch
from dist_cifar.timing import synchronize


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_output_flags(p, "overhead_<model>_<device>.json")
    args = p.parse_args(argv)
    busy = busy_warning()
    info = D.DistInfo(device=D.local_device(args.device, 0))
    dev = info.device
    raw = load_data(synthetic_size=20_000)
    cfg = make_config(model=args.model, batch_size=args.batch_size, precision="fp32", steps_per_epoch=args.steps,
                      augment=True, seed=0)
    run = assemble(cfg, info, make_splits(raw, "full", val_size=0))
    model, opt, loader = run.model.module, run.optimizer, run.loader.micro  # the hand loop's batches
    hooks = StepHooks(progress_every=cfg.progress_every, on_progress=lambda *a: None)

    def hand_loop(epoch: int) -> float:
        loader.set_epoch(epoch)
        model.train()
        synchronize(dev)
        start = time.perf_counter()
        for x, y in loader.batches():
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        synchronize(dev)
        return time.perf_counter() - start

    def trainer(epoch: int) -> float:
        run.loader.set_epoch(epoch)
        return train_epoch(run.step_parts, run.loader, info, EpochStart(epoch), hooks).wall_s

    hand_loop(0), trainer(0)  # warm-up
    hand, train = [], []
    for r in range(args.repeats):
        hand.append(hand_loop(r + 1))
        train.append(trainer(r + 1))
    images = args.steps * args.batch_size
    rows = [{"loop": "hand-written", "median_s": statistics.median(hand), "images_per_s": images / statistics.median(hand)},
            {"loop": "dist_cifar trainer", "median_s": statistics.median(train), "images_per_s": images / statistics.median(train)}]
    overhead = statistics.median(train) / statistics.median(hand) - 1
    print(data_label(raw.source))
    print(table(rows, ["loop", "median_s", "images_per_s"]))
    print(f"trainer overhead: {100 * overhead:+.2f}% (target: within 5%)")
    impossible = (f"WARNING: an overhead of {100 * overhead:+.1f}% is impossible (the trainer does the hand loop's "
                  f"work and more): the machine's load moved between the rounds") if overhead < -0.05 else None
    warnings = report_warnings([busy, spread_warning("hand loop", hand), spread_warning("trainer", train), impossible])
    out = output_path(args, f"overhead_{args.model}_{dev.type}.json")
    write_json(out, {"benchmark": "overhead", "provenance": provenance(), "args": vars(args), "data_source": raw.source,
                     "rows": rows, "hand_s": hand, "trainer_s": train, "overhead_fraction": overhead,
                     "warnings": warnings})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
