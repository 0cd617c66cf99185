"""What a run will cost on this host, said before it trains: the checkpoint's size, the memory and
disk its saves need (a run whose checkpoints cannot fit is refused with one line), and, once the
first steps are timed, what an epoch and the whole run will take.

Why: vgg16_cifar under two CPU processes runs at ~2 images/s with 8.4 GB per rank and a 4 GB
checkpoint that took a 24 GB machine to ~20 GB: hours in, with no warning, is too late to learn it.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import cost, host
from .config import ConfigError, TrainConfig

GB = 1e9


def size(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"
# Adam/AdamW keep two moments per parameter, SGD with momentum one
OPTIMIZER_SLOTS = {"adam": 2, "adamw": 2, "sgd": 1}


@dataclass
class Budget:
    params: int
    checkpoint_bytes: int      # model + optimizer state, fp32, as a single process holds it
    weights_bytes: int         # best.pt
    disk_needed: int           # the newest --keep-last checkpoints + the one being written + best.pt twice
    disk_have: int             # free space, plus what the folder's own checkpoints already take
    memory_needed: int         # this node's host memory at a checkpoint
    memory_have: int           # available host memory (the cgroup's limit when it is lower)
    train_flops_per_image: float

    def problem(self) -> Optional[str]:
        if self.disk_needed > self.disk_have:
            return (f"the checkpoints need ~{size(self.disk_needed)} on disk ({size(self.checkpoint_bytes)} each) and the "
                    f"out dir has {size(self.disk_have)} free: free space, lower --keep-last, or "
                    f"--checkpoint-every 0 --checkpoint-interval-min 0 --no-save-best")
        if self.memory_needed > self.memory_have:
            return (f"at a checkpoint this node needs ~{size(self.memory_needed)} of host memory and "
                    f"{size(self.memory_have)} is available: fewer processes per node, a smaller model, or a GPU")
        return None

    def describe(self) -> str:
        tight = self.memory_needed > 0.8 * self.memory_have or self.disk_needed > 0.8 * self.disk_have
        return ("warning: tight, " if tight else "") + (f"budget: {size(self.checkpoint_bytes)} per checkpoint (weights + optimizer state); disk "
                f"~{size(self.disk_needed)} of {size(self.disk_have)} free, host memory at a checkpoint "
                f"~{size(self.memory_needed)} of {size(self.memory_have)} available")


def available_memory() -> int:
    """MemAvailable, or what the memory cgroup (a SLURM job's limit, a container's) still allows
    when that is lower: cgroup v2's memory.max, or v1's memory.limit_in_bytes (still the norm on
    many clusters), on this process's group and every group above it."""
    have = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        have = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))) * 1024
    except (OSError, StopIteration, ValueError):
        pass
    left = cgroup_memory_left()
    return min(have, left) if left is not None else have


def cgroup_memory_left() -> Optional[int]:
    """The smallest (limit - usage) over this process's memory cgroup and its ancestors; None
    when no limit is set or the cgroup files cannot be read."""
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return None
    found: list[int] = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: one unified hierarchy
            root, limit_file, usage_file = Path("/sys/fs/cgroup"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):  # v1
            root, limit_file, usage_file = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        group = root / path.strip().lstrip("/")
        while True:
            try:
                limit = (group / limit_file).read_text().strip()
                if limit != "max" and int(limit) < 1 << 60:  # v1 writes "no limit" as ~2^63
                    found.append(int(limit) - int((group / usage_file).read_text()))
            except (OSError, ValueError):
                pass
            if group == root or root not in group.parents:
                break
            group = group.parent
    return min(found) if found else None


def own_checkpoint_bytes(out_dir: Path) -> int:
    """Checkpoints already in the folder count as room: pruning frees them (a sharded one is a folder)."""
    total = 0
    for path in out_dir.glob("ckpt-e*-s*"):
        if path.is_dir() and not path.is_symlink():
            total += sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        elif path.suffix == ".pt" and path.is_file():
            total += path.stat().st_size
    return total


def plan(cfg: TrainConfig, *, out_dir: Path, local_world_size: int, world_size: int = 1, on_cuda: bool) -> Budget:
    measured = cost.measure(cfg.model, **{k: getattr(cfg, k) for k in ("batchnorm", "dropout", "pooling")})
    weights = measured.params * 4
    state = weights * (1 + OPTIMIZER_SLOTS.get(cfg.optimizer, 2))
    saves = bool(cfg.checkpoint_every or cfg.checkpoint_interval_min or cfg.checkpoint_every_steps)
    # the newest --keep-last kept plus the one being written, but never more than the run writes
    # (an epoch cadence alone writes one per N epochs and one after the last)
    by_epoch_only = cfg.checkpoint_every and not (cfg.checkpoint_every_steps or cfg.checkpoint_interval_min)
    writes = cfg.epochs // cfg.checkpoint_every + bool(cfg.epochs % cfg.checkpoint_every) if by_epoch_only \
        else cfg.keep_last + 1
    disk = min(cfg.keep_last + 1, writes) * state * saves + 2 * weights * cfg.save_best
    # on the CPU every process holds weights, gradients, optimizer state and DDP's gradient buckets;
    # at a save rank 0 adds a host copy of the whole state, or under a sharded layout each rank a
    # copy of its own share (on GPUs only those copies are host memory)
    per_process = 0 if on_cuda else weights * (3 + OPTIMIZER_SLOTS.get(cfg.optimizer, 2))
    staged = state
    if cfg.parallel in ("hybrid", "fsdp") and world_size > 1:  # the big layers are split over the ranks
        per_process //= world_size
        staged = state * local_world_size // world_size
    memory = local_world_size * per_process + staged * saves
    return Budget(params=measured.params, checkpoint_bytes=state, weights_bytes=weights, disk_needed=disk,
                  disk_have=shutil.disk_usage(out_dir).free + own_checkpoint_bytes(out_dir), memory_needed=memory,
                  memory_have=available_memory(), train_flops_per_image=measured.train_flops_per_image)


