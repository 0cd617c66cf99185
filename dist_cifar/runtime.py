"""Resolve the `auto` flags against this host, and check what the host can do, before any work.

Each check lives here once and fails with a ConfigError (one line naming the fix, exit 2):
a CUDA device that is not there, NCCL without GPUs, bf16 on a GPU without it, SyncBatchNorm
on CPU, W&B asked for but not installed. The resolved values are what the run records.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, TrainConfig


@dataclass(frozen=True)
class Runtime:
    device_type: str        # cpu | cuda
    backend: str            # gloo | nccl (used only when a launcher starts several processes)
    precision: str          # fp32 | bf16 | fp16
    wandb: str              # online | offline | off
    notes: tuple = ()       # what rank 0 should tell the user about the choices made


def resolve(cfg: TrainConfig) -> Runtime:
    notes: list[str] = []
    device_type = resolve_device_type(cfg.device)
    backend = resolve_backend(cfg.backend, device_type)
    if cfg.sync_bn and device_type != "cuda" and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ConfigError("--sync-bn needs GPUs (DDP runs SyncBatchNorm on CUDA only): drop it on CPU")
    precision = resolve_precision(cfg.precision, device_type)
    wandb = resolve_wandb(cfg.wandb, notes)
    return Runtime(device_type, backend, precision, wandb, tuple(notes))


def resolve_device_type(requested: str) -> str:
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise ConfigError("--device cuda: torch sees no CUDA device (check nvidia-smi and that torch is a "
                          "CUDA build), or use --device cpu")
    return "cuda" if requested == "cuda" or (requested == "auto" and available) else "cpu"


def resolve_backend(requested: str, device_type: str) -> str:
    if requested == "nccl" and device_type != "cuda":
        raise ConfigError("--backend nccl needs GPUs: use --backend gloo (or --backend auto) on CPU")
    if requested == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    return requested


def resolve_precision(requested: str, device_type: str) -> str:
    """auto: bf16 on GPUs that have it, fp32 elsewhere (CPU autocast is opt-in)."""
    bf16_ok = device_type == "cuda" and torch.cuda.is_bf16_supported()
    if requested == "auto":
        return "bf16" if bf16_ok else "fp32"
    if requested == "bf16" and device_type == "cuda" and not bf16_ok:
        raise ConfigError("--precision bf16: this GPU has no bf16 support; use --precision fp16")
    return requested


def resolve_wandb(requested: str, notes: list[str]) -> str:
    """auto: online with credentials, offline without (or as WANDB_MODE says), off when wandb is
    not installed."""
    if requested == "off":
        return "off"
    try:
        import wandb  # noqa: F401  (imported only when W&B is wanted)
    except ImportError:
        if requested == "auto":
            notes.append("wandb is not installed; W&B logging is off (pip install wandb to enable it)")
            return "off"
        raise ConfigError(f"--wandb {requested}: wandb is not installed; pip install wandb, or --wandb off") from None
    if requested != "auto":
        return requested
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode in ("offline", "disabled", "online"):
        return {"disabled": "off"}.get(env_mode, env_mode)
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
    if not has_key:
        notes.append("no W&B credentials found: logging offline (wandb sync the run later)")
    return "online" if has_key else "offline"
