"""The out dir: choose it, refuse to clobber it, find what to resume from, keep logs consistent."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

from . import checkpoint as ckpt
from . import files
from .config import ConfigError, TrainConfig


def default_out_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare(cfg: TrainConfig) -> tuple[Path, Optional[Path]]:
    """(out dir, checkpoint to resume or None). Raises ConfigError when the out dir holds a
    previous run that this one would overwrite without being asked to."""
    out = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out-dir {out} exists and is not a folder")
    if cfg.resume not in ("auto", "none"):
        path = Path(cfg.resume)
        if not path.is_file():
            raise ConfigError(f"--resume {path}: no such checkpoint file")
        return out, path
    if cfg.resume == "auto" and out.is_dir() and not cfg.overwrite:
        latest = ckpt.find_latest(out)
        if latest is not None:
            return out, latest
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise ConfigError(f"--out-dir {out} is not empty and holds no checkpoint to resume: pass "
                              f"--overwrite to replace its run, or choose a new --out-dir")
        clear(out)
    return out, None


def clear(out: Path) -> None:
    """Remove a previous run's artefacts (and nothing else the user may keep there)."""
    for name in files.ARTEFACTS:
        (out / name).unlink(missing_ok=True)
    for path in list(out.glob("ckpt-*")) + list(out.glob(files.TMP_PREFIX + "*")):
        path.unlink(missing_ok=True)
    shutil.rmtree(out / files.WANDB_DIR, ignore_errors=True)


class StepLossLog:
    """step_losses.jsonl: one line per training step, never duplicated across resumes."""

    def __init__(self, out: Path, enabled: bool):
        self.path, self.enabled = out / files.STEP_LOSSES, enabled
        self.written: dict[int, int] = {}  # epoch -> steps written

    def truncate_to(self, epoch: int, step: int) -> None:
        """Keep only entries before (epoch, step): the resumed run recomputes the rest."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in files.read_jsonl(self.path) if (r["epoch"], r["step"]) < (epoch, step)]
        files.write_jsonl(self.path, keep)
        self.written = {epoch: step}

    def write(self, epoch: int, start_step: int, losses: list[float]) -> None:
        if not self.enabled:
            return
        first = max(self.written.get(epoch, start_step), start_step)
        files.append_jsonl(self.path, ({"epoch": epoch, "step": start_step + i, "loss": loss}
                                       for i, loss in enumerate(losses) if start_step + i >= first))
        self.written[epoch] = start_step + len(losses)
