"""Train a CIFAR-10 model on one process, or one process per GPU under torchrun.

    python -m dist_cifar.train --model small_cnn --dataset synthetic --epochs 2
    python -m dist_cifar.train --preset report --model small_cnn --dataset imagefolder \
        --data-dir data/cifar10-jpeg.tar.gz
    torchrun --standalone --nproc_per_node=4 -m dist_cifar.train --preset fast --data-dir data
    torchrun --nnodes=2 --node_rank=$R --nproc_per_node=8 --rdzv-backend=c10d \
        --rdzv-endpoint=$HEAD:29500 --rdzv-id=$JOB -m dist_cifar.train --model vgg16_cifar

Reads as: parse and resolve flags -> build the run (assembly.py) -> resume -> epoch loop ->
finish (the report's compute_accuracy on the best weights, plots, summary).

Exit codes: 0 done; 1 unexpected error (traceback, torchrun error file); 2 bad flag, data or
checkpoint (one line on stderr); 3 non-finite loss (last good checkpoint kept); 4 replicas
diverged across ranks (one line naming the parameter; last good checkpoint kept);
75 preempted (SIGUSR1/SIGTERM/SIGINT: checkpoint written, resume with the same command);
130 a second Ctrl-C (stopped at once; the newest committed checkpoint is kept).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from . import checkpoint as ckpt
from . import distributed as D
from . import __version__, autoplan, budget, cost, files, plot, rundir
from .assembly import TrainingRun, assemble
from .checkpoint import CheckpointManager, RunState
from .config import ConfigError, TrainConfig, flag_name, parse_command, parse_window, to_toml
from .data import DataError, Splits, load_source, make_splits
from .engine import EpochSums, EvalResult, NonFiniteLoss, StepHooks, evaluate, global_mean, global_sums, train_epoch
from .faults import FaultInjector
from .models import build_model, count_parameters
from .parallel import ConsolidatedModel, ConsolidatedOptimizer, ReplicaDrift, check_replicas
from .preemption import EXIT_PREEMPTED, PreemptionFlag, StopNow
from .profiling import StepProfiler
from .reporting import Reporter, SilentReporter
from .runtime import resolve
from .shards import ShardedState
from .timing import peak_memory_mb, reset_peak_memory

EXIT_OK, EXIT_USAGE, EXIT_NONFINITE, EXIT_DRIFT, EXIT_INTERRUPTED = 0, 2, 3, 4, 130


@record
def main(argv: Optional[list[str]] = None) -> int:
    try:
        cfg, print_format = parse_command(argv)
        cfg, notes = resolve(cfg)
    except ConfigError as exc:
        return fail(exc, EXIT_USAGE)
    if print_format:  # what this host would run: every auto value resolved (--config reads it back)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print(to_toml(cfg) if print_format == "toml" else json.dumps(cfg.to_dict(), indent=2), end="" if
              print_format == "toml" else "\n")
        return EXIT_OK
    return tell_launcher(run_resolved(cfg, notes).code)


def tell_launcher(code: int) -> int:
    """Under dist_cifar.launcher, this worker's exit code in its private folder: torchrun's agent
    can fail for its own reasons (the node holding its store gone) after the workers checkpointed."""
    folder = os.environ.get("DIST_CIFAR_EXIT_DIR")
    if folder and Path(folder).is_dir():
        try:
            files.atomic_write_text(Path(folder) / f"rank-{os.environ.get('LOCAL_RANK', '0')}", str(code))
        except OSError:
            pass
    return code


@dataclass
class Outcome:
    """What a run ended with: its exit code, and its out dir once one was chosen."""
    code: int = EXIT_OK
    out_dir: Optional[Path] = None


def run_resolved(cfg: TrainConfig, notes: tuple[str, ...] = ()) -> Outcome:
    """Train a resolved config (runtime.resolve); every failure with an exit code is returned as
    that code with its one line on stderr, never raised (dist_cifar.run builds on this)."""
    outcome = Outcome()
    outcome.code = guarded(cfg, notes, outcome)
    return outcome


def guarded(cfg: TrainConfig, notes: tuple[str, ...], outcome: Outcome) -> int:
    flag = PreemptionFlag().install()
    try:
        with D.session(cfg.device, cfg.backend, cfg.dist_timeout) as info:
            return train(cfg, notes, info, flag, outcome)
    except (ConfigError, DataError, ckpt.CheckpointError) as exc:
        return fail(exc, EXIT_USAGE)
    except NonFiniteLoss as exc:
        return fail(exc, EXIT_NONFINITE)
    except ReplicaDrift as exc:
        return fail(exc, EXIT_DRIFT)
    except StopNow:  # Ctrl-C twice: out now; the writes in flight were waited for on the way
        return fail("interrupted twice: stopped at once without a new checkpoint; the newest committed one is "
                    "kept, rerun the same command to resume", EXIT_INTERRUPTED)
    except OSError as exc:  # a full disk or an unwritable file at the epoch's end: one line, not a traceback
        if exc.filename is None:
            raise
        return fail(f"writing {exc.filename} failed ({exc.strerror}): {os_error_fix(exc)}; the newest committed "
                    f"checkpoint is kept, rerun to resume", EXIT_USAGE)
    finally:
        flag.uninstall()
        rundir.release_locks()


def os_error_fix(exc: OSError) -> str:
    """The fix an OSError calls for: space only when space is what ran out."""
    import errno
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space"
    if exc.errno == errno.ENAMETOOLONG:
        return "choose a shorter --out-dir (or XDG_CACHE_HOME / DIST_CIFAR_CACHE_DIR path)"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return "a file is in the way of a folder (check --out-dir and XDG_CACHE_HOME)"
    return "fix the folder's permissions (or choose another --out-dir / XDG_CACHE_HOME)"


def fail(exc: object, code: int) -> int:
    print(f"error: {exc}", file=sys.stderr, flush=True)
    return code


def train(cfg: TrainConfig, notes: tuple[str, ...], info: D.DistInfo, flag: PreemptionFlag, outcome: Outcome) -> int:
    same_config_everywhere(cfg, info)
    configure_backends(cfg, info)
    out_dir, resume_path = prepare_out_dir(cfg, info)
    outcome.out_dir = out_dir
    if info.backend == "nccl":
        D.flight_recorder_dumps_to(out_dir / "nccl_flight_recorder")
    needs = agreed(info, lambda: budget.check(cfg, out_dir=out_dir, local_world_size=info.local_world_size,
                                              world_size=info.world_size, on_cuda=info.device.type == "cuda"))
    splits = load_data(cfg, info)
    run = agreed(info, lambda: assemble(cfg, info, splits))
    reporter = make_reporter(cfg, notes, info, out_dir)
    faults = FaultInjector(on_preempt=flag.raise_flag)
    aim_faults(faults, run)
    state = RunState()
    with CheckpointManager(out_dir, info, config=cfg.to_dict(), parts=stateful_parts(run), keep_last=cfg.keep_last,
                           global_batch_size=run.global_batch_size, faults=faults,
                           sharded=sharded_state(run)) as checkpoints:
        if resume_path is not None:
            notes = agreed(info, lambda: checkpoints.restore(resume_path, state, steps_per_epoch=run.steps_per_epoch,
                                                             seed=cfg.seed))
            for note in notes:
                reporter.note(note)
            if resume_path.parent.resolve() != out_dir.resolve() and state.wandb_id:
                reporter.note(f"a fork of {resume_path.parent} into {out_dir}: a new W&B run, not {state.wandb_id}")
                state.wandb_id = ""  # two folders must not log into one W&B run
        run_config = describe(run, out_dir)
        agreed(info, lambda: reporter.start(run_config, state.wandb_id))
        state.wandb_id = reporter.wandb_id or state.wandb_id
        if resume_path is not None:
            reporter.restore_history(state.history, state.global_step)
        if run.parallel_auto and "links" in run.parallel_auto:
            reporter.note(autoplan.table(run.parallel_auto))
        reporter.note(start_line(run, run_config))
        reporter.note(needs.describe())
        code = epoch_loop(run, state, checkpoints, reporter, flag=flag, faults=faults, needs=needs)
        if code == EXIT_OK:
            code = finish(run, state, reporter, checkpoints=checkpoints, run_config=run_config, flag=flag)
    reporter.close()
    D.barrier(info)  # no rank tears the process group down while rank 0 still writes
    return code


def epoch_loop(run: TrainingRun, state: RunState, checkpoints: CheckpointManager, reporter, *,
               flag: PreemptionFlag, faults: FaultInjector, needs: budget.Budget) -> int:
    cfg, info = run.cfg, run.info
    step_log = rundir.StepLossLog(checkpoints.out_dir, cfg.record_step_losses and info.is_main)
    step_log.truncate_to(state.epoch, state.step)

    def save_mid_epoch(result) -> None:  # every --checkpoint-every-steps steps
        step_log.write(start.epoch, start.step, result.step_losses)
        state.step, state.sums = result.end_step, global_sums(info, result.sums)
        state.global_step = start.global_step + result.end_step - start.step
        check_replicas(run.model.plan, run.model.module, f"by epoch {start.epoch} step {result.end_step}")
        checkpoints.save(state, wait=False)

    hooks = step_hooks(cfg, flag, reporter, save_mid_epoch, faults)
    window = parse_window(cfg.profile_steps)
    if window is not None:
        hooks.profiler = StepProfiler(window, checkpoints.out_dir, info, reporter.note)

    def say_forecast(step_s: float, cpu_s: float) -> None:  # once, in this process's first epoch
        hooks.on_forecast = None
        reporter.note(budget.forecast(step_s, steps_per_epoch=run.steps_per_epoch,
                                      steps_left=run.steps_per_epoch * (cfg.epochs - first_epoch) - first_step,
                                      images_per_step=run.global_batch_size,
                                      train_flops_per_image=needs.train_flops_per_image))
        reporter.note(budget.stop_line(step_s, guard_every=cfg.guard_every, checkpoint_bytes=needs.checkpoint_bytes))
        if info.device.type == "cpu":  # on GPUs the host mostly waits, and its CPU time says nothing
            slow = budget.cpu_starved(step_s, cpu_s, threads=cfg.threads, local_world_size=info.local_world_size)
            if slow:
                reporter.note(slow)

    hooks.on_forecast = say_forecast if info.is_main else None
    if info.is_main and cfg.log_every_steps != -1:
        hooks.log_every_steps = cfg.log_every_steps or max(1, run.steps_per_epoch // 4)
        hooks.on_step_metrics = step_metrics_writer(run, reporter, needs.train_flops_per_image)
    first_epoch, first_step = state.epoch, state.step  # with --compile, this process's first epoch compiles
    while state.epoch < cfg.epochs:
        start = state.epoch_start()
        run.loader.set_epoch(start.epoch)
        reset_peak_memory(info.device)
        reporter.epoch_start(start.epoch, run.steps_per_epoch, start.step)
        result = train_epoch(run.step_parts, run.loader, info, start, hooks)
        state.global_step = start.global_step + result.steps
        state.train_time_s += result.wall_s
        step_log.write(start.epoch, start.step, result.step_losses)
        if result.stopped:
            state.step, state.sums = result.end_step, global_sums(info, result.sums)
            check_replicas(run.model.plan, run.model.module, f"by epoch {start.epoch} step {result.end_step}")
            kept = checkpoints.save_preempted(state)  # "written" only once it is
            why = D.all_gather_objects(info, flag.signal_name)
            if info.is_main:  # one line per job, naming what stopped it
                got = sorted({name for name in why if name})
                ranks = f" on all {info.world_size} ranks" if info.distributed else ""
                print(f"[dist_cifar] preempted ({', '.join(got) or 'signal'}), stopped at epoch {start.epoch} step "
                      f"{result.end_step}{ranks}; {kept}; exit {EXIT_PREEMPTED}", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
        t_eval = time.perf_counter()
        D.broadcast_buffers(info, run.model.module)  # every rank evaluates rank 0's BatchNorm statistics
        val = evaluate(run.model.eval_model, run.val_shards, run.precision, info) if run.val_shards is not None else None
        ema_val = None
        if run.ema is not None and run.val_shards is not None:
            with run.ema.swapped_in():
                ema_val = evaluate(run.model.eval_model, run.val_shards, run.precision, info)
        record = epoch_record(run, result, val, ema_val=ema_val, eval_s=time.perf_counter() - t_eval, partial=state.partial,
                              compile_s=result.first_step_s if start.epoch == first_epoch else None,
                              reporter=reporter)
        state.history.append(record)
        if start.epoch == first_epoch:
            check_wire(run, record, reporter)
        track_best(state, record, checkpoints, save=cfg.save_best, ema=run.ema if cfg.eval_weights == "ema" else None)
        track_target(state, record, cfg.target_accuracy, reporter)
        state.epoch, state.step, state.sums, state.partial = start.epoch + 1, 0, EpochSums(), False
        last = state.epoch == cfg.epochs
        due = checkpoint_due(cfg, checkpoints, state.epoch)  # once: it broadcasts rank 0's clock
        if due or last:
            check_replicas(run.model.plan, run.model.module, f"by the end of epoch {start.epoch}")
        if due:
            checkpoints.save(state, wait=last)
        record["checkpoint_blocked_s"], record["checkpoint_write_s"] = checkpoints.take_times()
        reporter.epoch(record)
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


SETUP_ERRORS = (ConfigError, DataError, ckpt.CheckpointError)


def agreed(info: D.DistInfo, setup_step):
    """Run a setup step on every rank; if it fails on any rank with a one-line error (bad data,
    out dir, checkpoint, flags), every rank raises that same error (exit 2 on all of them) instead
    of the others dying later on a closed connection."""
    error, value = "", None
    try:
        value = setup_step()
    except SETUP_ERRORS as exc:
        error = str(exc)
    first = next((e for e in D.all_gather_objects(info, error) if e), "")
    if first:
        raise ConfigError(first)
    return value


# may differ from node to node: where the data lies locally, host resources, console output
# (the out dir is rank 0's choice, broadcast to the others)
PER_HOST = ("data_dir", "out_dir", "threads", "num_workers", "quiet", "progress_every")


def same_config_everywhere(cfg: TrainConfig, info: D.DistInfo) -> None:
    """Ranks started with different flags would train different replicas (or hang on unequal step
    counts): every rank compares its resolved config with rank 0's and all fail with one line."""
    configs = D.all_gather_objects(info, cfg.to_dict())
    for rank, other in enumerate(configs[1:], start=1):
        differs = next((key for key in configs[0] if key not in PER_HOST and configs[0][key] != other.get(key)), None)
        if differs:
            raise ConfigError(f"rank {rank} was started with {flag_name(differs)} {other.get(differs)!r} but rank 0 "
                              f"with {configs[0][differs]!r}: start every rank with the same flags")


