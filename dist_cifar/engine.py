"""One training epoch and one evaluation pass, for one process or one rank of many.

The step loop keeps its sums on the device and reads them back only every `progress_every`
steps and at the epoch's end. Every step's loss is checked for non-finite values on the device
(no host sync); ranks agree on stopping (non-finite loss, preemption) through one small
all-reduce every `guard_every` steps, before a mid-epoch checkpoint and at the epoch's end, at
the same step on every rank. With `guard_every` > 1 a bad step can be applied before the check
sees it; the error says which steps, and no checkpoint is committed after them.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from .faults import FaultInjector
from .timing import Stopwatch


class NonFiniteLoss(RuntimeError):
    """Some rank saw a non-finite loss (or too many fp16 overflow skips); every rank stops."""


class AgreedGradScaler(torch.amp.GradScaler):
    """A GradScaler whose skip decision is the same on every rank: after unscaling, each found_inf
    is all-reduced with MAX, so an overflow in any rank's gradients skips the step everywhere.

    Needed where ranks hold different gradients: the hybrid's sharded head, whose slices are not
    all-reduced (under DDP every gradient is, and FSDP2's DTensors reduce found_inf themselves).
    A rank deciding alone would skip a step the others take, and the replicas would drift apart.
    The same idea as FSDP1's ShardedGradScaler, on the public GradScaler."""

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        for found_inf in self._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
            torch.distributed.all_reduce(found_inf, op=torch.distributed.ReduceOp.MAX)


@dataclass
class Precision:
    """Autocast dtype plus, for fp16, a GradScaler."""

    name: str
    device_type: str
    scaler: Optional[torch.amp.GradScaler] = None

    @classmethod
    def build(cls, name: str, device: torch.device, *, agree_overflows: bool = False) -> "Precision":
        """`name` is resolved already (runtime.resolve_precision): fp32, bf16 or fp16.
        `agree_overflows`: ranks hold gradients the others do not (AgreedGradScaler)."""
        scaler = None
        if name == "fp16":
            scaler = (AgreedGradScaler if agree_overflows else torch.amp.GradScaler)(device.type)
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
    # called once per epoch with the seconds per step over steps 2..FORECAST_STEPS (two extra syncs)
    # and the CPU seconds this process used per step meanwhile (all its threads)
    on_forecast: Optional[Callable[[float, float], None]] = None
    profiler: Optional[Any] = None  # --profile-steps: profiling.StepProfiler
    # --log-every-steps: called every `log_every_steps` optimizer steps (counted over the run) with
    # the figures of the steps since the previous call (StepWindow.row); one host read each
    on_step_metrics: Optional[Callable[[dict], None]] = None
    log_every_steps: int = 0


FORECAST_STEPS = 3  # step 1 warms up (allocations, compilation); steps 2-3 are the first steady ones


@dataclass
class EpochSums:
    """Training loss sum, correct predictions and sample count of steps so far in an epoch. In the
    step loop they are one rank's; a mid-epoch checkpoint carries every rank's together
    (`global_sums`), restored on rank 0 only, so the resumed epoch reports each sample once."""

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
    # False under DDP with gradient_as_bucket_view: freed gradients would make DDP re-point them
    # into its buckets with a copy every step; zeroing them in place keeps the aliasing.
    grads_to_none: bool = True
    # --clip-grad-norm: scales the gradients to the global norm bound, returns the pre-clip norm
    clip: Optional[Callable[[], torch.Tensor]] = None
    # the layout's switch for a micro-batch's backward: gradient_sync(False) accumulates locally
    gradient_sync: Callable[[bool], Any] = lambda enabled: contextlib.nullcontext()
    # after the step's last backward: waits for the layout's own gradient collectives (2-D hybrid)
    finish_gradients: Callable[[], None] = lambda: None
    ema: Optional[Any] = None  # --ema: updated after every optimizer step


class StepWindow:
    """Per-step figures over the steps since the previous row, from the sums the loop keeps on the
    device anyway: one host read per row (which also waits for the queued work, so the time is
    true), none on the steps between."""

    def __init__(self, sums: EpochSums, world_size: int):
        self.world_size = world_size
        self.loss_sum, self.count, self.norm_sum, self.steps = sums.loss_sum, sums.count, 0.0, 0
        self.t = time.perf_counter()

    def row(self, *, loss_sum: torch.Tensor, norms: Optional[torch.Tensor], count: int, steps: int,
            lr: float, epoch: int, step: int, global_step: int) -> dict:
        values = torch.stack([loss_sum, norms[0] if norms is not None else torch.zeros_like(loss_sum)]).tolist()
        now = time.perf_counter()
        samples, window_steps = count - self.count, steps - self.steps
        row = {"global_step": global_step, "epoch": epoch, "step": step,
               "step_loss": (values[0] - self.loss_sum) / max(samples, 1), "step_lr": float(lr),
               "step_images_per_s": samples * self.world_size / max(now - self.t, 1e-9),
               "step_grad_norm": (values[1] - self.norm_sum) / window_steps if norms is not None and window_steps
               else None}
        self.loss_sum, self.count, self.norm_sum, self.steps, self.t = values[0], count, values[1], steps, now
        return row


class StepHealth:
    """Device-side watch over every step, read on the host only at agreement points: the first
    step of the epoch with a non-finite loss, and (fp16) runs of GradScaler-skipped steps."""

    NONE = float(2**31)  # "no bad step" (all-reduced with MIN, so it must compare above any step)

    def __init__(self, device: torch.device, scaler, max_skipped: int):
        self.first_bad = torch.full((), self.NONE, device=device)
        self.scaler, self.max_skipped = scaler, max_skipped
        if scaler is not None:
            self.run = torch.zeros((), dtype=torch.int64, device=device)
            self.worst = torch.zeros((), dtype=torch.int64, device=device)
            self.skipped = torch.zeros((), dtype=torch.int64, device=device)       # this epoch
            self.first_skipped = torch.full((), self.NONE, device=device)

    def observe_loss(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where(bad & (self.first_bad == self.NONE),
                                     torch.full_like(self.first_bad, step), self.first_bad)

    def scale_before_update(self) -> Optional[torch.Tensor]:
        return self.scaler._scale.clone() if self.scaler is not None else None  # device copy, no sync

    def observe_update(self, scale_before: Optional[torch.Tensor], step: int) -> None:
        if scale_before is None:
            return
        skipped = self.scaler._scale < scale_before  # update() lowers the scale only on a skipped step
        self.run = torch.where(skipped, self.run + 1, torch.zeros_like(self.run))
        self.worst = torch.maximum(self.worst, self.run)
        self.skipped += skipped.to(torch.int64)
        self.first_skipped = torch.where(skipped & (self.first_skipped == self.NONE),
                                         torch.full_like(self.first_skipped, step), self.first_skipped)

    def skipped_steps(self) -> tuple[Optional[int], Optional[int]]:
        """(GradScaler-skipped steps this epoch, the first of them); (None, None) without a scaler."""
        if self.scaler is None:
            return None, None
        first = float(self.first_skipped.item())
        return int(self.skipped.item()), (int(first) if first < self.NONE else None)

    def check_overflows(self, epoch: int, step: int) -> None:
        """Host read of the longest run of skipped steps since the last check (guard steps only)."""
        if self.scaler is None:
            return
        worst = int(self.worst.item())
        self.worst = self.run.clone()
        if worst >= self.max_skipped:
            raise NonFiniteLoss(f"{worst} fp16 overflow (GradScaler-skipped) steps in a row by epoch {epoch} "
                                f"step {step} (raise --max-skipped-steps or use bf16)")

    @staticmethod
    def error(epoch: int, first_bad: int, checked_at: Optional[int], guard_every: int, *,
              before_save_at: Optional[int] = None, ranks: Optional[list[int]] = None) -> NonFiniteLoss:
        """`checked_at`: the guarded step whose check saw it (before its optimizer step); None: the
        check before a mid-epoch checkpoint (after step `before_save_at` - 1) or at the epoch's end."""
        kept = "the newest committed checkpoint, if there is one, is kept"
        where_rank = (f"on rank {ranks[0]}" if len(ranks) == 1 else f"on ranks {', '.join(map(str, ranks))}") \
            if ranks else "on some rank"
        if checked_at is not None and first_bad == checked_at:
            return NonFiniteLoss(f"non-finite loss at epoch {epoch} step {first_bad} {where_rank}; stopped before "
                                 f"its optimizer step (lower --lr, or try fp32); {kept}")
        if checked_at is not None:
            last, where = checked_at - 1, f"the check at step {checked_at}"
        elif before_save_at is not None:
            last, where = before_save_at - 1, f"the check before the checkpoint at step {before_save_at}"
        else:
            last, where = "the epoch end", "the end-of-epoch check"
        return NonFiniteLoss(
            f"non-finite loss first at epoch {epoch} step {first_bad} {where_rank}; the optimizer applied steps "
            f"{first_bad}..{last} before {where} (--guard-every {guard_every}), so the weights may be non-finite; "
            f"no checkpoint was written after them and {kept} (lower --lr, or try fp32)")


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
    skipped_steps: Optional[int] = None       # fp16: steps this rank's GradScaler skipped in this call
    first_skipped_step: Optional[int] = None
    grad_norm_mean: Optional[float] = None    # --clip-grad-norm: pre-clip global norm over this call's steps
    grad_norm_max: Optional[float] = None


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
    health = StepHealth(dev, scaler, hooks.max_skipped_steps)
    result = EpochResult(epoch, EpochSums(count=start.sums.count), end_step=start_step)
    total = len(loader)
    watch = Stopwatch(dev)
    watch.start()
    batches = loader.batches(start_step)
    step = start_step

    def agree(checked_at: Optional[int], before_save_at: Optional[int] = None) -> bool:
        """One all-reduce: raise if any rank saw a non-finite loss; return whether any wants to stop."""
        first_bad, stop = D.agree(info, health.first_bad, hooks.should_stop())
        if first_bad is not None:
            # the error path only: one more gather says which ranks saw it (each rank's own first bad step)
            seen = D.all_gather_objects(info, int(health.first_bad.item()))
            ranks = [rank for rank, step in enumerate(seen) if step == first_bad]
            raise StepHealth.error(epoch, first_bad, checked_at, hooks.guard_every, before_save_at=before_save_at,
                                   ranks=ranks)
        return stop

    after_first_step, cpu_after_first_step = 0.0, 0.0
    norms = torch.zeros(2, dtype=torch.float64, device=dev) if parts.clip is not None else None  # sum, max
    window = StepWindow(start.sums, info.world_size) if hooks.on_step_metrics else None
    while step < total:
        if hooks.profiler is not None:
            hooks.profiler.before_step(global_step)
        t_wait = time.perf_counter()
        micro_batches = next(batches)  # one optimizer step's (--grad-accum-steps) micro-batches
        waited = time.perf_counter() - t_wait
        result.data_wait_s += waited
        hooks.faults.before_step(info.rank, global_step)

        optimizer.zero_grad(set_to_none=parts.grads_to_none)
        step_loss = torch.zeros((), dtype=torch.float32, device=dev) if hooks.record_step_losses else None
        for k, (x, y) in enumerate(micro_batches):
            last = k == len(micro_batches) - 1
            # DDP / FSDP2 reduce the gradients once, in the last micro-batch's backward
            with parts.gradient_sync(last) if len(micro_batches) > 1 else contextlib.nullcontext():
                with precision.autocast():
                    logits = model(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=parts.label_smoothing)
                loss = hooks.faults.corrupt_loss(info.rank, global_step, loss)
                health.observe_loss(loss, step)
                if last and (step - start_step) % hooks.guard_every == 0:
                    # A stop request still finishes this step: its forwards already moved BatchNorm
                    # statistics and the RNG, so stopping here keeps the checkpoint a true step boundary.
                    result.stopped = agree(checked_at=step)
                    health.check_overflows(epoch, step)
                # the mean of K micro-batch means: the gradient of the step's whole batch
                scaled = loss / len(micro_batches)
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            n = y.shape[0]
            loss_sum += loss.detach().double() * n
            correct += (logits.detach().argmax(1) == y).sum()
            if step_loss is not None:
                step_loss += loss.detach().float() / len(micro_batches)
            result.sums.count += n
        parts.finish_gradients()
        hooks.faults.after_backward(info.rank, global_step)
        if scaler is not None:
            scaler.unscale_(optimizer)  # explicit, so an AgreedGradScaler agrees for fused optimizers too
            clip_gradients(parts, norms)
            scaler.step(optimizer)
            scale_before = health.scale_before_update()
            scaler.update()
            health.observe_update(scale_before, step)
        else:
            clip_gradients(parts, norms)
            optimizer.step()
        scheduler.step()
        if parts.ema is not None:
            parts.ema.update()
        hooks.faults.after_step(info.rank, global_step)
        if hooks.profiler is not None:
            hooks.profiler.after_step(global_step, waited)

        if hooks.record_step_losses:
            losses.append(step_loss)
        result.steps += 1
        step += 1
        global_step += 1
        if result.steps == 1 and (hooks.time_first_step or hooks.on_forecast):  # one sync serves both
            after_first_step, cpu_after_first_step = watch.stop(), time.process_time()
            if hooks.time_first_step:
                result.first_step_s = after_first_step
        elif result.steps == FORECAST_STEPS and hooks.on_forecast:
            hooks.on_forecast((watch.stop() - after_first_step) / (FORECAST_STEPS - 1),
                              (time.process_time() - cpu_after_first_step) / (FORECAST_STEPS - 1))

        if window is not None and global_step % hooks.log_every_steps == 0:
            hooks.on_step_metrics(window.row(loss_sum=loss_sum, norms=norms, count=result.sums.count, steps=result.steps,
                                             lr=optimizer.param_groups[0]["lr"], epoch=epoch, step=step,
                                             global_step=global_step))
        if hooks.on_progress and (step % hooks.progress_every == 0 or step == total):
            images = (step - start_step) * loader.batch_size * info.world_size
            hooks.on_progress(step, total, float(loss_sum.item()) / max(result.sums.count, 1),
                              images / max(watch.peek(), 1e-9))
        if result.stopped:
            break
        if hooks.on_checkpoint_step and hooks.checkpoint_every_steps and step < total \
                and step % hooks.checkpoint_every_steps == 0:
            agree(checked_at=None, before_save_at=step)  # never checkpoint weights a bad step may have reached
            result.end_step = step
            flush(result, loss_sum, correct, losses)
            hooks.on_checkpoint_step(result)

    agree(checked_at=None)  # the steps since the last guard, before any end-of-epoch checkpoint
    health.check_overflows(epoch, step)
    result.end_step = step
    flush(result, loss_sum, correct, losses)
    result.skipped_steps, result.first_skipped_step = health.skipped_steps()
    if norms is not None and result.steps:
        total_norm, max_norm = norms.tolist()
        result.grad_norm_mean, result.grad_norm_max = total_norm / result.steps, max_norm
    result.wall_s = watch.stop()
    return result


def clip_gradients(parts: StepParts, norms: Optional[torch.Tensor]) -> None:
    """--clip-grad-norm between the (unscaled) backward and the optimizer step; the pre-clip norm
    joins the epoch's sum and max on the device (read once, at the epoch's end)."""
    if parts.clip is None:
        return
    norm = parts.clip().detach().double()
    norms[0] += norm
    norms[1] = torch.maximum(norms[1], norm)


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

    def per_class_accuracy(self, classes) -> list[tuple[str, float]]:
        """(class, accuracy %) from the confusion matrix: its diagonal over each true class's row."""
        cm = self.confusion
        return [(name, 100.0 * float(cm[i, i]) / max(float(cm[i].sum()), 1.0)) for i, name in enumerate(classes)]


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
        logits = logits[: y.shape[0]].float()  # padded rows of the last batch dropped
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


def global_sums(info: D.DistInfo, sums: EpochSums) -> EpochSums:
    """Every rank's sums added up (float64: exact for the counts, and the same on every rank)."""
    t = torch.tensor([sums.loss_sum, sums.correct, sums.count], dtype=torch.float64, device=info.device)
    D.all_reduce_sum(info, t)
    loss_sum, correct, count = t.tolist()
    return EpochSums(loss_sum, int(correct), int(count))


def global_mean(info: D.DistInfo, result: EpochResult) -> tuple[float, float, int]:
    """Train loss and accuracy (%) over every rank's samples of the epoch."""
    total = global_sums(info, result.sums)
    loss_sum, correct, count = total.loss_sum, total.correct, total.count
    if count == 0:
        return math.nan, math.nan, 0
    return loss_sum / count, 100.0 * correct / count, int(count)
