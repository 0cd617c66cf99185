"""One training epoch and one evaluation pass, for one process or one rank of many.

The step loop keeps its sums on the device and reads them back only every `progress_every`
steps and at the epoch's end; ranks agree on stopping (non-finite loss, preemption) through
one small all-reduce every `guard_every` steps, at the same step on every rank.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from .faults import FaultInjector
from .timing import Stopwatch


class NonFiniteLoss(RuntimeError):
    """Some rank saw a non-finite loss (or too many fp16 overflow skips); every rank stops."""


@dataclass
class Precision:
    """Autocast dtype plus, for fp16, a GradScaler."""

    name: str
    device_type: str
    scaler: Optional[torch.amp.GradScaler] = None

    @classmethod
    def build(cls, name: str, device: torch.device) -> "Precision":
        """`name` is resolved already (runtime.resolve_precision): fp32, bf16 or fp16."""
        scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        return cls(name, device.type, scaler)

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


@dataclass
class StepHooks:
    """What the loop calls out to; every field is optional."""

    should_stop: Callable[[], bool] = lambda: False          # this rank's preemption flag
    on_checkpoint_step: Optional[Callable[["EpochResult"], None]] = None  # sums so far
    checkpoint_every_steps: int = 0
    on_progress: Optional[Callable[[int, int, float, float], None]] = None  # step, total, loss, img/s
    progress_every: int = 20
    guard_every: int = 1
    max_skipped_steps: int = 20
    faults: FaultInjector = field(default_factory=FaultInjector)
    record_step_losses: bool = False
    time_first_step: bool = False  # one extra sync after step 1 (compile time estimate)


@dataclass
class EpochSums:
    """Training loss sum, correct predictions and sample count of one rank's steps so far in an
    epoch; a mid-epoch checkpoint carries them so the resumed epoch reports the whole epoch."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0


@dataclass
class StepParts:
    """What one optimizer step touches."""

    model: nn.Module                      # the callable the loop trains (DDP and/or compiled)
    optimizer: torch.optim.Optimizer
    scheduler: object                     # stepped once per optimizer step
    precision: Precision
    label_smoothing: float = 0.0


@dataclass
class EpochStart:
    """Where `train_epoch` begins: a fresh epoch, or the middle of one after a resume."""

    epoch: int
    step: int = 0                         # steps already done in this epoch
    global_step: int = 0                  # steps done since the run began (fault injection)
    sums: EpochSums = field(default_factory=EpochSums)


@dataclass
class EpochResult:
    epoch: int = 0
    sums: EpochSums = field(default_factory=EpochSums)  # this rank's, whole epoch so far
    steps: int = 0              # steps run in this call (excludes skipped, resumed-over steps)
    end_step: int = 0           # steps done in the epoch when the call returned
    wall_s: float = 0.0
    data_wait_s: float = 0.0
    stopped: bool = False       # ranks agreed to stop (preemption) at `end_step`
    first_step_s: Optional[float] = None
    step_losses: list = field(default_factory=list)


