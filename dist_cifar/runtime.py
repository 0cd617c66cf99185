"""Resolve the `auto` flags against this host, and check what the host can do, before any work.

Each check lives here once and fails with a ConfigError (one line naming the fix, exit 2):
a CUDA device that is not there (or GPUs that torch cannot see), NCCL without GPUs, bf16 on a
GPU without it, SyncBatchNorm on CPU, W&B asked for but not installed, a global batch that does
not divide over the processes. `resolve` returns the config with every auto value replaced by
what this host gets, which is what config.json records: on GPUs bf16 autocast, channels_last,
torch.compile, fused optimizers and an agreement every 25 steps; on CPU fp32 eager with an
agreement every step.

Every auto value is chosen from a device *type*, so `--resolve-as cuda` resolves them as a GPU
would while the run stays on the CPU (gloo): the GPU configuration is rehearsed, and tested, on
a machine without one.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import torch

from . import host
from .config import ConfigError, TrainConfig

GPU_GUARD_EVERY = 25  # steps between host syncs on GPUs; the loss is still checked every step


def resolve(cfg: TrainConfig) -> tuple[TrainConfig, tuple[str, ...]]:
    """(the config with every auto value resolved for this host, what rank 0 should tell the user
    about those choices). The resolved device, backend, precision and W&B mode live in the config."""
    notes: list[str] = []
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    device_type = resolve_device_type(cfg.device)
    backend = resolve_backend(cfg.backend, device_type)
    if cfg.sync_bn and device_type != "cuda" and world > 1:
        raise ConfigError("--sync-bn needs GPUs (DDP runs SyncBatchNorm on CUDA only): drop it on CPU")
    wandb = resolve_wandb(cfg.wandb, notes)
    threads = resolve_threads(cfg.threads, notes)
    resolved = dataclasses.replace(settle(cfg, device_type, world), backend=backend, wandb=wandb, threads=threads)
    if resolved.compile:
        share_compile_threads()
    if policy_device(cfg, device_type) != device_type:
        notes.append(f"--resolve-as {cfg.resolve_as}: auto settings resolved as on {cfg.resolve_as} "
                     f"({describe_policy(resolved)}) while the run stays on {device_type} ({backend})")
    if cfg.parallel != "ddp" and world == 1 and "WORLD_SIZE" not in os.environ:
        notes.append(f"--parallel {cfg.parallel} on one process: nothing to spread, the model trains whole "
                     f"(start it under torchrun to shard it)")
    if (resolved.optimizer_kernel == "foreach" and cfg.optimizer_kernel == "auto"
            and policy_device(cfg, device_type) == "cuda"):
        notes.append("--parallel fsdp --optimizer sgd: the foreach SGD kernel (torch has no fused SGD for "
                     "sharded parameters)")
    return resolved, tuple(notes)


def resolve_threads(requested: int, notes: list[str]) -> int:
    """torch's intra-op threads per process: --threads, else host.intra_op_threads (the usable
    CPUs over the node's processes, less the machine's load; OMP_NUM_THREADS when set)."""
    cpus = os.cpu_count() or 1
    if requested > 4 * cpus:
        raise ConfigError(f"--threads {requested} is more than 4x this machine's {cpus} CPUs: use at most {cpus} "
                          f"(or 0: chosen from the CPUs this process may use)")
    if requested:
        return requested
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    threads, why = host.intra_op_threads(local_world)
    if "load" in why:
        notes.append(f"{threads} CPU thread(s) per process ({why}): a busy machine slows every extra thread "
                     f"(--threads N chooses; results depend on the thread count)")
    return threads


def policy_device(cfg: TrainConfig, device_type: str) -> str:
    """The device type the auto values are chosen for: the run's own, or --resolve-as's."""
    return device_type if cfg.resolve_as == "auto" else cfg.resolve_as


def describe_policy(cfg: TrainConfig) -> str:
    return (f"{cfg.precision}, channels_last {'on' if cfg.channels_last else 'off'}, compile "
            f"{'on' if cfg.compile else 'off'}, {cfg.optimizer_kernel} {cfg.optimizer}, agreement every "
            f"{cfg.guard_every} step{'s' if cfg.guard_every > 1 else ''}")


def share_compile_threads() -> None:
    """Inductor starts min(32, CPUs) compile workers per process; with one process per GPU that
    oversubscribes the node. Give each local rank its share unless the user chose."""
    if "TORCHINDUCTOR_COMPILE_THREADS" in os.environ:
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = str(max(1, cpus // local_world))


def settle(cfg: TrainConfig, device_type: str, world: int) -> TrainConfig:
    """The config's per-device auto values for this device (or --resolve-as's) and world size
    (idempotent). The assembler calls it too, so scripts that build a run without `resolve` get
    the same values. `device` stays the device the run uses."""
    policy = policy_device(cfg, device_type)
    on_gpu = policy == "cuda"
    batch = resolve_batch(cfg.batch_size, cfg.global_batch_size, world, cfg.grad_accum_steps)
    return dataclasses.replace(
        cfg, device=device_type, precision=resolve_precision(cfg.precision, policy),
        batch_size=batch, global_batch_size=batch * world * cfg.grad_accum_steps,
        channels_last=on_gpu if cfg.channels_last is None else cfg.channels_last,
        compile=on_gpu if cfg.compile is None else cfg.compile,
        optimizer_kernel=resolve_optimizer_kernel(cfg, policy),
        guard_every=cfg.guard_every or (GPU_GUARD_EVERY if on_gpu else 1))


def resolve_optimizer_kernel(cfg: TrainConfig, policy: str) -> str:
    """auto: fused on GPUs (one launch steps every parameter), except SGD under FSDP2, whose
    sharded (DTensor) parameters have no fused SGD in torch (foreach then); torch's own
    one-parameter-at-a-time loop on CPU."""
    if cfg.optimizer_kernel != "auto":
        return cfg.optimizer_kernel
    if policy != "cuda":
        return "loop"
    return "foreach" if cfg.parallel == "fsdp" and cfg.optimizer == "sgd" else "fused"


def resolve_batch(batch_size: int, global_batch_size: int, world: int, accum: int = 1) -> int:
    """The per-process (micro-)batch: --batch-size, or --global-batch-size (the samples of one
    optimizer step) divided over the processes and the --grad-accum-steps micro-batches."""
    if not global_batch_size:
        return batch_size
    parts, what = world * accum, f"{world} processes" + (f" x {accum} micro-batches" if accum > 1 else "")
    if global_batch_size % parts:
        raise ConfigError(f"--global-batch-size {global_batch_size} does not divide over {what}: "
                          f"use a multiple of {parts}")
    if batch_size and batch_size * parts != global_batch_size:
        raise ConfigError(f"--batch-size {batch_size} x {what} = {batch_size * parts} disagrees with "
                          f"--global-batch-size {global_batch_size}: give only one of them")
    return global_batch_size // parts


def visible_nvidia_gpus() -> int:
    """GPUs the driver lists (nvidia-smi -L), whatever torch thinks; 0 without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def resolve_device_type(requested: str) -> str:
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise ConfigError("--device cuda: torch sees no CUDA device (check nvidia-smi and that torch is a "
                          "CUDA build), or use --device cpu")
    if requested == "auto" and not available:
        gpus = visible_nvidia_gpus()
        if gpus:  # training on the CPU here would be silently ~100x slower
            raise ConfigError(f"nvidia-smi lists {gpus} GPU(s) but torch {torch.__version__} (CUDA "
                              f"{torch.version.cuda}) sees none: install a torch build for this driver, "
                              f"or pass --device cpu")
    return "cuda" if requested == "cuda" or (requested == "auto" and available) else "cpu"


