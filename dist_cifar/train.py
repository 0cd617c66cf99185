"""Train a CIFAR-10 model on one process, or one process per GPU under torchrun.

    python -m dist_cifar.train --model small_cnn --dataset synthetic --epochs 2
    python -m dist_cifar.train --preset report --model small_cnn --dataset imagefolder \
        --data-dir ../shared/data/cifar10-jpeg.tar.gz
    torchrun --standalone --nproc_per_node=4 -m dist_cifar.train --preset fast --data-dir data
    torchrun --nnodes=2 --node_rank=$R --nproc_per_node=8 --rdzv-backend=c10d \
        --rdzv-endpoint=$HEAD:29500 --rdzv-id=$JOB -m dist_cifar.train --model vgg16_cifar

Exit codes: 0 done; 1 unexpected error (traceback, torchrun error file); 2 bad flag, data or
checkpoint (one line on stderr); 3 non-finite loss (last good checkpoint kept);
75 preempted (SIGUSR1/SIGTERM: checkpoint written, resume with the same command).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from . import checkpoint as ckpt
from . import distributed as D
from . import plot, rundir
from .components import build_optimizer, build_scheduler, wrap_model
from .config import ConfigError, TrainConfig, parse_config
from .data import DataError, Splits, load_source, make_splits, normalization
from .engine import EvalResult, NonFiniteLoss, Precision, StepHooks, evaluate, global_mean, train_epoch
from .faults import FaultInjector
from .loaders import EvalShards, build_train_loader
from .models import count_parameters
from .preemption import EXIT_PREEMPTED, PreemptionFlag
from .reporting import Reporter, SilentReporter
from .timing import peak_memory_mb, reset_peak_memory

EXIT_OK, EXIT_USAGE, EXIT_NONFINITE = 0, 2, 3


@dataclass
class RunState:
    """Progress that a checkpoint must carry besides weights and optimizer."""

    epoch: int = 0                    # epoch in progress (== epochs when finished)
    step: int = 0                     # steps done within `epoch`
    global_step: int = 0
    carry: tuple = (0.0, 0, 0)        # (loss sum, correct, count) of the steps done in `epoch`
    best_val_loss: float = math.inf
    best_epoch: int = -1
    time_to_best_s: float = 0.0
    train_time_s: float = 0.0         # summed over restarts
    wandb_id: str = ""
    history: list = field(default_factory=list)  # per-epoch records, for metrics.jsonl and W&B


@record
def main(argv: Optional[list[str]] = None) -> int:
    try:
        cfg = parse_config(argv)
    except ConfigError as exc:
        return fail(exc, EXIT_USAGE)
    flag = PreemptionFlag().install()
    try:
        with D.session(cfg.device, cfg.backend, cfg.dist_timeout) as info:
            return run(cfg, info, flag)
    except (ConfigError, DataError, ckpt.CheckpointError) as exc:
        return fail(exc, EXIT_USAGE)
    except NonFiniteLoss as exc:
        return fail(exc, EXIT_NONFINITE)
    finally:
        flag.uninstall()


def fail(exc: Exception, code: int) -> int:
    print(f"error: {exc}", file=sys.stderr, flush=True)
    return code


def run(cfg: TrainConfig, info: D.DistInfo, flag: PreemptionFlag) -> int:
    configure_backends(cfg, info)
    out_dir, resume_path = agreed_out_dir(cfg, info)
    splits = load_data(cfg, info)
    mean, std = normalization(cfg.normalize)
    loader = build_train_loader(cfg.loader, splits.train, info.device, cfg.batch_size, info.rank,
                                info.world_size, cfg.seed, cfg.augment, mean, std, cfg.channels_last,
                                cfg.steps_per_epoch, cfg.num_workers)
    if len(loader) == 0:
        raise ConfigError(f"--batch-size {cfg.batch_size} x {info.world_size} processes exceeds the "
                          f"{len(splits.train)} training images: lower --batch-size")
    val_shards = eval_shards(cfg, info, splits.val) if splits.val is not None else None
    model = wrap_model(cfg, info)
    optimizer = build_optimizer(cfg, model.module, info.device)
    scheduler = build_scheduler(cfg, optimizer, len(loader))
    precision = Precision.build(cfg.precision, info.device)
    state = RunState()
    reporter = Reporter(out_dir, cfg.quiet, cfg.wandb, wandb_kwargs(cfg, out_dir)) if info.is_main else SilentReporter()
    if resume_path is not None:
        resume(resume_path, cfg, info, model.module, optimizer, scheduler, precision, state, len(loader), reporter)
    run_config = describe(cfg, info, out_dir, splits, precision, model.module)
    reporter.start(cfg.to_dict(), run_config, state.wandb_id)
    state.wandb_id = reporter.wandb_id or state.wandb_id
    if resume_path is not None:
        reporter.restore_history(state.history)
    reporter.note(f"{cfg.model}: {run_config['num_params']:,} parameters | world size {info.world_size} x "
                  f"batch {cfg.batch_size} per process = global batch {run_config['global_batch_size']} | "
                  f"{precision.name} on {run_config['device_name']} | {len(loader)} steps/epoch | out {out_dir}")
    step_log = rundir.StepLossLog(out_dir, cfg.record_step_losses and info.is_main)
    step_log.truncate_to(state.epoch, state.step)

    def save(epoch: int, step: int, carry=(0.0, 0, 0), global_step: Optional[int] = None) -> None:
        state.epoch, state.step, state.carry = epoch, step, carry
        if global_step is not None:
            state.global_step = global_step
        blob = checkpoint_state(cfg, info, model.module, optimizer, scheduler, precision, state)
        if info.is_main:
            ckpt.save(out_dir, blob, epoch, step, cfg.keep_last)
        D.barrier(info)  # nobody runs ahead of a checkpoint it might need after a crash

    def save_mid_epoch(result) -> None:
        step_log.write(epoch, start_step, result.step_losses)
        save(epoch, result.end_step, (result.loss_sum, result.correct, result.count),
             epoch_start_global + result.end_step - start_step)

    hooks = StepHooks(should_stop=flag, on_checkpoint_step=save_mid_epoch,
                      checkpoint_every_steps=cfg.checkpoint_every_steps,
                      on_progress=reporter.progress if reporter.shows_progress else None,
                      progress_every=cfg.progress_every, guard_every=cfg.guard_every,
                      max_skipped_steps=cfg.max_skipped_steps, faults=FaultInjector(on_preempt=flag.raise_flag),
                      record_step_losses=cfg.record_step_losses, time_first_step=cfg.compile)
    compiled_yet = False
    for epoch in range(state.epoch, cfg.epochs):
        start_step = state.step if epoch == state.epoch else 0
        epoch_start_global = state.global_step
        loader.set_epoch(epoch)
        reset_peak_memory(info.device)
        reporter.epoch_start(epoch, len(loader), start_step)
        result = train_epoch(model.train_model, loader, optimizer, scheduler, precision, info, epoch,
                             start_step, state.global_step, cfg.label_smoothing, hooks,
                             state.carry if epoch == state.epoch else (0.0, 0, 0))
        state.global_step = epoch_start_global + result.steps
        state.train_time_s += result.wall_s
        step_log.write(epoch, start_step, result.step_losses)
        if result.stopped:
            save(epoch, result.end_step, (result.loss_sum, result.correct, result.count))
            print(f"[dist_cifar] rank {info.rank}: preempted ({flag.signal_name or 'signal on another rank'}), "
                  f"stopped at epoch {epoch} step {result.end_step}; checkpoint written; exit {EXIT_PREEMPTED}",
                  file=sys.stderr, flush=True)
            reporter.close()
            return EXIT_PREEMPTED
        t_eval = time.perf_counter()
        val = evaluate(model.eval_model, val_shards, precision, info) if val_shards else None
        record = epoch_record(epoch, result, val, time.perf_counter() - t_eval, info, optimizer, model,
                              loader.batch_size,
                              compile_s=result.first_step_s if cfg.compile and not compiled_yet else None)
        compiled_yet = True
        state.history.append(record)
        track_best(state, record, out_dir, cfg, info, model.module)
        if cfg.checkpoint_every and ((epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs):
            save(epoch + 1, 0)
        else:
            state.epoch, state.step, state.carry = epoch + 1, 0, (0.0, 0, 0)
        reporter.epoch(record)

    finish(cfg, info, out_dir, splits, model, precision, state, reporter, run_config)
    reporter.close()
    D.barrier(info)  # no rank tears the process group down while rank 0 still writes
    return EXIT_OK


# ------------------------------------------------------------------------------ setup


def configure_backends(cfg: TrainConfig, info: D.DistInfo) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.backends.cudnn.deterministic = cfg.deterministic
    torch.backends.cudnn.benchmark = info.device.type == "cuda" and not cfg.deterministic
    if cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def agreed_out_dir(cfg: TrainConfig, info: D.DistInfo) -> tuple[Path, Optional[Path]]:
    """Rank 0 decides (the default name holds a timestamp), everyone gets its answer."""
    decision: tuple[str, str, str] = ("", "", "")
    if info.is_main:
        try:
            out, resume = rundir.prepare(cfg)
            out.mkdir(parents=True, exist_ok=True)
            decision = (str(out), str(resume) if resume else "", "")
        except ConfigError as exc:
            decision = ("", "", str(exc))
    out, resume, error = D.broadcast_object(info, decision)
    if error:
        raise ConfigError(error)
    return Path(out), Path(resume) if resume else None


def load_data(cfg: TrainConfig, info: D.DistInfo) -> Splits:
    """The first process of each node decodes and caches; the others then read the cache."""
    def load():
        raw = load_source(cfg.dataset, cfg.data_dir, cfg.download, cfg.synthetic_size)
        return make_splits(raw, cfg.split, cfg.val_size, cfg.max_train)
    splits = load() if info.is_local_main else None
    D.barrier(info)
    return splits if splits is not None else load()


def eval_shards(cfg: TrainConfig, info: D.DistInfo, split) -> EvalShards:
    """This rank's exact slice of an evaluation split, normalised like training."""
    mean, std = normalization(cfg.normalize)
    return EvalShards(split, info.device, cfg.eval_batch_size, info.rank, info.world_size, mean, std,
                      cfg.channels_last)


