"""What this host offers one process: the CPUs it may use, how busy the machine is, and from
those the number of intra-op threads torch should run.

Why it matters: torch starts one OpenMP thread per core and its threads spin while they wait
for each other. On a machine other processes keep busy, a spinning thread that is descheduled
holds every other one up: measured on 2 cores with two busy processes beside it, the quickstart's
first 3,200 images took 13.5 s with 2 threads and 2.8 s with 1 (1.3 s idle; benchmarks/
busy_machine.py). So a run takes the CPUs it may
use (affinity, the cgroup's CPU quota, SLURM_CPUS_PER_TASK), shares them with the other
processes of its node, and leaves out what the machine's load already occupies.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Optional


def cgroup_cpu_quota() -> Optional[float]:
    """CPUs the process's cgroup may use (cgroup v2 cpu.max or v1 cfs quota), None when unlimited."""
    try:
        line = open("/proc/self/cgroup").read()
    except OSError:
        return None
    for entry in line.splitlines():
        _, controllers, path = (entry.split(":", 2) + ["", ""])[:3]
        relative = path.strip().lstrip("/")
        if controllers == "":  # v2
            candidates = [Path("/sys/fs/cgroup") / relative / "cpu.max"]
            parse = _v2_quota
        elif "cpu" in controllers.split(","):  # v1
            candidates = [Path("/sys/fs/cgroup") / c / relative for c in ("cpu,cpuacct", "cpu", controllers)]
            parse = _v1_quota
        else:
            continue
        for candidate in candidates:
            quota = parse(candidate)
            if quota is not None:
                return quota
    return None


def _v2_quota(path: Path) -> Optional[float]:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(folder: Path) -> Optional[float]:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 else quota / period


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, capped by the cgroup's quota and SLURM's
    --cpus-per-task."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        cpus = min(cpus, int(slurm))
    return max(cpus, 1)


def machine_load(samples: int = 9, interval_s: float = 0.02) -> float:
    """How many CPUs other work keeps busy right now: the tasks running or ready to run besides
    the one asking (the median of a few reads of /proc/loadavg's run queue over ~0.2 s, so a
    passing blip does not count). Not the 1-minute load average: it lags by a minute, and it still
    counts a run that just ended (an ablation's previous variant); 0 where /proc has no answer."""
    counts = []
    for i in range(samples):
        try:
            counts.append(int(open("/proc/loadavg").read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return 0.0
        if i + 1 < samples:
            time.sleep(interval_s)
    return float(sorted(counts)[len(counts) // 2])


def intra_op_threads(local_world_size: int = 1) -> tuple[int, str]:
    """(threads for torch, why): this process's share of the usable CPUs, less the CPUs the
    machine's load already keeps busy; OMP_NUM_THREADS, when set, decides instead."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), f"OMP_NUM_THREADS={env}"
    cpus = usable_cpus()
    share = max(1, cpus // max(local_world_size, 1))
    load = machine_load()
    free = cpus - load
    threads = max(1, min(share, math.floor(free + 0.5)))
    why = f"{cpus} usable CPU(s)" + (f" over {local_world_size} processes" if local_world_size > 1 else "")
    if threads < share:
        why += f", load {load:.1f} at start"
    return threads, why