def prepare_out_dir(cfg: TrainConfig, info: D.DistInfo) -> tuple[Path, Optional[Path]]:
    """Rank 0 decides (the default name holds a timestamp), everyone gets its answer."""
    def decide() -> tuple[str, str]:
        out, resume = rundir.prepare(cfg)
        out.mkdir(parents=True, exist_ok=True)
        return str(out), str(resume) if resume else ""
    out, resume = D.broadcast_object(info, agreed(info, lambda: decide() if info.is_main else None))
    return Path(out), Path(resume) if resume else None


def load_data(cfg: TrainConfig, info: D.DistInfo) -> Splits:
    """The first process of each node decodes and caches; the others then read the cache."""
    def load():
        raw = load_source(cfg.dataset, cfg.data_dir, cfg.download, cfg.synthetic_size, trust=cfg.trust_shared)
        if cfg.dataset == "auto" and cfg.split == "report" and raw.source.startswith("synthetic"):
            # the report's split is CIFAR-10's own images: its study on synthetic stand-ins is no study
            raise DataError(f"no CIFAR-10 in {cfg.data_dir} (nor an image set, nor a download): the report's split "
                            f"needs the real data: put cifar-10-python.tar.gz or the image tarball there (python -m "
                            f"dist_cifar.fetch {cfg.data_dir}), or pass --dataset synthetic --split full for a trial run")
        return make_splits(raw, cfg.split, cfg.val_size, cfg.max_train)
    splits = agreed(info, lambda: load() if info.is_local_main else None)
    return agreed(info, lambda: splits if splits is not None else load())