def wandb_kwargs(cfg: TrainConfig, out_dir: Path) -> dict[str, Any]:
    return dict(project=cfg.wandb_project, entity=cfg.wandb_entity, group=cfg.wandb_group,
                name=cfg.wandb_name or out_dir.name, tags=cfg.wandb_tags, job_type=cfg.job_type)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def describe(cfg, info, out_dir, splits, precision, module) -> dict[str, Any]:
    """The config plus what only the running job knows: W&B's and config.json's content."""
    device_name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu"
    return dict(cfg.to_dict(), world_size=info.world_size, global_batch_size=cfg.batch_size * info.world_size,
                device_name=device_name, torch_version=torch.__version__, git_commit=git_commit(),
                num_params=count_parameters(module), out_dir=str(out_dir), precision_resolved=precision.name,
                backend_resolved=info.backend or "none", data_source=splits.source,
                split_sizes=dict(train=len(splits.train), val=len(splits.val) if splits.val else 0,
                                 test=len(splits.test)))


# ------------------------------------------------------------------------------ per epoch


def epoch_record(epoch, result, val: Optional[EvalResult], eval_s, info, optimizer, model, batch_size,
                 compile_s) -> dict:
    train_loss, train_acc, _ = global_mean(info, result)
    compute = result.wall_s - result.data_wait_s
    rank_times = D.all_gather_floats(info, compute)
    images = result.steps * batch_size * info.world_size
    return {
        "epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
        "val_loss": val.loss if val else None, "val_accuracy": val.accuracy if val else None,
        "lr": optimizer.param_groups[0]["lr"], "epoch_time_s": result.wall_s,
        "images_per_s": images / max(result.wall_s, 1e-9), "data_wait_s": result.data_wait_s,
        "compute_s": compute, "comm_s": model.comm.take() if model.comm else None,
        "rank_time_min_s": min(rank_times), "rank_time_max_s": max(rank_times),
        "peak_memory_mb": peak_memory_mb(info.device), "compile_s": compile_s, "eval_time_s": eval_s,
        "steps": result.steps, "world_size": info.world_size,
    }


