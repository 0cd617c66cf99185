"""Fault injection for tests of the failure paths (a testing aid, off unless the env var is set).

DIST_CIFAR_FAULT holds one or more ';'-separated specs, each `KIND:key=value:...`:
  crash:rank=1:step=3            rank 1 raises RuntimeError before global step 3
  sleep:rank=1:step=3:seconds=600  rank 1 stalls (tests the collective timeout)
  nan:rank=0:step=2              rank 0's loss becomes NaN at global step 2
  preempt:rank=0:step=5          rank 0 raises its preemption flag (as SIGTERM would)
  slow_save:step=16:seconds=60   the checkpoint taken at global step 16 waits 60 s between its
                                 fsync and its rename (tests a kill while a write is in flight)
  fail_save:step=6               the checkpoint taken at global step 6 fails to write (as a full
                                 disk would: OSError ENOSPC)
  overflow:rank=1:step=2         rank 1's gradient of one of its sharded parameters (any parameter
                                 under ddp) becomes inf before unscaling, as an fp16 overflow in
                                 that slice would
  drift:rank=1:step=2            after step 2, rank 1's copy of one replicated parameter is
                                 perturbed (tests the replica-drift guard)
Add `attempt=0` to fire only on torchrun's first attempt (TORCHELASTIC_RESTART_COUNT==0).
Steps count optimizer steps from the start of the run (0-based), across epochs.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

KINDS = ("crash", "sleep", "nan", "preempt", "slow_save", "fail_save", "overflow", "drift")


@dataclass
class Fault:
    kind: str
    rank: int
    step: int
    seconds: float = 3600.0
    attempt: Optional[int] = None


def parse(spec: str) -> list[Fault]:
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        kind, *pairs = part.split(":")
        if kind not in KINDS:
            raise ValueError(f"DIST_CIFAR_FAULT kind {kind!r} is not one of {', '.join(KINDS)}")
        kv = dict(p.split("=", 1) for p in pairs)
        faults.append(Fault(kind, int(kv.get("rank", 0)), int(kv.get("step", 0)),
                            float(kv.get("seconds", 3600)),
                            int(kv["attempt"]) if "attempt" in kv else None))
    return faults


class FaultInjector:
    def __init__(self, spec: Optional[str] = None, on_preempt: Optional[Callable[[], None]] = None):
        spec = os.environ.get("DIST_CIFAR_FAULT", "") if spec is None else spec
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        self.faults = [f for f in parse(spec) if f.attempt is None or f.attempt == attempt]
        self.on_preempt = on_preempt
        self.sharded: Optional[torch.nn.Parameter] = None      # overflow's target
        self.replicated: Optional[torch.nn.Parameter] = None   # drift's target

    def aim(self, *, sharded: Optional[torch.nn.Parameter], replicated: Optional[torch.nn.Parameter]) -> None:
        """The parameters `overflow` and `drift` act on (the trainer picks them from its layout)."""
        self.sharded, self.replicated = sharded, replicated

    def _due(self, kind: str, rank: int, step: int) -> Optional[Fault]:
        for f in self.faults:
            if f.kind == kind and f.rank == rank and f.step == step:
                return f
        return None

    def before_step(self, rank: int, step: int) -> None:
        if not self.faults:
            return
        if self._due("crash", rank, step):
            raise RuntimeError(f"injected crash (DIST_CIFAR_FAULT) on rank {rank} at step {step}")
        fault = self._due("sleep", rank, step)
        if fault:
            time.sleep(fault.seconds)
        if self._due("preempt", rank, step) and self.on_preempt:
            self.on_preempt()

    def after_backward(self, rank: int, step: int) -> None:
        if self.faults and self.sharded is not None and self.sharded.grad is not None \
                and self._due("overflow", rank, step):
            grad = self.sharded.grad
            local = grad.to_local() if hasattr(grad, "to_local") else grad  # a DTensor's own shard
            with torch.no_grad():
                local[(0,) * local.dim()] = float("inf")

    def after_step(self, rank: int, step: int) -> None:
        if self.faults and self.replicated is not None and self._due("drift", rank, step):
            with torch.no_grad():
                self.replicated[(0,) * self.replicated.dim()] += 1e-3

    def save_delay(self, step: int) -> float:
        """Seconds the checkpoint writer stalls before publishing the checkpoint of `step`."""
        fault = self._due("slow_save", 0, step)
        return fault.seconds if fault else 0.0

    def save_fails(self, step: int) -> bool:
        """Whether the checkpoint of `step` is to fail as a full disk would."""
        return self._due("fail_save", 0, step) is not None

    def corrupt_loss(self, rank: int, step: int, loss: torch.Tensor) -> torch.Tensor:
        if self.faults and self._due("nan", rank, step):
            return loss * float("nan")
        return loss