def make_reporter(cfg: TrainConfig, notes: tuple[str, ...], info: D.DistInfo, out_dir: Path):
    if not info.is_main:
        return SilentReporter()
    reporter = Reporter(out_dir, quiet=cfg.quiet, wandb_mode=cfg.wandb, wandb_kwargs=dict(
        project=cfg.wandb_project, entity=cfg.wandb_entity, group=cfg.wandb_group,
        name=cfg.wandb_name or out_dir.name, tags=cfg.wandb_tags, job_type=cfg.job_type,
        init_timeout=cfg.wandb_init_timeout))
    for note in notes:
        reporter.note(note)
    return reporter


def aim_faults(faults: FaultInjector, run: TrainingRun) -> None:
    """DIST_CIFAR_FAULT's overflow acts on a sharded parameter (any under ddp), drift on a
    replicated one."""
    plan, module = run.model.plan, run.model.module
    shards = getattr(plan, "shards", {})
    sharded = module.get_parameter(next(iter(shards))) if shards else next(module.parameters())
    replicated = plan.replicated_parameters(module)
    faults.aim(sharded=sharded, replicated=replicated[0][1] if replicated else None)


def stateful_parts(run: TrainingRun) -> dict[str, Any]:
    """What a checkpoint asks for its state: weights, optimizer, schedule, GradScaler. Weights and
    optimizer come through the parallel layout, so a checkpoint always holds the plain state."""
    plan, module = run.model.plan, run.model.module
    parts = {"model": ConsolidatedModel(plan, module), "optimizer": ConsolidatedOptimizer(plan, run.optimizer, module),
             "scheduler": run.scheduler}
    if run.precision.scaler is not None:
        parts["scaler"] = run.precision.scaler
    if run.ema is not None:
        parts["ema"] = run.ema
    return parts


