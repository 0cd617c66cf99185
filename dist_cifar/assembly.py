"""Everything a run needs, built in one place from (TrainConfig, DistInfo, data splits).

`assemble` is the only code that turns the config into loaders, evaluation shards, the model
wrapper, optimizer, LR schedule and precision policy, and it computes the derived values
(global batch, steps per epoch, normalisation) once. The trainer, the benchmarks and the tests
all call it; nothing else unpacks the config into these parts.

How the model is spread over the ranks (DDP, the hybrid sharded head, FSDP2) is parallel.py's
job; the assembler builds the plain model with the run's seed and hands it over.
"""
from __future__ import annotations

import functools
import math

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import autoplan
from . import distributed as D
from .config import ConfigError, TrainConfig
from .data import Split, Splits, normalization
from .engine import Precision, StepParts
from .loaders import EvalShards, LoaderSpec, build_train_loader
from .models import build_model
from .ema import EMA
from .parallel import ConsolidatedModel, WrappedModel, parallelize
from .runtime import settle


def wrap_model(cfg: TrainConfig, info: D.DistInfo) -> WrappedModel:
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (shards are cut from them)
    with torch.device(info.device):  # built where it trains: vgg16_cifar's 333M parameters init in ms on a GPU
        module = build_model(cfg.model, cfg.batchnorm, cfg.dropout, cfg.pooling)
    return parallelize(module, cfg, info)


OPTIMIZER_KERNELS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}


def build_optimizer(cfg: TrainConfig, module: nn.Module) -> torch.optim.Optimizer:
    """`cfg.optimizer_kernel` is resolved (runtime.settle): fused, foreach or loop."""
    fast = OPTIMIZER_KERNELS[cfg.optimizer_kernel]
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
        # total + 1: the scheduler is stepped after every optimizer step, so after the last one it
        # sits at `total`; a schedule of exactly `total` steps would extrapolate a negative lr there
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total + 1,
                                                   pct_start=0.25, anneal_strategy="linear")
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total)
    if cfg.schedule == "cosine" and not warmup:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        warmup_factor, warmup=warmup, total=total, start=cfg.warmup_lr / cfg.lr, cosine=cfg.schedule == "cosine"))


def warmup_factor(step: int, *, warmup: int, total: int, start: float, cosine: bool) -> float:
    """The lr multiplier at optimizer step `step`: linear from `start` to 1 over `warmup` steps,
    then constant, or a cosine from 1 to 0 at `total` (what CosineAnnealingLR does without warm-up)."""
    if step < warmup:
        return start + (1.0 - start) * step / warmup
    if not cosine:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


@dataclass(kw_only=True)
class TrainingRun:
    """The parts of one run on one rank, and the values derived from the config."""

    cfg: TrainConfig
    info: D.DistInfo
    splits: Splits
    train_spec: LoaderSpec
    eval_spec: LoaderSpec
    loader: object                         # TensorLoader | TorchLoader
    val_shards: Optional[EvalShards]       # None when there is no validation split
    model: WrappedModel
    optimizer: torch.optim.Optimizer
    scheduler: object
    precision: Precision
    ema: Optional[EMA] = None               # --ema
    parallel_auto: Optional[dict] = None    # --parallel auto: the links measured, the predictions, the choice

    @property
    def global_batch_size(self) -> int:
        """Images per optimizer step over all ranks and micro-batches."""
        return self.cfg.batch_size * self.info.world_size * self.cfg.grad_accum_steps

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    @property
    def step_parts(self) -> StepParts:
        # FSDP2 has no buckets: its reduce-scatter assigns fresh gradients, so they are freed
        bucket_views = self.info.distributed and self.cfg.ddp_grad_as_bucket_view and self.model.plan.name != "fsdp"
        clip = (functools.partial(self.model.plan.clip_gradients, self.model.module, self.cfg.clip_grad_norm)
                if self.cfg.clip_grad_norm else None)
        return StepParts(self.model.train_model, self.optimizer, self.scheduler, self.precision,
                         label_smoothing=self.cfg.label_smoothing, grads_to_none=not bucket_views, clip=clip,
                         gradient_sync=self.model.plan.gradient_sync, finish_gradients=self.model.plan.finish_gradients,
                         ema=self.ema)

    def shards(self, split: Split) -> EvalShards:
        """This rank's exact slice of an evaluation split, normalised like training (in lockstep
        over the ranks when the model's forward is itself a collective)."""
        return EvalShards(split, self.info.device, self.eval_spec, lockstep=self.model.plan.lockstep)


def assemble(cfg: TrainConfig, info: D.DistInfo, splits: Splits) -> TrainingRun:
    """Build every part of a run; `cfg.batch_size`, `run.cfg` etc. are the settled values."""
    cfg = settle(cfg, info.device.type, info.world_size)
    cfg, parallel_auto = autoplan.choose(cfg, info, cfg.precision)
    mean, std = normalization(cfg.normalize)
    shard = dict(mean=mean, std=std, rank=info.rank, world=info.world_size, channels_last=cfg.channels_last)
    train_spec = LoaderSpec(cfg.batch_size, seed=cfg.seed, augment=cfg.augment, steps_cap=cfg.steps_per_epoch,
                            num_workers=cfg.num_workers, **shard)
    eval_spec = LoaderSpec(cfg.eval_batch_size, **shard)
    loader = build_train_loader(cfg.loader, splits.train, info.device, train_spec, cfg.grad_accum_steps)
    if len(loader) == 0:
        accum = f" x {cfg.grad_accum_steps} micro-batches" if cfg.grad_accum_steps > 1 else ""
        raise ConfigError(f"--batch-size {cfg.batch_size} x {info.world_size} processes{accum} exceeds the "
                          f"{len(splits.train)} training images: lower --batch-size")
    model = wrap_model(cfg, info)
    # `is not None`, never truthiness: a rank whose shard is empty must still join the all-reduce
    val_shards = (EvalShards(splits.val, info.device, eval_spec, lockstep=model.plan.lockstep)
                  if splits.val is not None else None)
    optimizer = build_optimizer(cfg, model.module)
    scheduler = build_scheduler(cfg, optimizer, len(loader))
    # the hybrid's head slices are not all-reduced: an fp16 overflow in one must skip the step everywhere
    policy = Precision.build(cfg.precision, info.device,
                             agree_overflows=model.plan.name == "hybrid" and info.world_size > 1)
    ema = EMA(model.module, cfg.ema, ConsolidatedModel(model.plan, model.module)) if cfg.ema else None
    return TrainingRun(cfg=cfg, info=info, splits=splits, train_spec=train_spec, eval_spec=eval_spec, loader=loader,
                       val_shards=val_shards, model=model, optimizer=optimizer, scheduler=scheduler, precision=policy,
                       ema=ema, parallel_auto=parallel_auto)
