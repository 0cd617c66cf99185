"""Images/s of the training data path alone: device-resident `tensor` loader vs torchvision
DataLoader (`torch`) with 0 and 2 workers, both with crop+flip augmentation and normalisation.

    python benchmarks/loader.py [--batch-size 256] [--epochs 2] [--device auto]
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from common import (add_output_flags, busy_warning, data_label, load_data, output_path, provenance, report_warnings,
                    spread_warning, table, write_json)
from dist_cifar.data import make_splits, normalization
from dist_cifar.loaders import LoaderSpec, TensorLoader, TorchLoader
from dist_cifar.timing import synchronize


def epoch_rate(loader, device, epoch: int) -> float:
    """Images/s of one full pass over the loader."""
    loader.set_epoch(epoch)
    synchronize(device)
    start, images = time.perf_counter(), 0
    for x, y in loader.batches():
        images += y.shape[0]
    synchronize(device)
    return images / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=5, help="measured rounds per loader (after one warm-up)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_output_flags(p, "loader_<device>.json")
    args = p.parse_args(argv)
    busy = busy_warning()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    raw = load_data(synthetic_size=50_000)
    train = make_splits(raw, "full", val_size=0).train
    mean, std = normalization("cifar")
    spec = LoaderSpec(args.batch_size, mean=mean, std=std, augment=True)
    variants = [
        ("tensor (on device)", lambda: TensorLoader(train, device, spec)),
        ("torch, 0 workers", lambda: TorchLoader(train, device, replace(spec, num_workers=0))),
        ("torch, 2 workers", lambda: TorchLoader(train, device, replace(spec, num_workers=2))),
    ]
    loaders = [(name, make()) for name, make in variants]
    for _, loader in loaders:
        epoch_rate(loader, device, 0)  # warm-up: worker start-up, first allocations
    # interleaved rounds, median per loader: machine drift hits every variant alike
    rates = {name: [] for name, _ in loaders}
    for epoch in range(1, args.epochs + 1):
        for name, loader in loaders:
            rates[name].append(epoch_rate(loader, device, epoch))
    rows = []
    for name, _ in loaders:
        ips = statistics.median(rates[name])
        rows.append({"loader": name, "images_per_s": ips, "rounds": rates[name]})
        print(f"{name:<22} {ips:>12,.0f} img/s (median of {len(rates[name])})", flush=True)
    for row in rows:
        row["vs_torch_2_workers"] = row["images_per_s"] / rows[2]["images_per_s"]
    print()
    print(data_label(raw.source))
    print(table(rows, ["loader", "images_per_s", "vs_torch_2_workers"]))
    warnings = report_warnings([busy, *(spread_warning(name, rates[name]) for name, _ in loaders)])
    out = output_path(args, f"loader_{'gpu' if device.type == 'cuda' else 'cpu'}.json")
    write_json(out, {"benchmark": "loader", "provenance": provenance(), "args": vars(args), "data_source": raw.source,
                     "train_images": len(train), "rows": rows, "warnings": warnings})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