def sharded_state(run: TrainingRun) -> ShardedState:
    """The tensors of the state under their plain names, for torch.distributed.checkpoint: saved
    that way when the layout shards the model over several ranks (no rank gathers it), read that
    way from any sharded checkpoint by any layout."""
    plan = run.model.plan
    writes = run.info.distributed and run.info.world_size > 1 and plan.name in ("hybrid", "fsdp")
    return ShardedState(plan, run.model.module, run.optimizer, run.ema, writes=writes)


def step_hooks(cfg: TrainConfig, flag: PreemptionFlag, reporter, on_checkpoint_step, faults) -> StepHooks:
    return StepHooks(should_stop=flag, on_checkpoint_step=on_checkpoint_step,
                     checkpoint_every_steps=cfg.checkpoint_every_steps,
                     on_progress=reporter.progress if reporter.shows_progress else None,
                     progress_every=cfg.progress_every, guard_every=cfg.guard_every,
                     max_skipped_steps=cfg.max_skipped_steps, faults=faults,
                     record_step_losses=cfg.record_step_losses, time_first_step=cfg.compile)


def device_name(info: D.DistInfo) -> str:
    return torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu"


def mfu_peak(run: TrainingRun) -> tuple[float, str]:
    """The peak TFLOP/s per device that MFU is measured against, and where it comes from."""
    return cost.peak_tflops(device_name(run.info), run.precision.name, tf32=run.cfg.tf32, given=run.cfg.peak_tflops)


