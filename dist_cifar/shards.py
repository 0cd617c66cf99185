"""Sharded checkpoints: each rank writes and reads its own part of the training state with
torch.distributed.checkpoint (DCP), for the layouts that shard the model (hybrid, fsdp).

A checkpoint is a folder, `ckpt-e0003-s0000150.dcp/`:

    __<rank>_0.distcp  each rank's tensors: its slices of the sharded parameters, of their optimizer
                       moments and EMA; a replicated tensor is written once, by one rank (DCP dedups)
    .metadata          DCP's index: every tensor's plain (single-process) shape and where its chunks lie
    state.pt           rank 0: everything else (RunState, every rank's RNG, schedule, GradScaler,
                       optimizer hyper-parameters, config): plain data, loaded weights_only

committed by `ckpt-e0003-s0000150.dcp.commit` beside it, which lists every file's size and sha256.

Keys are the names of the plain model: `model.<fqn>`, `optimizer.<fqn>.<exp_avg|...>`,
`ema.<fqn>`. A tensor split over ranks is stored as chunks of the plain tensor (each rank's
slice with its offset in it), so DCP reshards on load: the hybrid at another tp size, fsdp, ddp
(whole tensors), any world size. No rank ever assembles the full state: each reads the byte
ranges of its own slices, straight into its live parameters and optimizer state.

DCP's index is a pickle. Before DCP opens it, it is read once with an unpickler that admits only
DCP's metadata classes, so a forged folder cannot run code (its hashes are checked first anyway).
"""
from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from . import files
from .ema import local

SUFFIX = ".dcp"
STATE = "state.pt"
INDEX = ".metadata"
Where = Optional[tuple[tuple[int, ...], tuple[int, ...]]]  # (offsets in the plain tensor, its shape); None: whole


def place(local: torch.Tensor, where: Where) -> torch.Tensor:
    """`local` as DCP's chunk of a bigger tensor at `where` (the dunder protocol DTensor implements:
    DCP asks any tensor that has these for its chunks, so no wrapper class is needed)."""
    if where is None:
        return local
    live, local = local, local.detach()  # a new object on the same storage: only it gets the attributes
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
    offsets, shape = torch.Size(where[0]), torch.Size(where[1])
    chunk = ChunkStorageMetadata(offsets=offsets, sizes=local.shape)
    local.__create_write_items__ = lambda fqn, _obj: [WriteItem(
        index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties.create_from_tensor(local), size=shape))]
    local.__create_chunk_list__ = lambda: [chunk]
    local.__get_tensor_shard__ = lambda _index: live.detach()  # what DCP reads from or writes into
    local.size = lambda *dim: shape[dim[0]] if dim else shape  # DCP checks the plain shape on load, as a DTensor's
    return local


def where_is(plan, fqn: str, tensor: torch.Tensor) -> tuple[torch.Tensor, Where]:
    """This rank's tensor for parameter/buffer `fqn` and where it sits in the plain tensor: a DTensor
    (FSDP2) says so itself, the hybrid's slices are in `plan.shards`, anything else is whole."""
    if hasattr(tensor, "to_local"):
        chunk = tensor.__create_chunk_list__()[0]
        return tensor.to_local(), (tuple(chunk.offsets), tuple(tensor.shape))
    shard = getattr(plan, "shards", {}).get(fqn)
    if shard is None:
        return tensor, None
    offsets = [0] * tensor.dim()
    offsets[shard.dim] = shard.offset(plan.shard_rank)
    shape = list(tensor.shape)
    shape[shard.dim] = sum(shard.sizes)
    return tensor, (tuple(offsets), tuple(shape))


