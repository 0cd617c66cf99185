"""Where the per-epoch records, notes and the end-of-run summary go: metrics.jsonl,
step_metrics.jsonl, summary.json, config.json, W&B and the console.

Only rank 0 gets a `Reporter`; every other rank gets `SilentReporter`, whose methods do
nothing, so the training loop never asks which rank it is before reporting. The same per-epoch
record (minus keys whose value is None) goes to metrics.jsonl and to W&B, drawn against `epoch`;
each per-step row (STEP_KEYS) goes to step_metrics.jsonl and to W&B, drawn against
`global_step`. W&B's own `_step` only counts the rows it was sent.
Not here: errors (train.py prints them to stderr), checkpoints and best.pt (checkpoint.py),
step_losses.jsonl (rundir.py) and the PNG plots (plot.py; this module only uploads them).
"""
from __future__ import annotations

import errno
import re
import secrets
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from . import files

# What each per-epoch key means (a test checks that README's table lists every one).
EPOCH_KEYS = {
    "epoch": "epoch index, 0-based; W&B's step axis",
    "train_loss": "mean cross-entropy over the epoch's training samples, all ranks",
    "train_accuracy": "training accuracy (%) over the epoch, all ranks (dropout on)",
    "val_loss": "validation loss (exact over ranks: every sample counted once)",
    "val_accuracy": "validation accuracy (%)",
    "lr": "learning rate at the end of the epoch",
    "ema_val_loss": "--ema: validation loss of the weights' moving average; null without --ema",
    "ema_val_accuracy": "--ema: validation accuracy (%) of the moving average; null without --ema",
    "epoch_time_s": "wall time of the training pass, after a device sync (excludes evaluation)",
    "images_per_s": "global training throughput: images of all ranks / epoch_time_s",
    "data_wait_s": "time rank 0 waited for its next batch inside the step loop",
    "compute_s": "rank 0's epoch_time_s minus data_wait_s",
    "comm_s": "summed all-reduce time of DDP buckets (needs --ddp-comm-hook; see README)",
    "rank_time_min_s": "fastest rank's compute time (straggler spread, with the max)",
    "rank_time_max_s": "slowest rank's compute time",
    "peak_memory_mb": "peak device memory of rank 0 (CUDA allocator; max RSS on CPU)",
    "compile_s": "first epoch with --compile: wall time of its first step, which compilation dominates",
    "eval_time_s": "wall time of the validation pass",
    "checkpoint_blocked_s": "time the step loop stood still for checkpoints and best.pt this epoch (device-to-host copy, RNG gather, waiting for a previous write)",
    "checkpoint_write_s": "background time of the checkpoint / best.pt writes that finished during this epoch",
    "steps": "optimizer steps in the epoch (a resumed epoch counts the steps before the stop too)",
    "grad_norm_mean": "--clip-grad-norm: the global gradient norm before clipping, mean over the epoch's steps (of this process's run of the epoch); null without clipping",
    "grad_norm_max": "--clip-grad-norm: its largest value in the epoch; null without clipping",
    "partial": "true only when the epoch was resumed on another global batch at a position it does not divide: a few samples were trained (and counted) twice; absent otherwise",
    "world_size": "number of processes",
    "wire_bytes_per_step": "bytes each rank sent per training step (ring accounting of the collectives' sizes; parallel.py)",
    "skipped_steps": "fp16: optimizer steps the GradScaler skipped for overflow in this epoch (the most on any rank; the ranks agree, and a line says which step came first); null without fp16",
}


# What each per-step row means (--log-every-steps); names apart from the epoch keys, since the
# window differs: the steps since the previous row.
STEP_KEYS = {
    "global_step": "optimizer steps since the run began; W&B's x-axis for the step_* figures",
    "epoch": "epoch index of the row (step_metrics.jsonl only)",
    "step": "optimizer steps done in that epoch (step_metrics.jsonl only)",
    "step_loss": "mean training loss of rank 0's samples over the steps since the previous row",
    "step_lr": "learning rate after the row's step",
    "step_images_per_s": "global images/s over the steps since the previous row (wall time between rows, after a device sync)",
    "step_mfu": "model FLOPs utilisation: step_images_per_s x training FLOPs per image (dist_cifar.cost) / (world size x the peak in config.json's mfu_peak_tflops); null when no peak is known",
    "step_grad_norm": "--clip-grad-norm: mean pre-clip global gradient norm over the steps since the previous row; null without clipping",
}
FILE_ONLY_STEP_KEYS = ("epoch", "step")  # in step_metrics.jsonl, not in W&B: there `epoch` is the epoch rows'