def step_metrics_writer(run: TrainingRun, reporter, train_flops_per_image: float):
    """The step loop's row (engine.StepWindow) plus its MFU, to the reporter."""
    peak, _ = mfu_peak(run)
    world = run.info.world_size

    def write(row: dict) -> None:
        row["step_mfu"] = row["step_images_per_s"] * train_flops_per_image / (world * peak * 1e12) if peak else None
        reporter.step_metrics(row)
    return write


def checkpoint_due(cfg: TrainConfig, checkpoints: CheckpointManager, epochs_done: int) -> bool:
    """Every --checkpoint-every epochs, after --checkpoint-interval-min minutes, and after the last
    epoch (unless both are 0). Rank 0's clock decides, so every rank agrees."""
    if not (cfg.checkpoint_every or cfg.checkpoint_interval_min):
        return False
    by_epoch = bool(cfg.checkpoint_every) and epochs_done % cfg.checkpoint_every == 0
    by_time = bool(cfg.checkpoint_interval_min) and checkpoints.minutes_since_last_save() >= cfg.checkpoint_interval_min
    return epochs_done == cfg.epochs or by_epoch or D.broadcast_object(checkpoints.info, by_time)


def git_commit() -> str:
    """HEAD of the checkout; DIST_CIFAR_GIT_COMMIT where the tree travelled without .git (GPU hosts)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip()
    except Exception:
        head = ""
    return head or os.environ.get("DIST_CIFAR_GIT_COMMIT", "") or "unknown"


def describe(run: TrainingRun, out_dir: Path) -> dict[str, Any]:
    """The config plus what only the running job knows: W&B's and config.json's content."""
    info, splits = run.info, run.splits
    peak, peak_source = mfu_peak(run)
    return dict(run.cfg.to_dict(), world_size=info.world_size, global_batch_size=run.global_batch_size,
                device_name=device_name(info), mfu_peak_tflops=peak or None, mfu_peak_source=peak_source,
                torch_version=torch.__version__, git_commit=git_commit(),
                dist_cifar_version=__version__,
                num_params=plain_parameter_count(run.cfg), out_dir=str(out_dir),
                parallel_resolved=run.model.plan.name, tp_resolved=getattr(run.model.plan, "tp", None),
                wire_predicted=predicted_wire(run),
                precision_resolved=run.precision.name, backend_resolved=info.backend or "none",
                data_source=splits.source, steps_per_epoch_resolved=run.steps_per_epoch,
                parallel_auto=run.parallel_auto,
                split_sizes=dict(train=len(splits.train), val=len(splits.val) if splits.val is not None else 0,
                                 test=len(splits.test)))


def plain_parameter_count(cfg: TrainConfig) -> int:
    """Parameters of the whole model, whatever slice of it this rank holds."""
    with torch.device("meta"):
        return count_parameters(build_model(cfg.model, **model_switches(cfg)))


def model_switches(cfg: TrainConfig) -> dict[str, bool]:
    return dict(batchnorm=cfg.batchnorm, dropout=cfg.dropout, pooling=cfg.pooling)


def predicted_wire(run: TrainingRun) -> dict[str, int]:
    """What dist_cifar.cost predicts each rank sends per step (ring accounting), by collective."""
    cfg, info = run.cfg, run.info
    if not info.distributed:
        return {}
    return cost.predict_wire(run.model.plan.name, cfg.model, batch_per_rank=cfg.batch_size, world=info.world_size,
                             precision=run.precision.name, comm_hook=cfg.ddp_comm_hook,
                             tp=getattr(run.model.plan, "tp", 0), **model_switches(cfg))


def start_line(run: TrainingRun, run_config: dict[str, Any]) -> str:
    cfg, info = run.cfg, run.info
    line = (f"{cfg.model}: {run_config['num_params']:,} parameters | world size {info.world_size} x batch "
            f"{cfg.batch_size} per process = global batch {run.global_batch_size} | {run.precision.name} on "
            f"{run_config['device_name']} | {run.steps_per_epoch} steps/epoch | out {run_config['out_dir']}")
    if cfg.resolve_as not in ("auto", info.device.type):
        line += f"\n  the {cfg.resolve_as} configuration rehearsed on {info.device.type} (--resolve-as {cfg.resolve_as})"
    if info.distributed:
        wire = sum(run_config["wire_predicted"].values())
        line += f"\n  {run.model.plan.describe()}: {wire / 1e6:,.1f} MB per rank per step on the wire (predicted)"
    return line


# ------------------------------------------------------------------------------ per epoch


def epoch_record(run: TrainingRun, result, val: Optional[EvalResult], *, eval_s: float, partial: bool,
                 compile_s: Optional[float], reporter, ema_val: Optional[EvalResult] = None) -> dict:
    info = run.info
    train_loss, train_acc, _ = global_mean(info, result)
    compute = result.wall_s - result.data_wait_s
    rank_times = D.all_gather_floats(info, compute)
    skips = skipped_steps(info, result)
    images = result.steps * run.global_batch_size
    say_skipped_steps(run, skips, result.epoch, reporter)
    return {
        "epoch": result.epoch, "train_loss": train_loss, "train_accuracy": train_acc,
        "val_loss": val.loss if val else None, "val_accuracy": val.accuracy if val else None,
        "lr": run.optimizer.param_groups[0]["lr"], "epoch_time_s": result.wall_s,
        "ema_val_loss": ema_val.loss if ema_val else None, "ema_val_accuracy": ema_val.accuracy if ema_val else None,
        "images_per_s": images / max(result.wall_s, 1e-9), "data_wait_s": result.data_wait_s,
        "compute_s": compute, "comm_s": run.model.comm.take() if run.model.comm else None,
        "rank_time_min_s": min(rank_times), "rank_time_max_s": max(rank_times),
        "peak_memory_mb": peak_memory_mb(info.device), "compile_s": compile_s, "eval_time_s": eval_s,
        "steps": result.end_step, "world_size": info.world_size, "partial": True if partial else None,
        "wire_bytes_per_step": run.model.plan.wire().total() if info.distributed and result.steps else None,
        "skipped_steps": max(n for n, _ in skips) if skips else None,
        "grad_norm_mean": result.grad_norm_mean, "grad_norm_max": result.grad_norm_max,
        "checkpoint_blocked_s": None, "checkpoint_write_s": None,  # filled in after the epoch's saves
    }


def skipped_steps(info: D.DistInfo, result) -> Optional[list[tuple[int, Optional[int]]]]:
    """fp16: every rank's (GradScaler-skipped steps in this epoch, the first of them); None
    without a GradScaler."""
    if result.skipped_steps is None:
        return None
    return [tuple(pair) for pair in D.all_gather_objects(info, (result.skipped_steps, result.first_skipped_step))]


def say_skipped_steps(run: TrainingRun, per_rank: Optional[list], epoch: int, reporter) -> None:
    """One line when the fp16 GradScaler skipped steps this epoch (and whether the ranks agreed)."""
    if not per_rank or not any(n for n, _ in per_rank):
        return
    scale = run.precision.scaler.get_scale()
    if len(set(per_rank)) == 1:
        count, first = per_rank[0]
        where = " on every rank" if len(per_rank) > 1 else ""
        reporter.note(f"epoch {epoch}: the fp16 GradScaler skipped {count} step(s){where}, the first at step "
                      f"{first} (overflow); loss scale now {scale:g}")
    else:
        reporter.note(f"warning: epoch {epoch}: ranks skipped different fp16 steps (count, first step per rank: "
                      f"{per_rank}): their replicas differ; the drift guard stops the run at its next check")


def check_wire(run: TrainingRun, record: dict, reporter) -> None:
    """Say so when the bytes the collectives sent differ from dist_cifar.cost's prediction."""
    predicted = sum(predicted_wire(run).values())
    if record["wire_bytes_per_step"] is not None and record["wire_bytes_per_step"] != predicted:
        reporter.note(f"warning: each rank sent {record['wire_bytes_per_step']:,} bytes per step, dist_cifar.cost "
                      f"predicted {predicted:,}")