class ShardedState:
    """One rank's view of the resumable tensors under the plain names, for DCP: the live tensors
    (loading writes into them in place) and where each sits in the plain tensor."""

    def __init__(self, plan, module: nn.Module, optimizer: torch.optim.Optimizer, ema=None, *, writes: bool):
        """`writes`: this run saves sharded checkpoints (a sharded layout at several ranks). Every
        rank constructs it at the same point (a process group is made)."""
        self.plan, self.module, self.optimizer, self.ema = plan, module, optimizer, ema
        self.writes = writes
        self.names = [name for name, _ in module.named_parameters()]
        # DCP's collectives run in the writer threads while training runs its own: a group of their
        # own, on gloo (DCP exchanges pickled plans; under NCCL they would travel through the GPU)
        several = dist.is_initialized() and dist.get_world_size() > 1
        self.group = dist.new_group(backend="gloo") if several else None

    def tensors(self, *, with_ema: bool = True) -> dict[str, tuple[torch.Tensor, Where]]:
        """key -> (this rank's live tensor, where it sits). Skips empty shards (FSDP2 gives the last
        ranks none of a small parameter): the other ranks' chunks cover the tensor."""
        out = {f"model.{fqn}": where_is(self.plan, fqn, value) for fqn, value in self.module.state_dict().items()}
        placement = {fqn: out[f"model.{fqn}"][1] for fqn in self.names}
        params = dict(self.module.named_parameters())
        for index, per_param in self.optimizer.state_dict()["state"].items():
            fqn = self.names[int(index)]
            for key, value in per_param.items():
                if isinstance(value, torch.Tensor):  # moments sit where their parameter does; `step` is whole
                    mine = local(value)
                    like_param = mine.dim() > 0 and mine.shape == local(params[fqn]).shape
                    out[f"optimizer.{fqn}.{key}"] = (mine, placement[fqn] if like_param else None)
        if self.ema is not None and with_ema:
            for fqn, shadow in zip(self.names, self.ema.shadow):
                out[f"ema.{fqn}"] = (shadow, placement[fqn])
        return {key: (t, w) for key, (t, w) in out.items() if t.numel() or w is None}

    def extra(self) -> dict[str, Any]:
        """What is not a tensor of the state: the optimizer's hyper-parameters by parameter name,
        the EMA's update count."""
        groups = self.optimizer.state_dict()["param_groups"]
        out = {"optimizer_groups": [dict(g, params=[self.names[int(i)] for i in g["params"]]) for g in groups]}
        if self.ema is not None:
            out["ema_updates"] = self.ema.updates
        return out

    def prepare_load(self) -> None:
        """The optimizer's state tensors exist (a fresh optimizer creates them at its first step),
        so that DCP can load into them."""
        if not self.optimizer.state:
            from torch.distributed.checkpoint.state_dict import _init_optim_state
            _init_optim_state(self.optimizer)

    def load_extra(self, saved: dict[str, Any]) -> None:
        groups = saved["optimizer_groups"]
        mine = self.optimizer.param_groups
        if len(groups) != len(mine) or any(len(g["params"]) != len(m["params"]) for g, m in zip(groups, mine)):
            raise ValueError("its optimizer has other parameter groups")
        for group, saved_group in zip(mine, groups):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        if self.ema is not None:
            self.ema.updates = int(saved.get("ema_updates", 0))


def placed(tensors: dict[str, tuple[torch.Tensor, Where]]) -> dict[str, torch.Tensor]:
    return {key: place(t, where) for key, (t, where) in tensors.items()}


def write(folder: Path, tensors: dict[str, torch.Tensor], group) -> None:
    """Every rank's tensors into `folder` (DCP; a collective of `group`), each file fsynced."""
    import torch.distributed.checkpoint as dcp
    writer = dcp.FileSystemWriter(str(folder), single_file_per_rank=True, sync_files=True, thread_count=1)
    dcp.save(tensors, storage_writer=writer, process_group=group)


def own_files(folder: Path, group_rank: int) -> list[Path]:
    """The files this rank wrote (FileSystemWriter names them `__<rank>_<n>.distcp`)."""
    return sorted(folder.glob(f"__{group_rank}_*.distcp"))


def file_hashes(paths: list[Path]) -> dict[str, tuple[int, str]]:
    return {path.name: files.sha256_file(path) for path in paths}


class IndexUnpickler(pickle.Unpickler):
    """DCP's index classes, torch sizes, dtypes and layouts, and nothing else."""

    MODULES = ("torch.distributed.checkpoint.metadata",)
    NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
             ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
             ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        if module in self.MODULES or (module, name) in self.NAMES or \
                (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP index")


def read_index(folder: Path):
    """DCP's Metadata of `folder`, read without admitting anything but its own classes."""
    data = (folder / INDEX).read_bytes()
    return IndexUnpickler(io.BytesIO(data)).load()


def saved_keys(folder: Path) -> set[str]:
    return set(read_index(folder).state_dict_metadata)


def read(folder: Path, tensors: dict[str, torch.Tensor], group) -> None:
    """Fill `tensors` (live, placed) from `folder`; each rank reads only the chunks it needs.
    A collective of `group`."""
    import torch.distributed.checkpoint as dcp
    read_index(folder)  # refuses a forged index before DCP unpickles it
    dcp.load(tensors, storage_reader=dcp.FileSystemReader(str(folder)), process_group=group)



def read_plain(folder: Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The plain (single-process) tensors under `prefix`, whole, in this process: for evaluation
    and inspection of a sharded checkpoint without a process group (holds them all in memory)."""
    import torch.distributed.checkpoint as dcp
    index = read_index(folder).state_dict_metadata
    tensors = {key: torch.empty(tuple(md.size), dtype=md.properties.dtype) for key, md in index.items()
               if key.startswith(prefix) and hasattr(md, "size")}
    with warnings.catch_warnings():  # DCP says it assumes one process: that is the point here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(tensors, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
    return {key[len(prefix):]: t for key, t in tensors.items()}
