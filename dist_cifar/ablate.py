"""The report's ablation studies, each variant an ordinary single-process training job.

    python -m dist_cifar.ablate batchnorm --dataset imagefolder --data-dir data/cifar10-jpeg.tar.gz
    python -m dist_cifar.ablate weight_decay --epochs 5 --out runs/ablations
    python -m dist_cifar.ablate all
    python -m dist_cifar.ablate dropout --slurm --wait     # one SLURM array task per variant

Every variant trains with the report preset into <out>/<study>/<variant>/ (a normal run folder).
Recipe overrides (`--weight-decay`, `--epochs`, `--optimizer`, `--lr`) apply to every variant,
are recorded in each variant's config.json and the study's report.md header, and put the study
in its own folder (<out>/<study>-wd0, <out>/<study>-e10-wd0, ...) so results of different
recipes never share a table. The data (`--dataset`, `--data-dir`, `--max-train`,
`--synthetic-size`) and `--extra` are part of a study folder's identity too (kept in its
ablation.json): the same study on other data trains again, into a sibling folder named after the
data, and says so in one line. Paths are relative to where the command is typed, installed or not.
A variant whose summary.json exists is skipped; a failed one is reported and run again next
time (resuming from its last checkpoint when it has one). <out>/<study>/report.md puts the
results in the report's table format next to the report's own numbers; `all` also writes
<out>/REPORT.md linking every study.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import checkpoint as ckpt
from . import files

# Where `dist_cifar` is importable from (a checkout or site-packages): the variants are started
# with it on PYTHONPATH, in the user's own folder, so an uninstalled checkout works from anywhere.
PACKAGE_PARENT = Path(__file__).resolve().parents[1]
SLURM_DIR = Path(__file__).resolve().parent / "slurm"  # shipped in the wheel (package data)
IDENTITY_FILE = "ablation.json"


@dataclass
class Variant:
    name: str
    flags: list[str]
    report: dict = field(default_factory=dict)  # the report's numbers for this variant, if any


@dataclass(kw_only=True)
class Study:
    name: str
    model: str
    table: str  # loss | accuracy | epochs | general
    question: str
    variants: list[Variant]
    report_note: str = ""
    varies: tuple[str, ...] = ()  # recipe fields the study sets per variant: an override of them is refused


def _v(name, flags="", **report):
    return Variant(name, shlex.split(flags), report)


STUDIES: dict[str, Study] = {s.name: s for s in [
    Study(name="dropout", model="small_cnn", table="general", question="Does Dropout(0.35) after conv2 curb overfitting?",
          variants=[_v("with_dropout"), _v("without_dropout", "--no-dropout")],
          report_note="figures only: without dropout the validation loss rises at the end (overfitting)"),
    Study(name="pooling", model="small_cnn", table="general", question="What do the two 2x2 max-pools buy?",
          variants=[_v("with_pooling"), _v("without_pooling", "--no-pooling")],
          report_note="figures only: without pooling the model overfits"),
    Study(name="batchnorm", model="small_cnn", table="loss", question="Does BatchNorm(16) before conv2 help?",
          variants=[_v("with_bn", "", train_loss=0.78, val_loss=1.03),
           _v("without_bn", "--no-batchnorm", train_loss=1.07, val_loss=1.11)]),
    Study(name="weight_decay", model="vgg_truncated", table="accuracy", question="Adam weight decay (L2) on the truncated VGG16",
          variants=[_v("wd_0", "--weight-decay 0", train=77.53, val=71.62, test=66.30),
           _v("wd_0.01", "--weight-decay 0.01", train=73.81, val=73.66, test=67.64),
           _v("wd_0.001", "--weight-decay 0.001", train=82.19, val=75.96, test=70.86),
           _v("wd_0.0001", "--weight-decay 0.0001", train=79.26, val=72.98, test=68.50),
           _v("wd_1", "--weight-decay 1", note="ridiculous")],
          report_note="weight decay 1: 'results are ridiculous' (no table)", varies=("weight_decay",)),
    Study(name="epochs", model="small_cnn", table="epochs", question="How many epochs before validation loss turns up?",
          variants=[_v(f"epochs_{e}", f"--epochs {e}", train_loss=tl, val_loss=vl, time_s=ts)
           for e, tl, vl, ts in [(10, 0.93, 1.03, 61.31), (15, 0.79, 1.01, 92.63), (20, 0.67, 1.06, 114.30),
                                 (25, 0.57, 1.11, 153.08), (30, 0.51, 1.17, 182.98)]],
          report_note="validation loss bottoms out near epoch 15; times on the authors' machine", varies=("epochs",)),
    Study(name="batch_size", model="small_cnn", table="general", question="Mini-batch size (the report discussed it without numbers)",
          variants=[_v(f"batch_{b}", f"--batch-size {b}") for b in (16, 32, 64, 128, 256)],
          report_note="no numbers in the report"),
    Study(name="vgg16", model="vgg16_cifar", table="general", question="The adapted VGG16 (73728->4096 FC) against the truncated one",
          variants=[_v("vgg16_cifar", "--model vgg16_cifar --epochs 40"), _v("vgg_truncated", "--model vgg_truncated --epochs 40")],
          report_note="vgg16_cifar: 40 epochs, ~1 h on a Colab GPU; slightly worse than the truncated model, smaller gap"),
]}


# Recipe overrides ablate accepts: config field -> (short tag for the folder name, flag).
OVERRIDES = {"epochs": ("e", "--epochs"), "weight_decay": ("wd", "--weight-decay"),
             "optimizer": ("opt", "--optimizer"), "lr": ("lr", "--lr")}


def overrides(args) -> dict[str, object]:
    """The recipe overrides given on the command line, in a fixed order."""
    return {name: getattr(args, name) for name in OVERRIDES if getattr(args, name, None) is not None}


def data_identity(args) -> dict[str, object]:
    """Everything besides the recipe that changes a variant's result."""
    synthetic = args.dataset == "synthetic"
    return {"dataset": args.dataset, "data_dir": None if synthetic else str(Path(args.data_dir).resolve()),
            "max_train": args.max_train, "synthetic_size": args.synthetic_size if synthetic else None,
            "extra": shlex.join(shlex.split(args.extra))}


