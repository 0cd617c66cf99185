"""Peer 1: the hand-written DDP loop a pytorch/examples reader would write. fp32 eager,
torchvision transforms in DataLoader workers, DistributedSampler, DDP's default all-reduce.

    torchrun --standalone --nproc_per_node=2 benchmarks/peer_plain_ddp.py --data-dir DATA

Runs 2 x --steps steps and times the second half (rank 0, after a device sync and a barrier).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_data import add_common_args, emit, train_set  # noqa: E402
from dist_cifar.models import build_model  # noqa: E402  (the same model for every contestant)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # as pytorch/examples does
    torch.manual_seed(0)

    dataset = train_set(args.dataset, args.data_dir)
    sampler = DistributedSampler(dataset, shuffle=True, drop_last=True)
    loader = DataLoader(dataset, batch_size=args.global_batch_size // world, sampler=sampler, drop_last=True,
                        num_workers=args.num_workers, pin_memory=cuda, persistent_workers=args.num_workers > 0)
    model = build_model(args.model).to(device)
    if world > 1:  # like for like: no contestant pays for DDP at world size 1
        model = DDP(model, device_ids=[local_rank] if cuda else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    step, total, epoch, started = 0, 2 * args.steps, 0, 0.0
    while step < total:
        sampler.set_epoch(epoch)
        for images, labels in loader:
            if step == args.steps:
                sync(device)
                started = time.perf_counter()
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == total:
                break
        epoch += 1
    sync(device)
    elapsed = time.perf_counter() - started
    if rank == 0:
        emit("plain DDP loop (fp32 eager, DataLoader" + (")" if world > 1 else "; no DDP at world size 1)"), args.steps * args.global_batch_size / elapsed, args.steps,
             loss.item(), num_workers=args.num_workers)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