def track_best(state: RunState, record: dict, out_dir: Path, cfg: TrainConfig, info, module) -> None:
    """Keep the weights with the lowest validation loss, as the report does (last epoch when
    there is no validation split)."""
    val_loss = record["val_loss"] if record["val_loss"] is not None else -float(record["epoch"])
    if val_loss < state.best_val_loss:
        state.best_val_loss, state.best_epoch = val_loss, record["epoch"]
        state.time_to_best_s = state.train_time_s
        if info.is_main and cfg.save_best:
            blob = {"format": ckpt.FORMAT, "model_name": cfg.model, "epoch": record["epoch"],
                    "val_loss": record["val_loss"], "state_dict": module.state_dict(), "config": cfg.to_dict()}
            tmp = out_dir / ".tmp-best.pt"
            torch.save(blob, tmp)
            os.replace(tmp, out_dir / "best.pt")


# ------------------------------------------------------------------------------ checkpoints


def checkpoint_state(cfg, info, module, optimizer, scheduler, precision, state: RunState) -> dict:
    mine = ckpt.capture_rng()
    rngs = [mine]
    if info.distributed:
        rngs = [None] * info.world_size
        torch.distributed.all_gather_object(rngs, mine)
    return {"format": ckpt.FORMAT, "model": module.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": precision.scaler.state_dict() if precision.scaler else {},
            "run": asdict(state), "rng": rngs, "config": cfg.to_dict(), "world_size": info.world_size,
            "global_batch_size": cfg.batch_size * info.world_size}