def track_best(state: RunState, record: dict, checkpoints: CheckpointManager, *, save: bool, ema=None) -> None:
    """Keep the weights with the lowest validation loss, as the report does (last epoch when
    there is no validation split); with --eval-weights ema, the average's loss picks, and best.pt
    holds the average."""
    key = "ema_val_loss" if ema is not None else "val_loss"
    val_loss = record[key] if record[key] is not None else -float(record["epoch"])
    if val_loss < state.best_val_loss:
        state.best_val_loss, state.best_epoch = val_loss, record["epoch"]
        state.time_to_best_s = state.train_time_s
        if save:
            with ema.swapped_in() if ema is not None else contextlib.nullcontext():
                checkpoints.save_best(epoch=record["epoch"], val_loss=record[key])


def track_target(state: RunState, record: dict, target: float, reporter) -> None:
    """--target-accuracy: the first epoch whose validation accuracy reaches it, with the training
    time (summed over restarts, evaluation excluded) and the optimizer steps taken by then."""
    accuracy = record["val_accuracy"]
    if target and not state.target and accuracy is not None and accuracy >= target:
        state.target = {"time_s": state.train_time_s, "epoch": record["epoch"], "step": state.global_step}
        reporter.note(f"validation accuracy {accuracy:.2f}% reached the target {target:g}% at epoch {record['epoch']} "
                      f"(step {state.global_step}) after {state.train_time_s:.1f} s of training")


