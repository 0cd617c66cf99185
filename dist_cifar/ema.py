"""--ema DECAY: an exponential moving average of the weights, kept beside the model.

Each rank averages the parameters it holds: all of them under DDP, its slices of the head under
the hybrid, its FSDP2 shards (local tensors of the DTensors). Everything that must see the plain
model goes through the model itself: `swapped_in()` puts the averages into the parameters for a
block (evaluation, best.pt, the checkpoint's consolidated copy) and puts the trained weights
back after it, so the layout's own consolidation and loading serve the EMA as they serve the
model. The decay warms up as timm's ModelEmaV3 does: min(DECAY, (1 + n) / (10 + n)) at update n,
so the first averages are not dominated by the random initial weights.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (an FSDP2 parameter is a DTensor over its shard)."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    def __init__(self, module: nn.Module, decay: float, consolidate):
        """`consolidate`: the model's ConsolidatedModel (state_dict / load_state_dict through the
        layout); the averages travel through it while swapped in."""
        self.params = [p for p in module.parameters()]
        self.decay, self.consolidate = decay, consolidate
        self.updates = 0
        self.shadow = [local(p).detach().clone() for p in self.params]

    def reset(self) -> None:
        """Start averaging from the present weights (a resume from a checkpoint without an EMA)."""
        self.updates = 0
        torch._foreach_copy_(self.shadow, [local(p).detach() for p in self.params])

    def decay_now(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """After each optimizer step: shadow = d * shadow + (1 - d) * weights."""
        torch._foreach_lerp_(self.shadow, [local(p).detach() for p in self.params], 1.0 - self.decay_now())
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averages in the model's parameters for the block; the trained weights after it."""
        trained = [local(p).detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_([local(p) for p in self.params], self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([local(p) for p in self.params], trained)

    # -- the checkpoint's view: the plain (consolidated) averages, as the model's are saved
    def state_dict(self) -> dict[str, Any]:
        with self.swapped_in():  # cloned inside: one process's state_dict holds the parameters themselves
            weights = {k: v.detach().clone() for k, v in self.consolidate.state_dict().items()}
        return {"updates": self.updates, "weights": weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self.swapped_in():
            self.consolidate.load_state_dict(state["weights"])
            with torch.no_grad():
                torch._foreach_copy_(self.shadow, [local(p).detach() for p in self.params])
        self.updates = int(state["updates"])
