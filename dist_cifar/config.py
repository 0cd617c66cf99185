"""Training configuration: one dataclass, presets, and a CLI generated from it.

Every field of `TrainConfig` carries a docstring (the string literal under it); the
command line is built from the fields and those docstrings, so there is no second list
of flags to keep in sync. Precedence: dataclass default < `--preset` < explicit flags.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import json
import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .data import REPORT_TRAIN, report_split_problem


class ConfigError(ValueError):
    """A bad flag or an impossible combination; the message is one line naming the fix."""


@dataclass
class TrainConfig:
    # ---- model -------------------------------------------------------------------
    model: str = "small_cnn"
    """Model name from the registry: linear, simple_cnn, small_cnn, vgg_truncated, vgg16_cifar."""
    batchnorm: bool = True
    """small_cnn only: BatchNorm(16) before conv2 (the report's batch-norm ablation switch)."""
    dropout: bool = True
    """small_cnn only: Dropout(0.35) after conv2 (the report's dropout ablation switch)."""
    pooling: bool = True
    """small_cnn only: the two 2x2 max-pools (the report's pooling ablation switch)."""

    # ---- data --------------------------------------------------------------------
    dataset: str = "cifar10"
    """Data source: cifar10 (official pickles), imagefolder (train/<class>/*, test/<class>/* or a .tar.gz of that tree), synthetic (generated, learnable), auto (cifar10, else imagefolder, else synthetic with a loud warning)."""
    data_dir: str = "data"
    """Folder holding cifar-10-batches-py or cifar-10-python.tar.gz (cifar10), or the image tree / its .tar.gz (imagefolder; may be the .tar.gz path itself)."""
    download: bool = True
    """cifar10/auto: when --data-dir holds no CIFAR-10, download the official archive (MD5-checked; DIST_CIFAR_CIFAR10_URL/_MD5 name a mirror); --no-download fails instead."""
    synthetic_size: int = 2000
    """synthetic: number of training images; validation and test get a quarter of it each."""
    split: str = "full"
    """Split protocol: report (train images 0..19999 / val 20000..24999 / test 0..4999, docs/report_protocol.md) or full (all 50k train less --val-size held out with a fixed seed, all 10k test)."""
    val_size: int = -1
    """full split: images held out of train for validation (-1: 5000 for CIFAR-10-sized data, 10%% of smaller image sets, a quarter of --synthetic-size for synthetic; 0: none)."""
    max_train: int = 0
    """Use only the first N training images of the split (0: all); for quick ablations."""
    normalize: str = "cifar"
    """Normalisation: half (mean=std=0.5 per channel, the report's) or cifar (CIFAR-10 channel mean/std)."""
    augment: bool = False
    """Random crop (4-pixel zero padding) + horizontal flip on training batches."""
    loader: str = "tensor"
    """Training data path: tensor (whole uint8 dataset on the device, batched augmentation, no workers) or torch (torchvision transforms + DataLoader)."""
    num_workers: int = 2
    """torch loader: DataLoader worker processes (persistent, pinned memory on CUDA)."""

    # ---- recipe ------------------------------------------------------------
    epochs: int = 10
    """Number of training epochs."""
    batch_size: int = 128
    """Training batch size PER PROCESS; the global batch is this times the world size (0: derived from --global-batch-size)."""
    global_batch_size: int = 0
    """Training batch size over ALL processes, divided evenly among them, so 1, 4 or 8 GPUs train the same recipe (0: --batch-size x world size). Giving both is an error unless they agree."""
    eval_batch_size: int = 512
    """Evaluation batch size per process."""
    steps_per_epoch: int = 0
    """Cap the training steps of each epoch (0: a full pass); for smoke runs and benchmarks."""
    optimizer: str = "adam"
    """Optimizer: adam, adamw or sgd (with --momentum, Nesterov)."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Weight decay (Adam: L2 added to the gradient, as in the report; AdamW: decoupled)."""
    momentum: float = 0.9
    """sgd: Nesterov momentum."""
    schedule: str = "constant"
    """LR schedule per step: constant, onecycle (warm-up then anneal) or cosine."""
    warmup_epochs: float = 0.0
    """constant and cosine: raise the lr linearly from --warmup-lr to --lr over this many epochs of optimizer steps (fractions allowed), then hold it (constant) or anneal it to 0 (cosine); 0: no warm-up (onecycle has its own)."""
    warmup_lr: float = 0.0
    """The lr of the first warm-up step (--warmup-epochs)."""
    ema: float = 0.0
    """Keep an exponential moving average of the weights with this decay (e.g. 0.999; 0: off), warmed up as timm's (min(DECAY, (1+n)/(10+n)) at update n); evaluated each epoch (ema_val_loss, ema_val_accuracy), checkpointed and resumed; under hybrid and fsdp each rank averages its own shard."""
    eval_weights: str = "model"
    """Which weights pick best.pt and take the final evaluation: model (the trained ones) or ema (the average; needs --ema)."""
    profile_steps: str = ""
    """FIRST:END: torch.profiler traces of optimizer steps FIRST..END-1 (counted from the run's start), one Chrome trace per rank in <out>/profile/rank<R>.json (Perfetto), and a per-rank table of step time, data wait, compute and communication at the end of the window; empty: off."""
    target_accuracy: float = 0.0
    """Record when validation accuracy (%) first reaches this: the training time, epoch and optimizer step, in summary.json and W&B (time_to_target_s, target_epoch, target_step); 0: off. Airbench's figure of merit."""
    grad_accum_steps: int = 1
    """Micro-batches of --batch-size per optimizer step, gradients synchronised on the last one only: the global batch is --batch-size x processes x this. The schedule, --steps-per-epoch, checkpoints and the forecast count optimizer steps."""
    clip_grad_norm: float = 0.0
    """Clip the global L2 norm of all gradients to this before each optimizer step (0: off): over every parameter of the plain model under every design (the hybrid's head slices and FSDP2's shards are summed over the ranks). The pre-clip norm is logged per epoch (grad_norm_mean, grad_norm_max)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    tta_flip: bool = False
    """Evaluate each image and its mirror and average the logits (test-time augmentation; twice the evaluation cost)."""
    seed: int = 42
    """Seed for model init, shuffling and augmentation (augmentation also mixes in the rank)."""
    deterministic: bool = False
    """cuDNN deterministic algorithms and no benchmark autotuning (the report sets this)."""

    # ---- speed (devices, precision, compile) -------------------------------------------------
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu or cuda."""
    precision: str = "auto"
    """fp32, bf16 or fp16 autocast (fp16 uses a GradScaler); auto: bf16 on GPUs that support it, fp32 on CPU."""
    tf32: bool = False
    """Allow TF32 matmuls/convolutions on the fp32 path (Ampere and newer GPUs)."""
    channels_last: Optional[bool] = None
    """Model and inputs in channels_last memory format (default: on with GPUs, off on CPU)."""
    compile: Optional[bool] = None
    """torch.compile the model (DDP keeps its bucketed overlap; default: on with GPUs, off on CPU); the compiling epoch is reported apart."""
    compile_mode: str = "default"
    """torch.compile mode: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs."""
    threads: int = 0
    """CPU threads per process for torch (0: the CPUs this process may use (affinity, cgroup quota, SLURM_CPUS_PER_TASK) over the node's processes, less the machine's load at start, or OMP_NUM_THREADS when set; config.json records the number). Results depend on it: the same seed gives slightly different numbers with 1 and 2 threads."""
    optimizer_kernel: str = "auto"
    """Optimizer implementation: fused (one kernel steps every parameter), foreach (batched per-tensor ops), loop (one parameter at a time, torch's CPU default) or auto (fused on GPUs, loop on CPU; foreach for SGD under --parallel fsdp, which has no fused SGD for sharded parameters)."""
    resolve_as: str = "auto"
    """Resolve every auto setting as on this device type while the run stays on its own device: cuda rehearses a GPU's configuration (bf16, channels_last, compile, fused optimizers, an agreement every 25 steps) on a CPU with gloo, e.g. a cluster job on a laptop before submitting it; auto: the run's own device."""

    # ---- distributed -------------------------------------------------------------
    backend: str = "auto"
    """Process-group backend: auto (nccl with CUDA, else gloo), nccl or gloo."""
    dist_timeout: float = 300.0
    """Seconds a collective may wait before the job fails instead of hanging."""
    parallel: str = "ddp"
    """How the model is spread over the ranks: ddp (every rank holds the whole model; DDP all-reduces every gradient), hybrid (convolutions data-parallel under DDP, the classifier's first two Linear layers sharded over the ranks: features are all-gathered, not the 302M-parameter FC1's gradients; README "Past one GPU"), fsdp (FSDP2: every parameter sharded, bf16 all-gather under bf16, fp32 reduce-scatter; for very large global batches), auto (measure the links at start, train the design dist_cifar.cost predicts fastest that fits; recorded in config.json as parallel_auto)."""
    tp_size: int = 0
    """--parallel hybrid: how many ranks share one copy of the head, sharded among them (the tp group; its features and outputs travel only inside it); the world is split into world/tp such groups, whose slices are averaged with each other (2-D layout). 0: the ranks of a node (LOCAL_WORLD_SIZE), or every rank when each node runs one; the world size: the flat layout."""
    sync_bn: bool = False
    """Convert BatchNorm to SyncBatchNorm (batch statistics over all ranks)."""
    ddp_bucket_mb: float = 25.0
    """DDP gradient bucket size in MB."""
    ddp_grad_as_bucket_view: bool = True
    """DDP gradient_as_bucket_view: gradients alias the buckets (one copy fewer)."""
    ddp_static_graph: bool = False
    """DDP static_graph: the graph is the same every step."""
    ddp_single: bool = False
    """Wrap the model in DDP (with its comm hook) even with one process; by default a world of one trains the bare module: no hook, no bucket copies, no DDP bookkeeping per step."""
    ddp_comm_hook: str = "none"
    """DDP communication hook: none (DDP's built-in fp32 all-reduce, comm_s not measured), allreduce (the same all-reduce as a timed Python hook), fp16 or bf16 (compressed, timed)."""

    # ---- logging (outputs, W&B) --------------------------------------------------------
    out_dir: str = ""
    """Output folder (default runs/<model>-<timestamp>-<4 random hex digits>); locked for the run's life."""
    overwrite: bool = False
    """Allow writing into an existing non-empty --out-dir (its old files are replaced)."""
    trust_shared: bool = False
    """Use an out dir, checkpoint, data folder, image set or cache that another local user owns or could have replaced (group/other-writable, or in a folder others may write without the sticky bit); without it such paths are refused or passed over with one line (docs/reliability.md)."""
    quiet: bool = False
    """Print only the end-of-run summary and errors."""
    progress_every: int = 20
    """Read the running loss back from the device every N steps for the progress bar."""
    log_every_steps: int = 0
    """Every N optimizer steps, one row of per-step figures (loss, lr, images/s, MFU, gradient norm) to step_metrics.jsonl and W&B; each row costs rank 0 one device sync, the steps between cost none (0: about four rows per epoch; -1: off)."""
    peak_tflops: float = 0.0
    """The device's peak TFLOP/s that MFU is measured against (0: the datasheet's dense peak for the resolved precision where the device is known: H200, H100, A100, L40S, V100; otherwise MFU is not reported)."""
    wandb: str = "auto"
    """Weights & Biases: auto (online with credentials or as WANDB_MODE says, offline without, off if wandb is missing), online, offline or off."""
    wandb_init_timeout: float = 25.0
    """Seconds W&B may take to start online; past that (no network, unreachable server) the run logs offline instead of waiting."""
    wandb_project: str = "dist_cifar"
    """W&B project."""
    wandb_entity: str = ""
    """W&B entity (team or user; empty: your default)."""
    wandb_group: str = ""
    """W&B group (ablation studies set it to the study name)."""
    wandb_name: str = ""
    """W&B run name (empty: the out dir's name)."""
    wandb_tags: str = ""
    """W&B tags, comma separated."""
    job_type: str = "train"
    """W&B job_type: train, benchmark or ablation."""

    # ---- checkpoints (fault tolerance) -----------------------------------------------------------
    checkpoint_every: int = 1
    """Write a checkpoint every N epochs (0: no epoch cadence). With this or --checkpoint-interval-min set, the run also saves after its last epoch; preemption always saves. Writes run in the background."""
    checkpoint_interval_min: float = 10.0
    """Also write a checkpoint at the end of an epoch when this many minutes passed since the last one (0: off). Both 0: only on preemption (benchmarks)."""
    checkpoint_every_steps: int = 0
    """Also write a checkpoint every N training steps inside an epoch (0: off)."""
    final_eval: bool = True
    """At the end, evaluate the kept weights on train/val/test (accuracies, confusion matrix); off: benchmarks that time training only, and the summary has no accuracies."""
    save_best: bool = True
    """Keep best.pt (the lowest-validation-loss weights) and evaluate them at the end; off: the last weights."""
    keep_last: int = 2
    """Keep the newest K committed checkpoints, prune older ones."""
    resume: str = "auto"
    """auto (newest valid checkpoint in --out-dir, if any), none, or a checkpoint path."""
    guard_every: int = 0
    """Every N steps all ranks agree (one all-reduce) on non-finite loss and preemption; larger N avoids a host sync per step on GPUs (0: 1 on CPU, 25 on GPUs). Every step's loss is still checked, on the device."""
    max_skipped_steps: int = 20
    """fp16: stop after this many GradScaler-skipped (overflow) steps in a row."""
    record_step_losses: bool = False
    """Write rank 0's loss of every step to step_losses.jsonl (resume tests, debugging)."""

    # ---- preset (applied before explicit flags) ------------------------------------
    preset: str = ""
    """Preset applied before explicit flags: report (the report's protocol), fast (vgg16_cifar speed recipe), smoke (seconds-long CPU check)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": ("cifar10", "imagefolder", "synthetic", "auto"),
    "split": ("report", "full"),
    "normalize": ("half", "cifar"),
    "loader": ("tensor", "torch"),
    "optimizer": ("adam", "adamw", "sgd"),
    "schedule": ("constant", "onecycle", "cosine"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "optimizer_kernel": ("auto", "fused", "foreach", "loop"),
    "resolve_as": ("auto", "cpu", "cuda"),
    "eval_weights": ("model", "ema"),
    "compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "backend": ("auto", "nccl", "gloo"),
    "ddp_comm_hook": ("none", "allreduce", "fp16", "bf16"),
    "parallel": ("ddp", "hybrid", "fsdp", "auto"),
    "wandb": ("auto", "online", "offline", "off"),
    "job_type": ("train", "benchmark", "ablation"),
    "preset": ("", "report", "fast", "smoke"),
}

# The report protocol (docs/report_protocol.md): the notebook's split, preprocessing, batch sizes,
# optimizer and seed. Epochs are the report's usual 10.
PRESETS: dict[str, dict[str, Any]] = {
    "report": dict(
        split="report", normalize="half", augment=False, batch_size=32, eval_batch_size=128,
        optimizer="adam", lr=1e-3, weight_decay=0.01, schedule="constant",
        label_smoothing=0.0, seed=42, deterministic=True, epochs=10,
    ),
    # vgg16_cifar at speed: big per-GPU batch to amortise the 73728x4096 FC's weight traffic,
    # bf16 everywhere incl. gradients on the wire, OneCycle so large batches still converge, and
    # the design --parallel auto measures as fastest (docs/parallel.md: it picked the measured
    # winner on both sides of the flat/2-D crossover on two emulated hosts).
    "fast": dict(
        model="vgg16_cifar", parallel="auto", split="full", val_size=0, normalize="cifar", augment=True,
        global_batch_size=512, eval_batch_size=1024, optimizer="adamw", lr=2e-3, weight_decay=0.05,
        schedule="onecycle", label_smoothing=0.1, epochs=12, tta_flip=True, precision="bf16",
        channels_last=True, compile=True, loader="tensor", ddp_comm_hook="bf16",
        ddp_static_graph=False, guard_every=25, progress_every=50, checkpoint_every=0, save_best=False,
    ),
    "smoke": dict(
        dataset="synthetic", synthetic_size=512, epochs=2, batch_size=64, split="full",
    ),
}



def field_docs(cls=TrainConfig) -> dict[str, str]:
    """Map each field name to the docstring written under it in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
            docs[node.target.id] = str(nxt.value.value).strip()
    return docs


def field_groups(cls=TrainConfig) -> dict[str, str]:
    """Map each field name to its section title, the `# ---- title ---` comment above it, so
    --help groups flags by concern."""
    groups, current = {}, "other"
    for line in inspect.getsource(cls).splitlines():
        section = re.match(r"\s*# ---- (.+?) -+$", line)
        if section:
            current = section.group(1)
        field = re.match(r"\s{4}(\w+): ", line)
        if field:
            groups[field.group(1)] = current
    return groups


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line naming it and the closest valid one (no usage dump),
    and abbreviations are refused (`--epoch` must not silently mean `--epochs`)."""

    def error(self, message: str):
        raise ConfigError(self.explain(message))

    def explain(self, message: str) -> str:
        known = [o for action in self._actions for o in action.option_strings]
        if message.startswith("unrecognized arguments:"):
            flags = [w.split("=")[0] for w in message.split(":", 1)[1].split() if w.startswith("-")]
            hints = []
            for flag in flags or message.split(":", 1)[1].split()[:1]:
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
                hints.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
            return f"unknown flag {', '.join(hints)}; see --help"
        return f"{message}; see --help"


def build_parser(prog: str = "python -m dist_cifar.train") -> argparse.ArgumentParser:
    from . import __version__
    parser = OneLineParser(
        prog=prog, usage=f"{prog} [--preset {{report,fast,smoke}}] [--model NAME] [flags, grouped below]",
        description=f"dist_cifar {__version__}: train a CIFAR-10 model, one process or one per GPU under torchrun.",
        argument_default=argparse.SUPPRESS,  # so only flags actually given override presets
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"dist_cifar {__version__}")
    docs, groups = field_docs(), field_groups()
    sections: dict[str, argparse._ArgumentGroup] = {}
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        title = groups.get(f.name, "other")
        if title not in sections:
            sections[title] = parser.add_argument_group(title)
        help_text = docs.get(f.name, "") + f" (default: {getattr(defaults, f.name)!r})"
        kwargs: dict[str, Any] = dict(help=help_text.replace("%", "%%"), dest=f.name)
        if f.type in ("bool", bool, "Optional[bool]"):  # Optional: None means auto (runtime.py)
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}[str(f.type)]
            kwargs["metavar"] = f.name.upper()
            if f.name in CHOICES:
                kwargs["choices"] = CHOICES[f.name]
                kwargs.pop("metavar")
        sections[title].add_argument(flag_name(f.name), **kwargs)
    parser.add_argument("--config", default="", metavar="FILE",
                        help="read flags from a TOML or JSON file (a run's own config.json reruns it); precedence: "
                             "defaults < --preset < this file < flags on the command line")
    parser.add_argument("--print-config", action="store_true", default=False,
                        help="print the resolved config and exit (--config reads it back)")
    parser.add_argument("--format", choices=("json", "toml"), default="json", help="--print-config's format")
    return parser


# What config.json holds besides the fields: what only the running job knew (train.describe).
# A config file may carry them (a run's own config.json); they are not settings and are skipped.
RUN_FACTS = ("world_size", "device_name", "mfu_peak_tflops", "mfu_peak_source", "torch_version", "git_commit",
             "dist_cifar_version", "num_params", "parallel_resolved", "tp_resolved", "wire_predicted",
             "precision_resolved", "backend_resolved", "data_source",
             "steps_per_epoch_resolved", "split_sizes", "parallel_auto")


def read_config_file(path: str) -> dict[str, Any]:
    """The fields a TOML or JSON file sets (a [train] table, or top-level keys). An unknown key, a
    value of the wrong type or an unreadable file is one line naming it."""
    import tomllib
    where = Path(path)
    try:
        text = where.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror})") from None
    try:
        if where.suffix == ".json" or text.lstrip()[:1] == b"{":
            values = json.loads(text)
        else:
            values = tomllib.loads(text.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path} is neither valid TOML nor JSON ({str(exc).splitlines()[0][:120]})") from None
    if isinstance(values, dict) and isinstance(values.get("train"), dict) and len(values) == 1:
        values = values["train"]
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must hold a table (TOML) or an object (JSON) of settings")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    settings = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in RUN_FACTS:
            continue
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
            raise ConfigError(f"--config {path}: unknown setting {key!r}" + (f" (did you mean {close[0]!r}?)" if close
                                                                               else "") + "; see --help for the fields")
        settings[name] = coerce(path, name, str(fields[name].type), value)
    return settings


def coerce(path: str, name: str, kind: str, value: Any) -> Any:
    """A file's value as the field's type (TOML/JSON ints are fine where a float is due)."""
    if value is None and kind.startswith("Optional"):
        return None
    ok = {"bool": isinstance(value, bool), "Optional[bool]": isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str)}.get(kind, False)
    if not ok:
        raise ConfigError(f"--config {path}: {name} = {value!r} is not a {kind.replace('Optional[', '').rstrip(']')}")
    return float(value) if kind == "float" else value


def config_from_args(args: dict[str, Any]) -> TrainConfig:
    """Parsed flags (only those given) over the --config file over the preset over the defaults."""
    args = dict(args)
    args.pop("print_config", None)
    args.pop("format", None)
    path = args.pop("config", "")
    values = {**(read_config_file(path) if path else {}), **args}
    return make_config(**values)


def to_toml(cfg: TrainConfig) -> str:
    """The config as TOML that --config reads back to the same config (None, an auto value, is left
    out: the default)."""
    lines = ["# dist_cifar config: python -m dist_cifar.train --config THIS_FILE [flags that win]"]
    for key, value in cfg.to_dict().items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, float):
            text = repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf" if value < 0 else "nan")
        elif isinstance(value, int):
            text = str(value)
        else:
            text = json.dumps(value)  # a TOML basic string: the same escapes
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def parse_command(argv: Optional[list[str]] = None) -> tuple[TrainConfig, str]:
    """CLI -> (validated TrainConfig, --print-config's format or '' when not given). Raises
    ConfigError (one line) on bad input. Resolving the auto values is runtime.py's job (it imports
    this module)."""
    args = vars(build_parser().parse_args(argv))
    print_format = args.get("format", "json") if args.get("print_config") else ""
    return config_from_args(args), print_format


def parse_config(argv: Optional[list[str]] = None) -> TrainConfig:
    """CLI -> validated TrainConfig (--print-config is the entry point's to act on)."""
    return parse_command(argv)[0]


def flag_problem(argv: list[str]) -> Optional[str]:
    """The one-line error the trainer would give for these flags, or None: launchers check before
    starting torchrun, whose failure report would bury the line under 40 others."""
    try:
        config_from_args(vars(build_parser().parse_args(argv)))
    except ConfigError as exc:
        return str(exc)
    return None


def parse_window(spec: str) -> Optional[tuple[int, int]]:
    """'A:B' -> (A, B) with 0 <= A < B; '' -> None. Raises ValueError naming the problem."""
    if not spec:
        return None
    match = re.fullmatch(r"(\d+):(\d+)", spec.strip())
    if not match or int(match.group(1)) >= int(match.group(2)):
        raise ValueError(f"--profile-steps takes FIRST:END optimizer steps with FIRST < END (e.g. 2:4), got {spec!r}")
    return int(match.group(1)), int(match.group(2))


def make_config(**overrides: Any) -> TrainConfig:
    """Defaults, then the named preset, then `overrides`; validated."""
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    preset = overrides.get("preset", "")
    if preset and preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r} is not one of: {', '.join(PRESETS)}")
    values = dict(PRESETS.get(preset, {}))
    if "batch_size" in overrides and "global_batch_size" not in overrides:
        values.pop("global_batch_size", None)  # an explicit per-process batch beats a preset's global one
    values.update(overrides)
    if values.get("parallel") == "fsdp" and "ddp_comm_hook" not in overrides:
        values.pop("ddp_comm_hook", None)  # a preset's DDP hook; FSDP2 reduces in fp32 and has none
    if values.get("global_batch_size") and "batch_size" not in overrides:
        values["batch_size"] = 0  # derived from the global batch once the world size is known
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Reject impossible values before any work, naming the flag to change."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag_name(f.name)} must be a finite number, got {value}")
    for name, options in CHOICES.items():
        if getattr(cfg, name) not in options:
            raise ConfigError(f"{flag_name(name)} {getattr(cfg, name)!r} is not one of: "
                              f"{', '.join(o for o in options if o) or 'none'}")
    positive = ("epochs", "eval_batch_size", "synthetic_size", "keep_last", "progress_every", "max_skipped_steps")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{flag_name(name)} must be > 0, got {getattr(cfg, name)}")
    # counts that no run reaches; larger ones only overflow a schedule or a step counter later
    ceilings = {"epochs": 10**6, "batch_size": 2**24, "eval_batch_size": 2**24, "global_batch_size": 2**26,
                "synthetic_size": 10**8, "keep_last": 10**9, "steps_per_epoch": 10**9}
    for name, ceiling in ceilings.items():
        if getattr(cfg, name) > ceiling:
            raise ConfigError(f"{flag_name(name)} must be at most {ceiling:,}, got {getattr(cfg, name):,}")
    if cfg.batch_size <= 0 and not cfg.global_batch_size:
        raise ConfigError(f"--batch-size must be > 0 (or give --global-batch-size), got {cfg.batch_size}")
    if cfg.wandb_init_timeout <= 0:
        raise ConfigError(f"--wandb-init-timeout must be > 0 seconds, got {cfg.wandb_init_timeout}")
    non_negative = ("steps_per_epoch", "max_train", "num_workers", "checkpoint_every", "checkpoint_interval_min",
                    "global_batch_size", "guard_every",
                    "checkpoint_every_steps", "threads", "weight_decay", "ddp_bucket_mb")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{flag_name(name)} must be >= 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.warmup_epochs <= cfg.epochs or not math.isfinite(cfg.warmup_epochs):
        raise ConfigError(f"--warmup-epochs must be in 0..--epochs ({cfg.epochs}), got {cfg.warmup_epochs}")
    if cfg.warmup_epochs and cfg.schedule == "onecycle":
        raise ConfigError("--warmup-epochs with --schedule onecycle: onecycle warms up by itself (its first quarter); "
                          "choose constant or cosine, or drop --warmup-epochs")
    try:
        parse_window(cfg.profile_steps)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not 0 <= cfg.ema < 1:
        raise ConfigError(f"--ema is a decay in [0, 1) (0: off; e.g. 0.999), got {cfg.ema}")
    if cfg.eval_weights == "ema" and not cfg.ema:
        raise ConfigError("--eval-weights ema needs --ema DECAY (the average to evaluate)")
    if cfg.log_every_steps < -1:
        raise ConfigError(f"--log-every-steps must be >= -1 (0: about four rows per epoch; -1: off), got {cfg.log_every_steps}")
    if not 0 <= cfg.peak_tflops <= 1e6:
        raise ConfigError(f"--peak-tflops is the device's peak in TFLOP/s (0: from the device's datasheet), got {cfg.peak_tflops}")
    if not 0 <= cfg.target_accuracy <= 100:
        raise ConfigError(f"--target-accuracy is a validation accuracy in % (0..100; 0: off), got {cfg.target_accuracy}")
    if not 1 <= cfg.grad_accum_steps <= 1024:
        raise ConfigError(f"--grad-accum-steps must be in 1..1024, got {cfg.grad_accum_steps}")
    if not (0 <= cfg.clip_grad_norm < math.inf):
        raise ConfigError(f"--clip-grad-norm must be a finite number >= 0 (0: off), got {cfg.clip_grad_norm}")
    if not 0 <= cfg.warmup_lr <= 1e4:
        raise ConfigError(f"--warmup-lr must be in [0, 1e4], got {cfg.warmup_lr}")
    if cfg.val_size < -1:
        raise ConfigError(f"--val-size must be >= 0 (or -1 for the default), got {cfg.val_size}")
    if not cfg.lr > 0:
        raise ConfigError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.lr > 1e4 or cfg.weight_decay > 1e4:  # float32 arithmetic overflows long before 1e308
        raise ConfigError(f"--lr {cfg.lr:g} / --weight-decay {cfg.weight_decay:g}: values above 1e4 overflow "
                          f"float32 training; use a sane value (the report's weight decays are 0..1)")
    if not 0 <= cfg.seed < 2**32:  # numpy's and every RNG's range
        raise ConfigError(f"--seed must be in 0..{2**32 - 1}, got {cfg.seed}")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ConfigError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if cfg.dist_timeout <= 0:
        raise ConfigError(f"--dist-timeout must be > 0 seconds, got {cfg.dist_timeout}")
    if not 0.0 <= cfg.momentum < 1.0:
        raise ConfigError(f"--momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.ddp_bucket_mb <= 0:
        raise ConfigError(f"--ddp-bucket-mb must be > 0, got {cfg.ddp_bucket_mb}")
    if cfg.split == "report":
        if cfg.max_train > REPORT_TRAIN:
            raise ConfigError(f"--max-train {cfg.max_train} exceeds the report split's "
                              f"{REPORT_TRAIN} training images: use --split full")
        if cfg.dataset == "synthetic":  # sizes known now: fail before any work
            problem = report_split_problem(cfg.synthetic_size + cfg.synthetic_size // 4,
                                           max(cfg.synthetic_size // 4, 1), f"--synthetic-size {cfg.synthetic_size}")
            if problem:
                raise ConfigError(problem)
    from .models import MODELS  # late import: models is a sibling, not a dependency of config
    if cfg.model not in MODELS:
        raise ConfigError(f"--model {cfg.model!r} is unknown; known models: {', '.join(MODELS)}")
    if cfg.parallel == "hybrid" and cfg.model == "linear":
        raise ConfigError("--parallel hybrid shards a classifier of at least two Linear layers; --model linear has "
                          "one: use --parallel ddp")
    if cfg.tp_size < 0 or cfg.tp_size > 2**16:
        raise ConfigError(f"--tp-size must be in 0..65536 (0: the ranks of a node), got {cfg.tp_size}")
    if cfg.tp_size and cfg.parallel not in ("hybrid", "auto"):
        raise ConfigError(f"--tp-size shards the hybrid's head: use --parallel hybrid with it, or drop it "
                          f"(--parallel {cfg.parallel} has no tp group)")
    if cfg.parallel == "fsdp" and cfg.sync_bn:
        raise ConfigError("--sync-bn is a DDP feature: use --parallel ddp or hybrid with it, or drop it")
    if cfg.parallel == "fsdp" and cfg.ddp_comm_hook != "none":
        raise ConfigError(f"--ddp-comm-hook {cfg.ddp_comm_hook} is a DDP hook and FSDP2 has none (it reduces "
                          f"gradients in fp32): drop --ddp-comm-hook, or use --parallel ddp or hybrid")
    if cfg.parallel == "fsdp" and cfg.optimizer == "sgd" and cfg.optimizer_kernel == "fused":
        raise ConfigError("--optimizer-kernel fused: torch has no fused SGD for FSDP2's sharded parameters: use "
                          "--optimizer-kernel foreach (or auto), or --optimizer adam/adamw")