def resume(path, cfg, info, module, optimizer, scheduler, precision, state: RunState, steps_per_epoch, reporter):
    blob = ckpt.load(path)
    ckpt.check_compatible(blob, cfg.to_dict(), path)
    module.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    if precision.scaler and blob["scaler"]:
        precision.scaler.load_state_dict(blob["scaler"])
    saved = blob["run"]
    for key, value in saved.items():
        setattr(state, key, tuple(value) if key == "carry" else value)
    old_world, old_global = blob["world_size"], blob["global_batch_size"]
    if old_world == info.world_size and old_global == cfg.batch_size * info.world_size:
        scheduler.load_state_dict(blob["scheduler"])
        ckpt.restore_rng(blob["rng"][info.rank])
    else:
        # Different sharding: continue the epoch after the same number of samples, rebuild the
        # schedule for the new step count. Exact replay is impossible; say so.
        samples_done = state.step * old_global
        state.step = min(samples_done // (cfg.batch_size * info.world_size), steps_per_epoch)
        state.carry = (0.0, 0, 0)
        state.global_step = state.epoch * steps_per_epoch + state.step
        for _ in range(state.global_step):
            scheduler.step()
        torch.manual_seed(cfg.seed + 1000 * state.epoch + info.rank)
        reporter.note(f"world size changed {old_world} -> {info.world_size} (global batch {old_global} -> "
                      f"{cfg.batch_size * info.world_size}): data re-sharded, resuming epoch {state.epoch} "
                      f"at step {state.step}")
    reporter.note(f"resumed from {path} at epoch {state.epoch} step {state.step}")


# ------------------------------------------------------------------------------ end of run


def finish(cfg, info, out_dir, splits, model, precision, state: RunState, reporter, run_config) -> None:
    """The report's compute_accuracy on the best weights, the confusion matrix, plots, summary."""
    best = out_dir / "best.pt"
    if info.is_main and cfg.save_best and best.exists():
        model.module.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["state_dict"])
    D.broadcast_module(info, model.module)
    train_eval = evaluate(model.eval_model, eval_shards(cfg, info, splits.train), precision, info)
    val_eval = evaluate(model.eval_model, eval_shards(cfg, info, splits.val), precision, info) if splits.val else None
    test_eval = evaluate(model.eval_model, eval_shards(cfg, info, splits.test), precision, info,
                         len(splits.classes), confusion=True)
    if not info.is_main:
        return
    cm = test_eval.confusion
    per_class = [(name, 100.0 * float(cm[i, i]) / max(float(cm[i].sum()), 1.0)) for i, name in enumerate(splits.classes)]
    images = {"loss_curves": plot.loss_curves(state.history, out_dir / "loss_curves.png", f"{cfg.model} loss"),
              "confusion_matrix": plot.confusion_matrix(cm.tolist(), splits.classes, out_dir / "confusion_matrix.png",
                                                        f"{cfg.model} test confusion matrix")}
    last = state.history[-1] if state.history else {}
    summary = {
        "model": cfg.model, "out_dir": str(out_dir), "num_params": run_config["num_params"],
        "train_accuracy": train_eval.accuracy, "val_accuracy": val_eval.accuracy if val_eval else None,
        "test_accuracy": test_eval.accuracy, "train_loss": train_eval.loss,
        "val_loss": val_eval.loss if val_eval else None, "test_loss": test_eval.loss,
        "best_epoch": state.best_epoch, "best_val_loss": state.best_val_loss if val_eval else None,
        "epochs_run": len(state.history), "total_time_s": state.train_time_s,
        "time_to_best_s": state.time_to_best_s,
        "final_train_loss": last.get("train_loss"), "final_val_loss": last.get("val_loss"),
        "mean_epoch_time_s": sum(r["epoch_time_s"] for r in state.history) / max(len(state.history), 1),
        "world_size": info.world_size, "global_batch_size": run_config["global_batch_size"],
        "per_class_test_accuracy": dict(per_class), "confusion_matrix": cm.tolist(),
        "data_source": splits.source, "split_sizes": run_config["split_sizes"],
    }
    reporter.finish(summary, images, per_class)


if __name__ == "__main__":
    sys.exit(main())