def stored_identity(folder: Path) -> Optional[dict]:
    """The data identity a study folder was run with: its ablation.json, or, for a folder written
    before there was one, what its variants' config.json still say (dataset and --max-train)."""
    try:
        return json.loads((folder / IDENTITY_FILE).read_text())["data"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for config in sorted(folder.glob(f"*/{files.CONFIG}")):
        try:
            cfg = json.loads(config.read_text())
            return {"dataset": cfg["dataset"], "max_train": cfg.get("max_train", 0)}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def identity_difference(saved: dict, wanted: dict) -> Optional[str]:
    """'dataset synthetic, not imagefolder', or None when every field the folder recorded agrees."""
    for key, value in saved.items():
        if key in wanted and wanted[key] != value:
            return f"{key} {value!r}, not {wanted[key]!r}"
    return None


def recipe_folder(out: Path, study: Study, args) -> Path:
    """One folder per (study, overrides): `weight_decay-e10`, `dropout-wd0`."""
    tags = [f"{OVERRIDES[name][0]}{value:g}" if isinstance(value, float) else f"{OVERRIDES[name][0]}{value}"
            for name, value in overrides(args).items()]
    return out / "-".join([study.name, *tags])


def study_folder(out: Path, study: Study, args) -> tuple[Path, Optional[str]]:
    """The recipe folder, unless it holds results on other data: then a sibling named after this
    data (`dropout-e1-synthetic-3fa2c1`), so nothing is reused or overwritten across data, and
    the line that says why."""
    folder = recipe_folder(out, study, args)
    saved, wanted = stored_identity(folder), data_identity(args)
    difference = identity_difference(saved, wanted) if saved is not None else None
    if difference is None:
        return folder, None
    digest = hashlib.sha1(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:6]
    size = f"-n{args.max_train}" if args.max_train else ""
    sibling = folder.with_name(f"{folder.name}-{args.dataset}{size}-{digest}")
    return sibling, f"{folder.name} holds results on other data ({difference}): these train in {sibling.name}"


def claim_folder(folder: Path, study: Study, args) -> None:
    """Record the folder's identity before its first variant runs (a later run compares with it)."""
    record = folder / IDENTITY_FILE
    if not record.exists():
        files.atomic_write_json(record, {"study": study.name, "overrides": overrides(args), "data": data_identity(args)})


def train_args(study: Study, variant: Variant, args, out_dir: Path) -> list[str]:
    """The trainer command line of one variant (later flags win, so the variant's come last)."""
    cmd = ["--preset", "report", "--model", study.model, "--dataset", args.dataset,
           "--data-dir", str(Path(args.data_dir).resolve()),
           "--out-dir", str(out_dir), "--job-type", "ablation", "--wandb-group", study.name,
           "--wandb-name", f"{study.name}/{variant.name}"]
    if args.dataset == "synthetic":
        cmd += ["--synthetic-size", str(args.synthetic_size), "--split", "full"]
    if args.max_train:
        cmd += ["--max-train", str(args.max_train)]
    cmd += ["--trust-shared"] if getattr(args, "trust_shared", False) else []
    cmd += shlex.split(args.extra) + variant.flags
    for name, value in overrides(args).items():
        cmd += [OVERRIDES[name][1], str(value)]
    # a failed earlier attempt either resumes from its checkpoint or starts over
    cmd += ["--resume", "auto"] if out_dir.is_dir() and ckpt.find_latest(out_dir) else ["--overwrite"]
    return cmd


def chosen(study: Study, args) -> list[Variant]:
    return [v for v in study.variants if not args.variants or v.name in args.variants.split(",")]


def pending(study: Study, folder: Path, args) -> list[Variant]:
    """The chosen variants without a readable summary (a torn or corrupt one is run again)."""
    return [v for v in chosen(study, args) if load_run(folder / v.name) is None]


def lock_study(folder: Path, trust_shared: bool = False):
    """One ablate process per study folder: a second one would truncate the first one's logs and
    report its running variants as failed. Held until this process exits."""
    import fcntl
    files.make_dirs(folder)
    why = files.distrust(folder)
    if why and not trust_shared:
        raise RuntimeError(f"study folder {folder}: {why}, so another user could plant links or forged results in "
                           f"it: choose an --out of your own, or pass --trust-shared")
    handle = os.fdopen(files.open_no_follow(folder / ".ablate.lock", os.O_RDWR | os.O_CREAT), "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise RuntimeError(f"another dist_cifar.ablate is running in {folder}: wait for it, or choose another --out")
    _study_locks.append(handle)


_study_locks: list = []


def run_local(study: Study, folder: Path, args) -> dict[str, str]:
    """Run the unfinished variants one after another; name -> 'ok' | 'failed (...)'."""
    status = {}
    todo = pending(study, folder, args)
    for variant in chosen(study, args):
        if variant not in todo:
            print(f"[ablate] {study.name}/{variant.name}: done, skipped (its {files.SUMMARY} is there; delete "
                  f"{folder / variant.name} to run it again)", flush=True)
    for variant in todo:
        out_dir = folder / variant.name
        files.make_dirs(out_dir.parent)
        cmd = [sys.executable, "-m", "dist_cifar.train", *train_args(study, variant, args, out_dir)]
        print(f"[ablate] {study.name}/{variant.name}: {shlex.join(cmd[3:])}", flush=True)
        t0 = time.time()
        with files.open_log(out_dir.parent / f"{variant.name}.log") as log:
            trainer = subprocess.Popen(cmd, env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
            try:
                watch_trainer(trainer, log, f"{study.name}/{variant.name}")
                code = trainer.wait()
            finally:  # SIGTERM/Ctrl-C to ablate: the trainer checkpoints and stops too, never runs on alone
                if trainer.poll() is None:
                    trainer.terminate()
                    trainer.wait(timeout=120)
        status[variant.name] = "ok" if code == 0 else f"failed (exit {code}, see {variant.name}.log)"
        print(f"[ablate] {study.name}/{variant.name}: {status[variant.name]} in {time.time() - t0:.0f}s", flush=True)
    return status


def watch_trainer(trainer: subprocess.Popen, log, name: str) -> None:
    """Everything the trainer prints goes to the variant's log; its forecast (the ETA) and one line
    per epoch also come here, so a study that runs for hours says where it is."""
    for line in trainer.stdout:
        log.write(line)
        log.flush()
        if line.startswith("epoch ") or "an epoch here:" in line:
            print(f"[ablate] {name}: {line.strip().removeprefix('[dist_cifar] ')}", flush=True)


def trainer_env(**extra: str) -> dict[str, str]:
    """This environment, with this `dist_cifar` first on PYTHONPATH (a checkout run from elsewhere)."""
    path = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def submit_slurm(study: Study, folder: Path, args) -> Optional[str]:
    """One array task per unfinished variant; returns the job id."""
    todo = pending(study, folder, args)
    if not todo:
        return None
    files.make_dirs(folder)
    lines = [shlex.join(train_args(study, v, args, (folder / v.name).resolve())) for v in todo]
    variants_file = folder / "variants.txt"
    files.atomic_write_text(variants_file, "\n".join(lines) + "\n")
    cmd = ["sbatch", "--parsable", f"--array=0-{len(todo) - 1}", f"--chdir={Path.cwd()}",
           f"--output={folder.resolve()}/slurm-%A_%a.out", *shlex.split(args.sbatch_args),
           str(SLURM_DIR / "ablations.sbatch"), str(variants_file.resolve())]
    print(f"[ablate] {shlex.join(cmd)}", flush=True)
    # sbatch exports this environment to the tasks: this interpreter, and the package's preempt.sh
    env = trainer_env(PYTHON=sys.executable, DIST_CIFAR_SLURM_DIR=str(SLURM_DIR))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed: {' '.join(proc.stderr.split())}")
    job = proc.stdout.strip().split(";")[0]
    print(f"[ablate] submitted array job {job} ({len(todo)} variants)", flush=True)
    return job


def wait_slurm(job: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
        if not out.stdout.strip():
            return
        time.sleep(2)
    raise TimeoutError(f"array job {job} still running after {timeout_s:.0f}s")


# ------------------------------------------------------------------------------ report


SUMMARY_NUMBERS = ("train_accuracy", "test_accuracy", "total_time_s", "best_epoch")


def load_run(folder: Path) -> Optional[dict]:
    """A finished variant's summary and per-epoch records; None (run it again) when either is
    missing, torn or not what the trainer writes (a summary that is not an object of numbers)."""
    try:
        summary = best_weights(json.loads((folder / files.SUMMARY).read_text()))
        metrics = files.read_jsonl(folder / files.METRICS)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    numbers = [summary.get(key) for key in SUMMARY_NUMBERS]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers) or \
            not all(isinstance(r, dict) for r in metrics):
        return None
    return {"summary": summary, "metrics": metrics}


def fmt(x, digits=2) -> str:
    return "" if x is None else f"{x:.{digits}f}" if isinstance(x, (int, float)) else str(x)


def study_table(study: Study, runs: dict[str, Optional[dict]], status: dict[str, str]) -> list[str]:
    kind = study.table
    if kind == "accuracy":
        head = ["weight decay", "train", "validation", "test", "report train", "report val", "report test",
                "train-val gap (pts)"]
    elif kind == "loss":
        head = ["variant", "train loss", "validation loss", "report train", "report val", "val-train gap", "test acc %"]
    elif kind == "epochs":
        head = ["epochs", "train loss", "validation loss", "train time/s", "report train", "report val",
                "report time/s", "val-train gap", "best epoch"]
    else:
        head = ["variant", "train loss", "val loss", "min val loss (epoch)", "train acc %", "val acc %",
                "test acc %", "train time/s", "val-train gap"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in study.variants:
        run = runs.get(v.name)
        if run is None:
            state = status.get(v.name, "not run")
            rows.append(f"| {v.name} | " + " | ".join([state] + [""] * (len(head) - 2)) + " |")
            continue
        s, m = run["summary"], run["metrics"]
        last = m[-1] if m else {}
        tl, vl = last.get("train_loss"), last.get("val_loss")
        gap_loss = (vl - tl) if tl is not None and vl is not None else None
        r = v.report
        if kind == "accuracy":
            cells = [v.name.replace("wd_", ""), fmt(s["train_accuracy"]), fmt(s.get("val_accuracy")), fmt(s["test_accuracy"]),
                     fmt(r.get("train", r.get("note"))), fmt(r.get("val")), fmt(r.get("test")),
                     fmt(s["train_accuracy"] - s.get("val_accuracy") if s.get("val_accuracy") is not None else None)]
        elif kind == "loss":
            cells = [v.name, fmt(tl), fmt(vl), fmt(r.get("train_loss")), fmt(r.get("val_loss")), fmt(gap_loss),
                     fmt(s["test_accuracy"])]
        elif kind == "epochs":
            cells = [str(len(m)), fmt(tl), fmt(vl), fmt(s["total_time_s"]), fmt(r.get("train_loss")),
                     fmt(r.get("val_loss")), fmt(r.get("time_s")), fmt(gap_loss), str(s["best_epoch"] + 1)]
        else:
            best = min((x for x in m if "val_loss" in x), key=lambda x: x["val_loss"], default=None)
            cells = [v.name, fmt(tl), fmt(vl), f"{fmt(best['val_loss'])} ({best['epoch'] + 1})" if best else "",
                     fmt(s["train_accuracy"]), fmt(s.get("val_accuracy")), fmt(s["test_accuracy"]),
                     fmt(s["total_time_s"], 1), fmt(gap_loss)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def best_weights(summary: dict) -> dict:
    """The summary with the best weights' figures under their plain names (train_accuracy, ...);
    study folders written before the best_* names (0.x) hold them plain already."""
    out = dict(summary)  # TypeError when the summary is not an object: load_run calls it unreadable
    for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
        if f"best_{key}" in summary:
            out[key] = summary[f"best_{key}"]
    return out


def write_report(study: Study, folder: Path, status: dict[str, str], args) -> Path:
    from . import plot
    folder.mkdir(parents=True, exist_ok=True)
    runs = {v.name: load_run(folder / v.name) for v in study.variants}
    done = {k: r for k, r in runs.items() if r}
    png = folder / f"{study.name}_loss_curves.png"
    if done:
        plot.loss_overlay({k: r["metrics"] for k, r in done.items()}, png, f"{folder.name}: train (solid) and validation (dashed) loss")
    cfg = json.loads((folder / next(iter(done)) / files.CONFIG).read_text()) if done else {}
    given = overrides(args)
    recipe = ("recipe overrides for every variant: " + ", ".join(f"`{OVERRIDES[k][1]} {v}`" for k, v in given.items())
              if given else "no recipe overrides (the report preset as is)")
    wd = "per variant" if study.name == "weight_decay" else cfg.get("weight_decay", "?")
    as_run = (f"As run: optimizer {cfg['optimizer']}, lr {cfg['lr']}, weight decay {wd}, batch {cfg['batch_size']}, "
              f"mean/std 0.5, seed {cfg['seed']}; data: {cfg['data_source']}, split {cfg['split_sizes']}, "
              f"{cfg['epochs']} epochs unless the variant sets them. Accuracies are the best-validation-loss "
              f"weights' (the report's compute_accuracy); losses are the last epoch's." if done else
              "No variant has finished yet: the settings, numbers and curves appear once one has (the failures "
              "and their logs are named below).")
    lines = [f"# Ablation: {folder.name}", "", study.question, "", f"Model `{study.model}`, report preset, {recipe}. "
             f"{as_run}", ""]
    lines += study_table(study, runs, status)
    if study.report_note:
        lines += ["", f"Report: {study.report_note}."]
    failed = [k for k, v in status.items() if v != "ok"]
    if failed:
        lines += ["", "Failed this time (re-run the same command to retry): " + ", ".join(f"`{k}` {status[k]}" for k in failed)]
    if done:
        lines += ["", f"![{folder.name} loss curves]({png.name})"]
    path = folder / "report.md"
    files.atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def write_index(out: Path) -> Path:
    """<out>/REPORT.md: every study folder found under <out>, overrides included. The verdict
    table, when <out>/VERDICTS.md exists (written by hand from these tables), opens it."""
    lines = ["# The report, regenerated", ""]
    verdicts = out / "VERDICTS.md"
    if verdicts.exists():
        lines += [verdicts.read_text().strip(), ""]
    lines += ["## Studies", "", "Each folder reruns one of the report's ablations with `python -m dist_cifar.ablate`, "
              "next to the report's numbers; a suffix names the recipe overrides (`-e10`: 10 epochs, `-wd0`: weight "
              "decay 0).", ""]
    for study in STUDIES.values():
        for folder in sorted(out.glob(f"{study.name}*/report.md")):
            name = folder.parent.name
            if name == study.name or name[len(study.name)] == "-":
                lines.append(f"- [{name}]({name}/report.md): {study.question}")
    path = out / "REPORT.md"
    files.atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# Flags whose value is itself a flag list: `--extra "--no-download"` would otherwise be read by
# argparse as an option of its own ("expected one argument").
VERBATIM_VALUES = ("--extra", "--sbatch-args")


def glue_verbatim(argv: list[str]) -> list[str]:
    glued, words = [], iter(argv)
    for word in words:
        value = next(words, None) if word in VERBATIM_VALUES else None
        glued.append(word if value is None else f"{word}={value}")
    return glued


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dist_cifar.ablate", description=__doc__.splitlines()[0])
    p.add_argument("study", choices=[*STUDIES, "all"])
    p.add_argument("--epochs", type=int, default=None, help="override every variant's epochs")
    p.add_argument("--weight-decay", type=float, default=None, help="override every variant's weight decay")
    p.add_argument("--optimizer", default=None, choices=["adam", "adamw", "sgd"], help="override every variant's optimizer")
    p.add_argument("--lr", type=float, default=None, help="override every variant's learning rate")
    p.add_argument("--max-train", type=int, default=0, help="train on the first N images of the split")
    p.add_argument("--dataset", default="auto", choices=["auto", "cifar10", "imagefolder", "synthetic"])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--synthetic-size", type=int, default=2000)
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--variants", default="", help="comma-separated subset of variant names")
    p.add_argument("--extra", default="", help="extra trainer flags for every variant, e.g. '--device cuda'")
    p.add_argument("--slurm", action="store_true", help="submit a SLURM array job, one task per variant")
    p.add_argument("--wait", action="store_true", help="with --slurm: wait for the array, then write the report")
    p.add_argument("--slurm-timeout", type=float, default=24 * 3600)
    p.add_argument("--sbatch-args", default="", help="extra sbatch flags, e.g. '--gres=gpu:1 --time=2:00:00'")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report from finished runs")
    p.add_argument("--trust-shared", action="store_true",
                   help="use a study folder (and data) another user owns or could write into (the trainer's --trust-shared)")
    args = p.parse_args(glue_verbatim(list(sys.argv[1:] if argv is None else argv)))
    studies = list(STUDIES.values()) if args.study == "all" else [STUDIES[args.study]]
    unknown = set(filter(None, args.variants.split(","))) - {v.name for s in studies for v in s.variants}
    if unknown:
        print(f"error: unknown variant(s) {sorted(unknown)}; known: "
              f"{', '.join(v.name for s in studies for v in s.variants)}", file=sys.stderr)
        return 2
    for study in list(studies):  # weight_decay and epochs vary those fields themselves
        clash = [OVERRIDES[name][1] for name in study.varies if name in overrides(args)]
        if clash and args.study == study.name:
            print(f"error: the {study.name} study sets {clash[0]} per variant (the report's rows): drop {clash[0]}",
                  file=sys.stderr)
            return 2
        if clash:
            print(f"[ablate] skipping the {study.name} study: it sets {clash[0]} per variant", flush=True)
            studies.remove(study)
    try:
        from .config import ConfigError, make_config
        make_config(**{name: value for name, value in overrides(args).items()})  # before any variant starts
        shlex.split(args.extra)
    except (ConfigError, ValueError) as exc:  # ValueError: an unbalanced quote in --extra
        print(f"error: {exc if isinstance(exc, ConfigError) else f'--extra {args.extra!r}: {exc}'}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()  # relative to where the command was typed, whoever runs the variants
    args.out = str(out)
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} is a file: choose a folder", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds run_local, which stops the trainer
    failures = 0
    for study in studies:
        status: dict[str, str] = {}
        folder, moved = study_folder(out, study, args)
        if args.report_only and not folder.is_dir():
            print(f"[ablate] {study.name}: nothing run yet in {folder}", flush=True)
            continue  # nothing was run for this study with these overrides
        if not args.report_only:
            try:
                lock_study(folder, args.trust_shared)
            except RuntimeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            if moved:
                print(f"[ablate] {moved}", flush=True)
            claim_folder(folder, study, args)
            if args.slurm:
                try:
                    job = submit_slurm(study, folder, args)
                except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:  # no sbatch, a refused request
                    print(f"error: {exc}", file=sys.stderr)
                    return 2
                if job and not args.wait:
                    print(f"[ablate] when job {job} is done: python -m dist_cifar.ablate {study.name} --report-only "
                          f"--out {args.out}")
                    continue
                if job:
                    wait_slurm(job, args.slurm_timeout)
                    status = {v.name: "ok" if (folder / v.name / files.SUMMARY).exists() else "failed (SLURM task)"
                              for v in chosen(study, args)}
            else:
                status = run_local(study, folder, args)
        failed = sum(1 for v in status.values() if v != "ok")
        failures += failed
        report = folder / "report.md"
        if failed and report.exists():  # a failed rerun never replaces a table that had numbers
            print(f"[ablate] {study.name}: {failed} variant(s) failed; kept the previous {report}", flush=True)
        else:
            print(f"[ablate] wrote {write_report(study, folder, status, args)}", flush=True)
    if args.study == "all" and out.is_dir() and not failures:
        print(f"[ablate] wrote {write_index(out)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
