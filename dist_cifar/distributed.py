"""Everything torch.distributed: launch environment, process group lifetime, collectives.

torchrun (and our SLURM scripts, which start torchrun) set RANK, LOCAL_RANK, WORLD_SIZE and
LOCAL_WORLD_SIZE. Without them the job is a single process with no process group, and every
collective helper here degrades to the identity, so the training loop calls them the same way
under every launcher (it branches only on `is_main` for printing and writing files).
"""
from __future__ import annotations

import contextlib
import datetime
import itertools
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None  # None: no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


_GROUPS = itertools.count()  # process groups this process has started


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def local_device(device_type: str, local_rank: int) -> torch.device:
    """This process's device: its own GPU (LOCAL_RANK) on a GPU host, else the CPU. `device_type`
    is already resolved (runtime.py); "auto" is accepted for scripts that skip that step."""
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type != "cuda":
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(f"LOCAL_RANK {local_rank} but only {count} GPU(s) visible: "
                          f"lower --nproc_per_node to {count}")
    return torch.device("cuda", local_rank)


# NCCL's flight recorder: a ring of each rank's last collectives (sizes, state, the Python stack
# that issued them), dumped per rank when the watchdog times out or a collective fails, so a hung
# or mismatched collective shows which rank and which call. Names from torch 2.5+ and before.
FLIGHT_RECORDER_SIZE = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")
FLIGHT_RECORDER_FILE = ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
FLIGHT_RECORDER_ENTRIES = 2000


def flight_recorder_on() -> None:
    """Before an NCCL group starts (it reads these once); a value the user set is kept (0: off)."""
    for name in FLIGHT_RECORDER_SIZE:
        os.environ.setdefault(name, str(FLIGHT_RECORDER_ENTRIES))
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")


def flight_recorder_dumps_to(folder) -> None:
    """Where the dumps go (`<folder>/rank_<R>`), unless the user chose: torch reads the prefix when
    it first dumps, so it can follow the out dir that rank 0 chose after the group started."""
    if any(os.environ.get(name) for name in FLIGHT_RECORDER_FILE):
        return
    from . import files
    files.make_dirs(folder)
    for name in FLIGHT_RECORDER_FILE:
        os.environ[name] = os.path.join(str(folder), "rank_")


def init(device_type: str = "cpu", backend: str = "gloo", timeout_s: float = 300.0) -> DistInfo:
    """Read the launcher's environment; start a process group when WORLD_SIZE is set."""
    world = env_int("WORLD_SIZE", 1)
    rank, local_rank = env_int("RANK", 0), env_int("LOCAL_RANK", 0)
    local_world = env_int("LOCAL_WORLD_SIZE", world)
    dev = local_device(device_type, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # before init, so NCCL binds this rank to its own GPU
    if "WORLD_SIZE" not in os.environ:
        return DistInfo(device=dev)
    chosen = backend
    kwargs = {"device_id": dev} if chosen == "nccl" else {}
    if chosen == "nccl":
        flight_recorder_on()
    timeout = datetime.timedelta(seconds=timeout_s)
    # After an elastic restart torchrun's agent store still holds the dead attempt's peer
    # addresses under the same keys, and the new workers dial them (pytorch/pytorch#167288).
    # A per-attempt key prefix keeps each attempt's rendezvous apart.
    # A process may also start several groups in turn (a notebook, a test running many jobs in one
    # launch): each gets its own prefix too, the same on every rank since every rank counts alike.
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    attempt = env_int("TORCHELASTIC_RESTART_COUNT", 0)
    store = dist.PrefixStore(f"dist_cifar/attempt_{attempt}/group_{next(_GROUPS)}", store)
    dist.init_process_group(backend=chosen, store=store, rank=rank, world_size=world, timeout=timeout, **kwargs)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world, device=dev,
                    backend=chosen)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device_type: str = "cpu", backend: str = "gloo", timeout_s: float = 300.0) -> Iterator[DistInfo]:
    """A process group for the duration of the block, destroyed on every exit path."""
    info = init(device_type, backend, timeout_s)
    try:
        yield info
    finally:
        cleanup()


def mesh_groups(info: DistInfo, tp: int) -> tuple[Optional[object], Optional[object]]:
    """A (dp, tp) mesh of the ranks: (this rank's tp group, its dp group). tp groups are blocks of
    `tp` consecutive ranks (a node's, as torchrun numbers them); a dp group takes the ranks at
    the same place in every block. None stands for every rank (tp = world) or for no group at
    all (dp = 1). Every rank creates every group, in the same order, as new_group requires."""
    if tp >= info.world_size:
        return None, None
    blocks = [list(range(start, start + tp)) for start in range(0, info.world_size, tp)]
    mine_tp = mine_dp = None
    for ranks in blocks:
        group = dist.new_group(ranks)
        if info.rank in ranks:
            mine_tp = group
    for place in range(tp):
        ranks = [block[place] for block in blocks]
        group = dist.new_group(ranks)
        if info.rank in ranks:
            mine_dp = group
    return mine_tp, mine_dp


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.backend == "nccl":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def all_reduce_sum(info: DistInfo, tensor: torch.Tensor) -> torch.Tensor:
    """In-place SUM over ranks (identity when single-process)."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_tensors(info: DistInfo, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor of the same shape, on every rank."""
    if not info.distributed:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(info.world_size)]
    dist.all_gather(out, tensor.contiguous())
    return out


def all_gather_floats(info: DistInfo, value: float) -> list[float]:
    """Every rank's value of a host float, on every rank (e.g. per-rank epoch times)."""
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    if not info.distributed:
        return [value]
    out = [torch.zeros_like(t) for _ in range(info.world_size)]
    dist.all_gather(out, t)
    return [float(x.item()) for x in out]


def agree(info: DistInfo, first_bad_step: torch.Tensor, want_stop: bool) -> tuple[Optional[int], bool]:
    """One collective deciding, identically on every rank: (the earliest step at which any rank
    saw a non-finite loss, or None; does any rank want to stop). `first_bad_step` is a device
    scalar holding 2**31 when this rank saw none. Every rank must call it at the same step."""
    flags = torch.stack([first_bad_step.to(torch.float32).reshape(()),
                         torch.tensor(0.0 if want_stop else 1.0, device=first_bad_step.device)])
    if info.distributed:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    first_bad, keep_going = flags.tolist()
    return (int(first_bad) if first_bad < 2**31 else None), keep_going < 0.5


def broadcast_object(info: DistInfo, obj):
    """Rank 0's Python object on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(info: DistInfo, obj) -> list:
    """Every rank's Python object, on every rank."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(info: DistInfo, module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank."""
    if info.distributed:
        with torch.no_grad():
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)