def drop_none(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if v is not None}


class SilentReporter:
    """Non-zero ranks: nothing printed, nothing written."""

    wandb_id = ""
    shows_progress = False  # nobody watches: the step loop need not read the loss back

    def start(self, *a, **k): pass
    def epoch_start(self, *a, **k): pass
    def progress(self, *a, **k): pass
    def epoch(self, *a, **k): pass
    def step_metrics(self, *a, **k): pass
    def note(self, *a, **k): pass
    def restore_history(self, *a, **k): pass
    def finish(self, *a, **k): pass
    def close(self): pass


class Reporter(SilentReporter):
    def __init__(self, out_dir: Path, *, quiet: bool = False, wandb_mode: str = "off",
                 wandb_kwargs: Optional[dict[str, Any]] = None):
        """`wandb_mode` is resolved already (runtime.resolve_wandb): online, offline or off."""
        self.out_dir = out_dir
        self.metrics_path = out_dir / files.METRICS
        self.quiet = quiet
        self.console = make_console()
        self.interactive = self.console.is_terminal
        self.shows_progress = self.interactive and not quiet
        self.bar = None
        self.run = None
        self.wandb_mode = wandb_mode
        self.wandb_kwargs = wandb_kwargs or {}
        self.wandb_id = ""
        self.step_metrics_path = out_dir / files.STEP_METRICS
        self.wandb_held_step = -1  # step rows at or below this global step W&B holds already

    # -- lifecycle ------------------------------------------------------------------
    def start(self, run_config: dict[str, Any], wandb_id: str = "") -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        files.atomic_write_json(self.out_dir / files.CONFIG, run_config)
        if self.wandb_mode != "off":
            try:
                self.run, self.wandb_mode = start_wandb(self.out_dir, self.wandb_mode, run_config, wandb_id,
                                                        note=self.note, **self.wandb_kwargs)
            except Exception as exc:  # an unwritable wandb/ folder, a broken install: training goes on
                self.note(f"W&B could not start ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); "
                          f"logging to metrics.jsonl only")
                self.run, self.wandb_mode = None, "off"
                return
            self.wandb_id = self.run.id
            files.atomic_write_bytes(self.out_dir / files.WANDB_ID, self.wandb_id.encode())
            self.wandb_call(self.define_axes)

    def define_axes(self) -> None:
        """Epoch figures against `epoch`, step figures against `global_step` (W&B's default x-axis,
        `_step`, only counts rows)."""
        self.run.define_metric("epoch")
        self.run.define_metric("global_step")
        for key in EPOCH_KEYS:
            if key != "epoch":
                self.run.define_metric(key, step_metric="epoch")
        self.run.define_metric("step_*", step_metric="global_step")

    def note(self, message: str) -> None:
        print(f"[dist_cifar] {message}", flush=True)

    def restore_history(self, history: list[dict[str, Any]], global_step: int) -> None:
        """After a resume: metrics.jsonl holds exactly the checkpointed epochs and step_metrics.jsonl
        the rows up to the checkpoint's step (the resumed run recomputes the rest), and W&B gets
        every epoch it does not hold. What it holds is read back, not assumed: a stop signal can
        kill W&B's service before it saved the rows it was sent (offline: the run's earlier
        folders are read; online: the resumed run's summary says how far it got). Step rows W&B
        lost stay lost there (step_metrics.jsonl has them); rows it holds are not sent twice."""
        files.write_jsonl(self.metrics_path, history)
        if self.step_metrics_path.exists():
            files.write_jsonl(self.step_metrics_path, [row for row in files.read_jsonl(self.step_metrics_path)
                                                       if row["global_step"] <= global_step])
        if self.run is None:
            return
        held, self.wandb_held_step = self.wandb_holds()
        missing = [record for record in history if record["epoch"] not in held]
        for record in missing:
            self.wandb_call(self.run.log, record)
        if missing:
            self.note(f"W&B: {len(missing)} epoch(s) it did not hold were logged again "
                      f"({', '.join(str(r['epoch']) for r in missing)})")

    def wandb_holds(self) -> tuple[set[int], int]:
        """(the epochs W&B holds, the last global step of its step rows; -1: none)."""
        if self.wandb_mode == "offline":
            from .wandb_offline import logged
            return logged(self.out_dir, self.run.id, skip=(Path(self.run.dir).parent,))
        summary = self.run.summary
        last_epoch, last_step = summary.get("epoch"), summary.get("global_step")
        return (set(range(int(last_epoch) + 1)) if last_epoch is not None else set(),
                int(last_step) if last_step is not None else -1)

    def wandb_call(self, fn: Callable, *args, **kwargs) -> None:
        """A W&B call that cannot end the run: its service can die under it (a signal meant for the
        trainer reaches every process of a SLURM step). Said once; the rows W&B then misses are
        replayed into the same run on resume."""
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            self.note(f"W&B stopped logging ({type(exc).__name__}: {str(exc)[:100]}); metrics.jsonl is complete and "
                      f"a resume logs the missing epochs into the same W&B run")
            self.run = None

    # -- per step / per epoch -------------------------------------------------------
    def epoch_start(self, epoch: int, total_steps: int, start_step: int = 0) -> None:
        if self.quiet or not self.interactive:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self.bar = Progress(TextColumn(f"epoch {epoch}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[ips]:>9.0f} img/s  loss {task.fields[loss]:.4f}"),
                            TimeElapsedColumn(), console=self.console, transient=True)
        self.bar.start()
        self.task = self.bar.add_task("train", total=total_steps, completed=start_step, ips=0.0, loss=float("nan"))

    def progress(self, step: int, total: int, loss: float, images_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, ips=images_per_s)

    def epoch(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        self.check_out_dir()
        record = drop_none(record)
        files.append_jsonl(self.metrics_path, [record])
        if self.run is not None:
            self.wandb_call(self.run.log, record)
        if not self.quiet:
            self.console.print(epoch_line(record), markup=False, highlight=False, soft_wrap=True)

    def check_out_dir(self) -> None:
        """Deleted under the run: never re-create it half."""
        if not (self.out_dir / files.CONFIG).exists():
            raise FileNotFoundError(errno.ENOENT, "the out dir (or its config.json) was deleted during the run",
                                    str(self.out_dir))

    def step_metrics(self, row: dict[str, Any]) -> None:
        self.check_out_dir()
        row = drop_none(row)
        files.append_jsonl(self.step_metrics_path, [row])
        if self.run is not None and row["global_step"] > self.wandb_held_step:
            self.wandb_call(self.run.log, {k: v for k, v in row.items() if k not in FILE_ONLY_STEP_KEYS})

    def finish(self, summary: dict[str, Any], images: dict[str, Path], per_class: list[tuple[str, float]]) -> None:
        files.atomic_write_json(self.out_dir / files.SUMMARY, summary)
        if self.run is not None:
            import wandb
            self.wandb_call(self.run.summary.update, summary)
            media = {name: wandb.Image(str(path)) for name, path in images.items() if path.exists()}
            media["per_class_accuracy"] = wandb.Table(columns=["class", "accuracy"],
                                                      data=[[c, a] for c, a in per_class])
            self.wandb_call(lambda: self.run.summary.update(media))
        self.console.print(summary_table(summary, per_class))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.run is not None:
            mode, run_dir, run_id = self.wandb_mode, getattr(self.run, "dir", ""), getattr(self.run, "id", "")
            self.wandb_call(self.run.finish)
            self.run = None
            if mode == "offline" and run_dir:
                # a resumed or requeued job continues the run in a new folder each start: name them all
                here = Path(run_dir).parent
                folders = sorted(here.parent.glob(f"offline-run-*-{run_id}")) if run_id else []
                self.note(f"W&B offline run saved; upload it with: wandb sync "
                          f"{' '.join(shlex.quote(str(f)) for f in folders or [here])}")


def make_console():
    from rich.console import Console
    if sys.stdout.isatty():
        return Console()
    # Files and SLURM logs: no colour codes, no cursor movement, no wrapping at 80 columns.
    return Console(force_terminal=False, no_color=True, highlight=False, width=10_000)


def epoch_line(r: dict[str, Any]) -> str:
    parts = [f"epoch {r['epoch']:>3}", f"train_loss {r.get('train_loss', float('nan')):.4f}",
             f"train_acc {r.get('train_accuracy', float('nan')):6.2f}%"]
    if "val_loss" in r:
        parts += [f"val_loss {r['val_loss']:.4f}", f"val_acc {r['val_accuracy']:6.2f}%"]
    parts += [f"time {r['epoch_time_s']:.2f}s", f"{r['images_per_s']:.0f} img/s",
              f"wait {r.get('data_wait_s', 0):.2f}s", f"lr {r.get('lr', 0):.2e}"]
    if "comm_s" in r:
        parts.append(f"comm {r['comm_s']:.2f}s")
    if "compile_s" in r:
        parts.append(f"compile {r['compile_s']:.1f}s")
    return "  ".join(parts)


def summary_table(summary: dict[str, Any], per_class: list[tuple[str, float]]):
    from rich.table import Table
    from rich.text import Text  # user strings (out dir, class folders) printed as they are, never as markup
    table = Table(title=Text(f"dist_cifar: {summary.get('model')} ({summary.get('out_dir')})"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("best_train_accuracy", "best_val_accuracy", "best_test_accuracy", "best_test_loss", "best_epoch",
                "best_val_loss", "epochs_run", "total_time_s", "time_to_best_s", "num_params",
                "world_size", "global_batch_size"):
        if summary.get(key) is not None:
            value = summary[key]
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else Text(str(value)))
    for name, acc in per_class:
        table.add_row(Text(f"test acc {name}"), f"{acc:.2f}")
    return table


def saved_run_id(out_dir: Path) -> str:
    """wandb_run_id.txt as text, whatever bytes it holds ('' when there is none)."""
    try:
        return (out_dir / files.WANDB_ID).read_bytes().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def usable_run_id(run_id: str, note: Callable[[str], None]) -> str:
    """`run_id`, or '' (with a note) when wandb would refuse it (a '/', binary junk): then a new
    W&B run starts and its id replaces the file, instead of W&B failing on every resume."""
    if run_id and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
        note(f"ignoring the W&B run id {run_id[:40]!r} (letters, digits, - and _ only): starting a new W&B run")
        return ""
    return run_id


def start_wandb(out_dir: Path, mode: str, run_config: dict[str, Any], run_id: str = "", *,
                note: Callable[[str], None], project: str = "dist_cifar", entity: str = "", group: str = "",
                name: str = "", tags: str = "", job_type: str = "train", init_timeout: float = 25.0):
    """(run, mode actually used). An online start that fails or outlasts `init_timeout` (a compute
    node with no route out) logs offline instead, so training never waits on W&B."""
    import wandb
    run_id = usable_run_id(run_id or saved_run_id(out_dir), note) or secrets.token_hex(4)

    def init(as_mode: str):
        return wandb.init(
            dir=str(out_dir), mode=as_mode, project=project, entity=entity or None, group=group or None,
            name=name or out_dir.name, tags=[t for t in tags.split(",") if t] or None, job_type=job_type,
            config=run_config, id=run_id, resume="allow",
            settings=wandb.Settings(console="off", silent=True, init_timeout=init_timeout))

    if mode == "online":
        try:
            run = init("online")
            note(f"W&B: logging online to {run.url}")
            return run, "online"
        except Exception as exc:  # CommError, timeouts, auth: all mean "not online now"
            note(f"W&B online start failed within {init_timeout:.0f}s ({type(exc).__name__}: "
                 f"{str(exc).splitlines()[0][:100] if str(exc) else ''}); logging offline instead")
            wandb.teardown()  # the failed start still holds the run id in wandb's service
    run = init("offline")
    note(f"W&B: logging offline to {Path(run.dir).parent}; upload later with: wandb sync {Path(run.dir).parent}")
    return run, "offline"
