"""--profile-steps A:B: a torch.profiler trace of optimizer steps A..B-1 on every rank, and a
per-rank table of where those steps' time went, so that a straggler shows by name.

Each rank writes `<out>/profile/rank<R>.json` (Chrome trace format: chrome://tracing or
https://ui.perfetto.dev), every profiled step wrapped in a `step N` range. When the window ends,
every rank's figures are gathered and rank 0 prints one row per rank: steps, mean step time, data
wait, compute (the rest) and communication (the profiler's time in collectives). The window syncs
the device at each of its steps to time them; outside it nothing changes.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Callable

import torch

from . import distributed as D
from . import files
from .timing import synchronize

COLLECTIVE = re.compile(r"all_?reduce|all_?gather|reduce_?scatter|broadcast|barrier|nccl|gloo", re.I)


class StepProfiler:
    def __init__(self, window: tuple[int, int], out_dir: Path, info: D.DistInfo, say: Callable[[str], None]):
        self.first, self.end = window
        self.out_dir, self.info, self.say = out_dir, info, say
        self.profile = None
        self.step_range = None
        self.started = 0.0
        self.times: list[tuple[float, float]] = []  # (step s, data wait s) per profiled step
        self.done = False

    def before_step(self, global_step: int) -> None:
        if self.done or not self.first <= global_step < self.end:
            return
        if self.profile is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.info.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profile = torch.profiler.profile(activities=activities)
            self.profile.__enter__()
        synchronize(self.info.device)
        self.started = time.perf_counter()
        self.step_range = torch.profiler.record_function(f"step {global_step}")
        self.step_range.__enter__()

    def after_step(self, global_step: int, data_wait_s: float) -> None:
        if self.step_range is None:
            return
        synchronize(self.info.device)
        self.step_range.__exit__(None, None, None)
        self.step_range = None
        self.times.append((time.perf_counter() - self.started, data_wait_s))
        if global_step + 1 == self.end:
            self.finish()

    def finish(self) -> None:
        """Stop, write this rank's trace, gather every rank's figures; rank 0 prints the table.
        Every rank reaches it at the same step (the window counts optimizer steps)."""
        self.profile.__exit__(None, None, None)
        folder = self.out_dir / "profile"
        files.make_dirs(folder)
        trace = folder / f"rank{self.info.rank}.json"
        fd, tmp = files.create_temp(trace)  # torch writes by name: into our exclusive, unpredictable one
        os.close(fd)
        self.profile.export_chrome_trace(str(tmp))
        files.publish(tmp, trace)
        comm_us = sum(e.self_cpu_time_total for e in self.profile.key_averages() if COLLECTIVE.search(e.key))
        steps = len(self.times)
        step_s = sum(t for t, _ in self.times) / max(steps, 1)
        wait_s = sum(w for _, w in self.times) / max(steps, 1)
        rows = D.all_gather_objects(self.info, (steps, step_s, wait_s, comm_us / 1e6 / max(steps, 1)))
        self.done = True
        if not self.info.is_main:
            return
        lines = [f"profile of steps {self.first}..{self.end - 1}: traces in {folder} (Perfetto / chrome://tracing)",
                 "  rank  steps  step ms  data wait ms  compute ms  comm ms"]
        for rank, (n, step, wait, comm) in enumerate(rows):
            lines.append(f"  {rank:>4}  {n:>5}  {1e3 * step:>7.1f}  {1e3 * wait:>12.1f}  {1e3 * (step - wait):>10.1f}"
                         f"  {1e3 * comm:>7.1f}")
        slowest = max(range(len(rows)), key=lambda r: rows[r][1])
        if len(rows) > 1 and rows[slowest][1] > 1.2 * min(r[1] for r in rows):
            lines.append(f"  rank {slowest} is the slowest: {rows[slowest][1] / min(r[1] for r in rows):.2f}x the fastest")
        self.say("\n".join(lines))
