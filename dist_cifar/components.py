"""Build the model wrapper, optimizer and LR schedule from the config.

`wrap_model` returns both the module (for evaluation and checkpoints: the raw parameters) and
the callable the step loop trains (DDP-wrapped, then compiled, so DDP keeps its bucketed
all-reduce overlap under torch.compile).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import distributed as D
from .config import ConfigError, TrainConfig
from .models import build_model


class CommTimer:
    """A DDP communication hook that times each bucket's all-reduce.

    comm_s sums, over buckets, the host time from the bucket's hand-off to its future's
    completion. On gloo (CPU) that is the all-reduce itself; buckets overlap with backward and
    each other, so it is communication time, not time added to the step. On NCCL the future
    completes when the work is queued on the GPU stream, so the number is a lower bound."""

    def __init__(self, kind: str):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        self.base = {"allreduce": default_hooks.allreduce_hook,
                     "fp16": default_hooks.fp16_compress_hook,
                     "bf16": default_hooks.bf16_compress_hook}[kind]
        self.total_s = 0.0

    def hook(self, state, bucket):  # DDP calls this once per gradient bucket
        t0 = time.perf_counter()

        def done(fut):
            self.total_s += time.perf_counter() - t0
            return fut.value()

        return self.base(state, bucket).then(done)

    def take(self) -> float:
        value, self.total_s = self.total_s, 0.0
        return value


@dataclass
class Model:
    module: nn.Module            # raw parameters: evaluation, checkpoints, parameter counts
    train_model: nn.Module       # what the step loop calls (DDP and/or compiled)
    eval_model: nn.Module        # module, compiled when --compile
    comm: Optional[CommTimer] = None


def wrap_model(cfg: TrainConfig, info: D.DistInfo) -> Model:
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
    module = build_model(cfg.model, cfg.batchnorm, cfg.dropout, cfg.pooling)
    if cfg.sync_bn and info.distributed:
        if info.device.type != "cuda":
            raise ConfigError("--sync-bn needs GPUs (DDP runs SyncBatchNorm on CUDA only): drop it on CPU")
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
    module = module.to(info.device, memory_format=memory_format)
    train_model: nn.Module = module
    comm = None
    if info.distributed:
        train_model = DDP(
            module, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            bucket_cap_mb=cfg.ddp_bucket_mb, gradient_as_bucket_view=cfg.ddp_grad_as_bucket_view,
            static_graph=cfg.ddp_static_graph,
        )
        if cfg.ddp_comm_hook != "none":
            comm = CommTimer(cfg.ddp_comm_hook)
            train_model.register_comm_hook(None, comm.hook)
    torch.manual_seed(cfg.seed + 7_919 * (info.rank + 1))  # dropout masks differ between ranks
    eval_model = module
    if cfg.compile:
        train_model = torch.compile(train_model, mode=cfg.compile_mode, dynamic=False)
        eval_model = torch.compile(module, mode=cfg.compile_mode, dynamic=False)
    return Model(module, train_model, eval_model, comm)


def build_optimizer(cfg: TrainConfig, module: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    # fused kernels step all parameters in a few launches on CUDA; foreach is the CPU default
    fast = {"fused": True} if device.type == "cuda" else {}
    params = module.parameters()
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fast)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fast)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                           weight_decay=cfg.weight_decay, **fast)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    total = max(cfg.epochs * steps_per_epoch, 1)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total,
                                                   pct_start=0.25, anneal_strategy="linear")
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
