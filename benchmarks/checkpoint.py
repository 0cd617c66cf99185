"""How long a checkpoint stalls training: the synchronous save the trainer used to do vs the
background save it does now, on the real vgg16_cifar + Adam state (4.0 GB), side by side.

    python benchmarks/checkpoint.py [--model vgg16_cifar] [--repeats 1] [--device auto]

synchronous: capture, torch.save to a temporary file, fsync, rename, then read the file back
to hash it for the commit marker; the step loop waits for all of it (the old path).
background:  `CheckpointManager.save`: the step loop waits for the copy into host buffers only
(pinned and reused on CUDA); serialising, writing, fsync, rename and the marker (hashed while
writing) run in a thread. Rows alternate, so drift of the shared machine hits both alike.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, add_output_flags, output_path, provenance, table, write_json
from dist_cifar import checkpoint as ckpt
from dist_cifar import distributed as D
from dist_cifar import files
from dist_cifar.checkpoint import CheckpointManager, RunState
from dist_cifar.config import make_config
from dist_cifar.models import build_model, count_parameters
from dist_cifar.timing import synchronize


def synchronous_save(manager: CheckpointManager, state: RunState) -> float:
    """The pre-background path, timed from the step loop's point of view."""
    t0 = time.perf_counter()
    blob = manager.capture(state)
    path = manager.out_dir / ckpt.checkpoint_name(state.epoch, state.step)
    ckpt.write_torch(path, blob)
    marker = {"file": path.name, "size": path.stat().st_size, "sha256": ckpt.sha256_file(path),
              "epoch": state.epoch, "step": state.step}
    files.atomic_write_bytes(ckpt.marker_path(path), json.dumps(marker).encode())
    ckpt.prune(manager.out_dir, 1)
    return time.perf_counter() - t0


def background_save(manager: CheckpointManager, state: RunState) -> tuple[float, float]:
    """(blocked, background) seconds of one CheckpointManager.save."""
    manager.take_times()
    t0 = time.perf_counter()
    manager.save(state, wait=True)
    blocked = time.perf_counter() - t0
    manager.close()
    _, written = manager.take_times()
    return blocked, written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg16_cifar")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dir", default="", help="folder to write in: a ckpt-bench-* folder is made inside it and removed after (default: runs/, git-ignored); nothing else there is touched")
    add_output_flags(p, "checkpoint_<model>_<device>.json")
    args = p.parse_args(argv)
    if args.repeats <= 0:
        p.error("--repeats must be > 0")
    info = D.DistInfo(device=D.local_device(args.device, 0))
    torch.manual_seed(0)
    model = build_model(args.model).to(info.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for param in model.parameters():  # one step, so Adam holds both moments, as in training
        param.grad = torch.zeros_like(param)
    optimizer.step()
    synchronize(info.device)
    cfg = make_config(model=args.model)
    # a fresh folder of its own, inside --dir (default runs/, ignored by git): only that is deleted
    scratch = Path(args.dir) if args.dir else ROOT / "runs"
    scratch.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=scratch))
    manager = CheckpointManager(folder, info, config=cfg.to_dict(), parts={"model": model, "optimizer": optimizer},
                                keep_last=1, global_batch_size=128)
    sync_s, blocked_s, written_s, sizes = [], [], [], []
    try:
        for r in range(args.repeats):
            state = RunState(epoch=2 * r + 1)
            sync_s.append(synchronous_save(manager, state))
            sizes.append(ckpt.committed(folder)[-1].stat().st_size)
            state = RunState(epoch=2 * r + 2)
            blocked, written = background_save(manager, state)
            blocked_s.append(blocked)
            written_s.append(written)
            assert ckpt.verify(ckpt.committed(folder)[-1])
            print(f"round {r}: synchronous {sync_s[-1]:.2f}s | background: blocked {blocked:.2f}s, "
                  f"written in {written:.2f}s", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    size = statistics.median(sizes)
    rows = [
        {"path": "synchronous (write, fsync, re-read to hash)", "blocked_s": statistics.median(sync_s),
         "background_s": 0.0, "gb_per_s": size / statistics.median(sync_s) / 1e9},
        {"path": "background (copy, then thread)", "blocked_s": statistics.median(blocked_s),
         "background_s": statistics.median(written_s), "gb_per_s": size / statistics.median(written_s) / 1e9},
    ]
    ratio = rows[1]["blocked_s"] / rows[0]["blocked_s"]
    # the first background save also allocates its host buffers (pinned on CUDA); later ones reuse them
    rows[1]["blocked_s_buffers_reused"] = blocked_s[-1] if len(blocked_s) > 1 else None
    print()
    print(table(rows, ["path", "blocked_s", "blocked_s_buffers_reused", "background_s", "gb_per_s"]))
    print(f"checkpoint {size / 1e9:.2f} GB ({count_parameters(model):,} parameters + Adam moments); "
          f"blocked time, background / synchronous: {ratio:.3f} (target <= 0.25)")
    out = output_path(args, f"checkpoint_{args.model}_{info.device.type}.json")
    write_json(out, {"benchmark": "checkpoint", "provenance": provenance(), "args": vars(args), "bytes": size,
                     "rows": rows, "blocked_ratio": ratio, "synchronous_s": sync_s, "background_blocked_s": blocked_s,
                     "background_write_s": written_s})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