def target_fields(cfg: TrainConfig, state: RunState) -> dict:
    """The time-to-accuracy keys of the summary (None where the target was not reached)."""
    if not cfg.target_accuracy:
        return {}
    return {"target_accuracy": cfg.target_accuracy, "time_to_target_s": state.target.get("time_s"),
            "target_epoch": state.target.get("epoch"), "target_step": state.target.get("step")}


# ------------------------------------------------------------------------------ end of run


def steady_epoch_time(history: list[dict]) -> Optional[float]:
    """Median epoch time without the epochs that compiled (and the very first, which warms up);
    None when no such epoch ran: a warm-up epoch is never reported as the steady one."""
    steady = sorted(r["epoch_time_s"] for r in history[1:] if r.get("compile_s") is None)
    return steady[len(steady) // 2] if steady else None


def finish(run: TrainingRun, state: RunState, reporter, *, checkpoints: CheckpointManager,
           run_config: dict[str, Any], flag: PreemptionFlag) -> int:
    """The report's compute_accuracy on the best weights, the confusion matrix, plots, summary.
    A preemption signal between the evaluations ends the run with 75 at once (training is done and
    checkpointed; the rerun evaluates), instead of running into torchrun's or SLURM's kill."""
    cfg, info, splits, model = run.cfg, run.info, run.splits, run.model
    out_dir = checkpoints.out_dir
    if cfg.save_best and state.best_epoch >= 0:
        checkpoints.load_best(state.best_epoch)
    last = state.history[-1] if state.history else {}
    timing = {"epochs_run": len(state.history), "total_time_s": state.train_time_s,
              "mean_epoch_time_s": sum(r["epoch_time_s"] for r in state.history) / max(len(state.history), 1),
              "steady_epoch_time_s": steady_epoch_time(state.history), "last_train_loss": last.get("train_loss"),
              "world_size": info.world_size, "global_batch_size": run.global_batch_size,
              **target_fields(cfg, state)}
    if not cfg.final_eval:
        if info.is_main:
            reporter.finish({"model": cfg.model, "out_dir": str(out_dir), "num_params": run_config["num_params"],
                             "final_eval": False, **timing, "data_source": splits.source}, {}, [])
        return EXIT_OK

    def preempted() -> bool:  # every rank decides the same, at the same point
        if not D.agree(info, torch.full((), 2.0**31, device=info.device), flag())[1]:
            return False
        if info.is_main:
            print(f"[dist_cifar] preempted during the final evaluation; training is complete and "
                  f"checkpointed: rerun the same command to evaluate; exit {EXIT_PREEMPTED}", file=sys.stderr, flush=True)
        return True

    if preempted():
        return EXIT_PREEMPTED
    with contextlib.ExitStack() as weights:
        if cfg.eval_weights == "ema" and not (cfg.save_best and state.best_epoch >= 0):
            weights.enter_context(run.ema.swapped_in())  # the last average (best.pt holds the best one)
        train_eval = evaluate(model.eval_model, run.shards(splits.train), run.precision, info)
        if preempted():
            return EXIT_PREEMPTED
        val_eval = evaluate(model.eval_model, run.shards(splits.val), run.precision, info) \
            if splits.val is not None else None
        test_eval = evaluate(model.eval_model, run.shards(splits.test), run.precision, info,
                             num_classes=len(splits.classes), confusion=True)
    if not info.is_main:
        return EXIT_OK
    cm = test_eval.confusion
    per_class = test_eval.per_class_accuracy(splits.classes)
    images = {"loss_curves": plot.loss_curves(state.history, out_dir / files.LOSS_CURVES, f"{cfg.model} loss",
                                              best=state.best_epoch),
              "confusion_matrix": plot.confusion_matrix(cm.tolist(), splits.classes, out_dir / files.CONFUSION,
                                                        f"{cfg.model} test confusion matrix")}
    summary = {
        "model": cfg.model, "out_dir": str(out_dir), "num_params": run_config["num_params"],
        # best_*: the weights kept (lowest validation loss), evaluated as the report's compute_accuracy;
        # last_*: the last epoch's record (W&B's own summary of the history keys says the same)
        "best_train_accuracy": train_eval.accuracy, "best_val_accuracy": val_eval.accuracy if val_eval else None,
        "best_test_accuracy": test_eval.accuracy, "best_train_loss": train_eval.loss,
        "best_val_loss": val_eval.loss if val_eval else None, "best_test_loss": test_eval.loss,
        "best_epoch": state.best_epoch, "time_to_best_s": state.time_to_best_s, "last_val_loss": last.get("val_loss"),
        **timing,
        "per_class_test_accuracy": dict(per_class), "confusion_matrix": cm.tolist(),
        "data_source": splits.source, "split_sizes": run_config["split_sizes"],
    }
    reporter.finish(summary, images, per_class)
    return EXIT_OK


def cli() -> None:
    """The command line's entry (python -m dist_cifar.train, dist-cifar-train): main, then out
    without interpreter finalization. gloo's worker threads can still hold finished work when the
    interpreter tears down, and destroying it then aborts the process (SIGABRT) after a run that
    completed and saved everything; by this point every file is closed, W&B finished and the
    process group destroyed."""
    code = main()  # None after --help / --version (torch's @record turns their SystemExit(0) into a return)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    cli()
