"""Peer 2: PyTorch Lightning, written as its docs suggest, with the best flags it offers for the
device: `Trainer(strategy="ddp")`, `precision="bf16-mixed"`, a `torch.compile`d module and cuDNN
autotuning (`benchmark=True`) on GPUs (plus TF32 matmuls, as Lightning's own warning recommends),
fp32 on CPU; its DataLoader with
workers; Lightning inserts the DistributedSampler.

    torchrun --standalone --nproc_per_node=2 benchmarks/peer_lightning.py --data-dir DATA

Needs `pip install .[bench]`. Runs 2 x --steps steps and times the second half in a callback
(rank 0, after a device sync).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_data import add_common_args, emit, train_set  # noqa: E402
from dist_cifar.models import build_model  # noqa: E402


class Classifier(L.LightningModule):
    def __init__(self, model_name: str, lr: float, weight_decay: float):
        super().__init__()
        self.net, self.lr, self.weight_decay = build_model(model_name), lr, weight_decay

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self.net(images), labels)
        self.last_loss = loss.detach()
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class SteadyStateTimer(L.Callback):
    """Wall time of the steps after the first `warmup` ones."""

    def __init__(self, warmup: int):
        self.warmup, self.started, self.elapsed = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.started is None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.started = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.elapsed = time.perf_counter() - self.started


def main() -> None:
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.set_float32_matmul_precision("high")
    world, local_world = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    loader = DataLoader(train_set(args.dataset, args.data_dir), batch_size=args.global_batch_size // world,
                        shuffle=True, drop_last=True, num_workers=args.num_workers, pin_memory=cuda,
                        persistent_workers=args.num_workers > 0)
    module = Classifier(args.model, args.lr, args.weight_decay)
    if cuda:
        module = torch.compile(module)
    timer = SteadyStateTimer(args.steps)
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=local_world, num_nodes=world // local_world,
                        strategy="ddp" if world > 1 else "auto",  # like for like: no DDP at world size 1
                        precision="bf16-mixed" if cuda else "32-true", benchmark=cuda,
                        max_steps=2 * args.steps,
                        callbacks=[timer], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, loader)
    if trainer.global_rank == 0:
        net = module._orig_mod if hasattr(module, "_orig_mod") else module
        emit("Lightning " + ("bf16-mixed + compile" if cuda else "32-true"),
             args.steps * args.global_batch_size / timer.elapsed, args.steps, float(net.last_loss),
             lightning_version=L.__version__, num_workers=args.num_workers)


if __name__ == "__main__":
    main()