def train_epoch(parts: StepParts, loader, info: D.DistInfo, start: EpochStart,
                hooks: StepHooks) -> EpochResult:
    """Train from `start.step` to the epoch's end (or an agreed stop)."""
    model, optimizer, scheduler, precision = parts.model, parts.optimizer, parts.scheduler, parts.precision
    epoch, start_step, global_step = start.epoch, start.step, start.global_step
    model.train()
    dev = info.device
    loss_sum = torch.tensor(start.sums.loss_sum, dtype=torch.float64, device=dev)
    correct = torch.tensor(start.sums.correct, dtype=torch.int64, device=dev)
    losses: list[torch.Tensor] = []
    scaler = precision.scaler
    skipped_in_row, last_scale = 0, scaler.get_scale() if scaler else None
    result = EpochResult(epoch, EpochSums(count=start.sums.count), end_step=start_step)
    total = len(loader)
    watch = Stopwatch(dev)
    watch.start()
    batches = loader.batches(start_step)
    step = start_step
    while step < total:
        t_wait = time.perf_counter()
        x, y = next(batches)
        result.data_wait_s += time.perf_counter() - t_wait
        hooks.faults.before_step(info.rank, global_step)
        guarded = (step - start_step) % hooks.guard_every == 0

        with precision.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=parts.label_smoothing)
        loss = hooks.faults.corrupt_loss(info.rank, global_step, loss)

        if guarded:
            finite, stop = D.agree(info, torch.isfinite(loss.detach()), hooks.should_stop())
            if not finite:
                raise NonFiniteLoss(f"non-finite loss at epoch {epoch} step {step} on some rank; "
                                    f"stopped before the optimizer step (lower --lr, or try fp32)")
            # A stop request still finishes this step: its forward already moved BatchNorm
            # statistics and the RNG, so stopping here keeps the checkpoint a true step boundary.
            result.stopped = stop

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()

        n = y.shape[0]
        loss_sum += loss.detach().double() * n
        correct += (logits.detach().argmax(1) == y).sum()
        if hooks.record_step_losses:
            losses.append(loss.detach().float())
        result.sums.count += n
        result.steps += 1
        step += 1
        global_step += 1
        if hooks.time_first_step and result.steps == 1:
            result.first_step_s = watch.stop()

        if scaler is not None and (step - start_step) % hooks.guard_every == 0:
            scale = scaler.get_scale()  # host read, only at guard steps
            skipped_in_row = skipped_in_row + 1 if scale < last_scale else 0
            last_scale = scale
            if skipped_in_row >= hooks.max_skipped_steps:
                raise NonFiniteLoss(f"{skipped_in_row} fp16 overflow steps in a row at epoch {epoch} "
                                    f"step {step} (raise --max-skipped-steps or use bf16)")
        if hooks.on_progress and (step % hooks.progress_every == 0 or step == total):
            images = (step - start_step) * loader.batch_size * info.world_size
            hooks.on_progress(step, total, float(loss_sum.item()) / max(result.sums.count, 1),
                              images / max(watch.peek(), 1e-9))
        if result.stopped:
            break
        if hooks.on_checkpoint_step and hooks.checkpoint_every_steps and step < total \
                and step % hooks.checkpoint_every_steps == 0:
            result.end_step = step
            flush(result, loss_sum, correct, losses)
            hooks.on_checkpoint_step(result)

    result.end_step = step
    flush(result, loss_sum, correct, losses)
    result.wall_s = watch.stop()
    return result


def flush(result: EpochResult, loss_sum: torch.Tensor, correct: torch.Tensor, losses: list) -> None:
    """Copy device sums into the host-side result (one sync)."""
    result.sums.loss_sum = float(loss_sum.item())
    result.sums.correct = int(correct.item())
    if losses:
        result.step_losses = torch.stack(losses).tolist()


@dataclass
class EvalResult:
    loss: float
    accuracy: float  # percent
    count: int
    confusion: Optional[torch.Tensor] = None  # (classes, classes): rows true, columns predicted


@torch.no_grad()
def evaluate(module: nn.Module, shards, precision: Precision, info: D.DistInfo, *,
             num_classes: int = 10, confusion: bool = False) -> EvalResult:
    """Exact over ranks: sums and counts are all-reduced; each sample counted once."""
    module.eval()
    dev = info.device
    stats = torch.zeros(3, dtype=torch.float64, device=dev)  # loss sum, correct, count
    cm = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=dev) if confusion else None
    for x, y in shards.batches():
        with precision.autocast():
            logits = module(x)
        logits = logits.float()
        pred = logits.argmax(1)
        stats[0] += F.cross_entropy(logits, y, reduction="sum").double()
        stats[1] += (pred == y).sum()
        stats[2] += y.shape[0]
        if cm is not None:
            cm += torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes)
    D.all_reduce_sum(info, stats)
    if cm is not None:
        D.all_reduce_sum(info, cm)
    loss_sum, correct, count = stats.tolist()
    return EvalResult(loss_sum / max(count, 1), 100.0 * correct / max(count, 1), int(count),
                      cm.view(num_classes, num_classes).cpu() if cm is not None else None)


def global_mean(info: D.DistInfo, result: EpochResult) -> tuple[float, float, int]:
    """Train loss and accuracy (%) over every rank's samples of the epoch."""
    sums = result.sums
    t = torch.tensor([sums.loss_sum, sums.correct, sums.count], dtype=torch.float64, device=info.device)
    D.all_reduce_sum(info, t)
    loss_sum, correct, count = t.tolist()
    if count == 0:
        return math.nan, math.nan, 0
    return loss_sum / count, 100.0 * correct / count, int(count)