def check(cfg: TrainConfig, *, out_dir: Path, local_world_size: int, world_size: int, on_cuda: bool) -> Budget:
    """The budget, or a one-line ConfigError when the run's checkpoints cannot fit."""
    budget = plan(cfg, out_dir=out_dir, local_world_size=local_world_size, world_size=world_size, on_cuda=on_cuda)
    problem = budget.problem()
    if problem:
        raise ConfigError(problem)
    return budget


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"  # vgg16_cifar on CPU runs at ~2 images/s, not "0"


def forecast(step_s: float, *, steps_per_epoch: int, steps_left: int, images_per_step: int,
             train_flops_per_image: float) -> str:
    """The line said once the first steps are timed. `steps_left`: of the whole run, counted from
    where this process started (a resumed epoch's remaining steps, then whole epochs)."""
    epoch_s = step_s * steps_per_epoch
    achieved = train_flops_per_image * images_per_step / max(step_s, 1e-9) / 1e12
    return (f"an epoch here: ~{duration(epoch_s)} ({1000 * step_s:.0f} ms/step measured x {steps_per_epoch} steps, "
            f"{rate(images_per_step / max(step_s, 1e-9))} images/s, {achieved:.2f} TFLOP/s at "
            f"{train_flops_per_image / 1e9:.2f} GFLOP per training image); {steps_left:,} step(s) left "
            f"({steps_left / max(steps_per_epoch, 1):.1f} epoch(s)): ~{duration(step_s * steps_left)}")


# A stop writes one checkpoint: the copy off the device, then serialising and writing it, which
# the stop waits for. Rates measured on the 2-core CI host (benchmarks/results/
# checkpoint_vgg16_cifar_cpu.json: 4.0 GB, 4.8 s blocked, 27.5 s written); a faster disk stops sooner.
SNAPSHOT_BYTES_PER_S = 0.8 * GB
WRITE_BYTES_PER_S = 0.15 * GB
TORCHRUN_GRACE_S = 30  # torchrun's --shutdown-timeout default: then it sends SIGKILL


def stop_grace() -> tuple[Optional[float], str]:
    """How long the launcher waits after its stop signal before it kills, and who says so."""
    given = os.environ.get("DIST_CIFAR_STOP_GRACE_S", "")
    try:
        if given:
            return float(given), "the launcher's grace (DIST_CIFAR_STOP_GRACE_S)"
    except ValueError:
        pass
    if os.environ.get("TORCHELASTIC_RUN_ID") and not os.environ.get("DIST_CIFAR_LAUNCHER"):
        return float(TORCHRUN_GRACE_S), "torchrun's --shutdown-timeout"
    return None, ""


def stop_time(step_s: float, *, guard_every: int, checkpoint_bytes: int) -> float:
    """Worst case from a stop signal to exit: the steps to the next agreement, then one checkpoint."""
    return step_s * max(guard_every, 1) + checkpoint_bytes / SNAPSHOT_BYTES_PER_S + checkpoint_bytes / WRITE_BYTES_PER_S


def stop_line(step_s: float, *, guard_every: int, checkpoint_bytes: int) -> str:
    """What a stop (SIGTERM, Ctrl-C, preemption) costs here, and a warning when the launcher's
    grace is shorter: then the kill comes before the checkpoint and the steps since the last one
    are lost."""
    needed = stop_time(step_s, guard_every=guard_every, checkpoint_bytes=checkpoint_bytes)
    line = (f"a stop takes up to ~{duration(needed)} here (up to {max(guard_every, 1)} step(s) to the next agreement, "
            f"then a {size(checkpoint_bytes)} checkpoint)")
    grace, who = stop_grace()
    if grace is not None and needed > grace:
        return (f"warning: {line}, longer than {who}, {grace:.0f} s: a stop would be killed before its checkpoint. "
                f"Fix: a longer grace (torchrun --shutdown-timeout, #SBATCH --signal=B:USR1@<s>, "
                f"DIST_CIFAR_STOP_GRACE_S for other launchers), a smaller --guard-every, or a faster disk")
    return line + (f"; {who} is {grace:.0f} s" if grace is not None else "")


STARVED = 0.6  # a step's threads that get less than this share of a CPU each are waiting for one


def cpu_starved(step_s: float, cpu_s: float, *, threads: int, local_world_size: int) -> Optional[str]:
    """A warning when the first steps got far less CPU than their threads ask for: other work
    holds the cores, and torch's threads, which spin while they wait for each other, then run
    several times slower than on an idle machine (host.py). None when they got what they asked."""
    got = cpu_s / max(step_s, 1e-9)  # CPUs this process used while its steps ran
    cpus, load = host.usable_cpus(), host.machine_load()
    if got >= STARVED * threads:
        return None
    fix = ("--threads 1 (or OMP_NUM_THREADS=1)" if threads > 1 else
           "fewer processes per node, or a less busy machine" if local_world_size > 1 else "a less busy machine")
    return (f"warning: the first steps got {got:.1f} of the {threads} CPU thread(s) they run on ({load:.0f} other "
            f"task(s) running on {cpus} usable CPU(s)): this machine is busy and every step waits for CPU time; "
            f"the forecast above assumes it stays so. Fix: {fix}")