def resolve_backend(requested: str, device_type: str) -> str:
    if requested == "nccl" and device_type != "cuda":
        raise ConfigError("--backend nccl needs GPUs: use --backend gloo (or --backend auto) on CPU")
    if requested == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    return requested


def resolve_precision(requested: str, device_type: str) -> str:
    """auto: bf16 on GPUs that have it, fp32 elsewhere (CPU autocast is opt-in). Rehearsing a GPU
    where torch sees none (--resolve-as cuda), the GPU is taken to have bf16 (Ampere and newer)."""
    bf16_ok = device_type == "cuda" and (not torch.cuda.is_available() or torch.cuda.is_bf16_supported())
    if requested == "auto":
        return "bf16" if bf16_ok else "fp32"
    if requested == "bf16" and device_type == "cuda" and not bf16_ok:
        raise ConfigError("--precision bf16: this GPU has no bf16 support; use --precision fp16")
    return requested


def resolve_wandb(requested: str, notes: list[str]) -> str:
    """auto: as WANDB_MODE says when set, else online with credentials, offline without; off when
    wandb is not installed. wandb (a second to import) is imported only when it will be used."""
    env_mode = os.environ.get("WANDB_MODE")
    if requested == "off" or (requested == "auto" and env_mode in ("disabled", "off")):
        return "off"
    if env_mode and env_mode not in ("online", "offline", "disabled", "off", "dryrun", "run"):
        raise ConfigError(f"WANDB_MODE={env_mode!r} is not one of online, offline, disabled: fix or unset it")
    try:
        import wandb  # noqa: F401  (imported only when W&B will be used)
    except ImportError:
        if requested == "auto":
            notes.append("wandb is not installed; W&B logging is off (pip install wandb to enable it)")
            return "off"
        raise ConfigError(f"--wandb {requested}: wandb is not installed; pip install wandb, or --wandb off") from None
    if requested != "auto":
        return requested
    if env_mode in ("offline", "online"):
        return env_mode
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
    if not has_key:
        notes.append("no W&B credentials found: logging offline (wandb sync the run later)")
    return "online" if has_key else "offline"
