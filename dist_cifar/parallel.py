"""How a model is spread over the ranks: `parallelize(module, cfg, info)` -> WrappedModel.

Three designs (`--parallel`), all on plain torch.distributed, gloo or NCCL:

- `ddp`: every rank holds the whole model; DDP all-reduces every gradient (1.33 GB fp32 per
  step for vgg16_cifar, whatever the batch).
- `hybrid`: data parallelism for the convolutions, model parallelism for the classifier
  (Krizhevsky 2014, "One weird trick"). The trunk and the small replicated layers stay under DDP
  (it ignores the sharded parameters). The trunk's features are all-gathered along the batch,
  the first Linear is column-parallel (each rank owns a slice of its output neurons), the second
  row-parallel (each rank owns the matching slice of its inputs) and ends in a reduce-scatter
  that hands each rank the summed outputs of its own samples; later layers are replicated.
  Bytes per step scale with the batch (features), not with the 302M parameters of FC1.
- `fsdp`: torch's FSDP2 (`fully_shard` on every Linear and on the root; bf16 parameter
  all-gather under bf16, fp32 gradient reduce-scatter, AdamW steps the local shard). Its bytes
  scale with the parameters (3 x their size per step in ring terms), so it only wins when the
  batch is so large that the hybrid's gathered features outweigh them.

Gradient scale in the hybrid head. Each rank's loss is the mean over its own samples; DDP
averages the trunk's gradients over ranks. Inside the sharded region (between the gather and
the reduce-scatter) autograd would see the *sum* of the per-rank losses, so the reduce-scatter's
backward divides by W (the region then holds the gradient of the global mean loss), and the
gather's backward multiplies by W (the trunk gets the per-rank-mean scale that DDP averages).

Dropout stays correct: in the models here it precedes FC1, so it acts on each rank's own samples
before the gather (one draw per (sample, unit)); activations between FC1 and FC2 are split by
unit, so a dropout there would also be drawn by exactly one rank.

Checkpoints never see the layout: `stateful_model` / `stateful_optimizer` return objects whose
`state_dict()` is the plain single-process state (consolidated on rank 0; a collective) and
whose `load_state_dict()` takes that plain state and keeps this rank's slice. So a checkpoint
resumes under any design and world size, and `best.pt` loads into `models.build_model`.

Bytes on the wire: `plan.wire()` is what each rank sends per training step, by collective, in
ring-algorithm terms (all-reduce 2(W-1)/W x size, all-gather and reduce-scatter (W-1)/W x the
full size), read from the collectives themselves: DDP's reducer buckets, the hybrid head's
tensors as they are sent. FSDP2's collectives cannot be metered from outside, so its bytes are
computed from the padded shards it cuts (`cost.fsdp_wire`, which the prediction uses too).
`dist_cifar.cost.predict_wire` predicts the same numbers from the model alone. gloo implements reduce-scatter as an all-reduce, so on gloo
the reduce-scatter really sends twice its ring share; the accounting is the ring's.
"""
from __future__ import annotations

import contextlib
import functools
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import distributed as D
from .config import ConfigError, TrainConfig
from .cost import fsdp_units, fsdp_wire, ring_bytes, split_sizes


# ------------------------------------------------------------------------------ wrapper


class CommTimer:
    """A DDP communication hook that times each bucket's all-reduce.

    comm_s sums, over buckets, the host time from the bucket's hand-off to its future's
    completion. On gloo (CPU) that is the all-reduce itself; buckets overlap with backward and
    each other, so it is communication time, not time added to the step. On NCCL the future
    completes when the work is queued on the GPU stream, so the number is a lower bound."""

    def __init__(self, kind: str):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        self.base = {"allreduce": default_hooks.allreduce_hook,
                     "fp16": default_hooks.fp16_compress_hook,
                     "bf16": default_hooks.bf16_compress_hook}[kind]
        self.total_s = 0.0

    def hook(self, state, bucket):  # DDP calls this once per gradient bucket
        t0 = time.perf_counter()

        def done(fut):
            self.total_s += time.perf_counter() - t0
            return fut.value()

        return self.base(state, bucket).then(done)

    def take(self) -> float:
        value, self.total_s = self.total_s, 0.0
        return value


class FlipAveraged(nn.Module):
    """Test-time augmentation: the logits of an image and of its mirror, averaged. Training flips,
    so both views are in distribution; evaluation costs twice the forward passes."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.inner(x) + self.inner(x.flip(3))) / 2


@dataclass
class WrappedModel:
    module: nn.Module            # this rank's parameters (sharded under hybrid/fsdp): eval, checkpoints
    train_model: nn.Module       # what the step loop calls (DDP and/or compiled)
    eval_model: nn.Module        # module, compiled when --compile
    plan: "Plan"                 # how the parameters are spread: consolidation, bytes on the wire
    comm: Optional[CommTimer] = None


# ------------------------------------------------------------------------------ wire accounting


@dataclass
class Wire:
    """Bytes one rank sends per training step, by collective (ring accounting)."""

    world: int
    # site -> (kind, full bytes, ranks in the collective's group)
    sites: dict[str, tuple[str, int, int]] = field(default_factory=dict)

    def add(self, site: str, kind: str, full_bytes: int, group_size: Optional[int] = None) -> None:
        self.sites[site] = (kind, int(full_bytes), group_size or self.world)

    def by_kind(self) -> dict[str, int]:
        out = {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0}
        for kind, full, group_size in self.sites.values():
            out[kind] += ring_bytes(kind, full, group_size)
        return out

    def total(self) -> int:
        return sum(self.by_kind().values())


# ------------------------------------------------------------------------------ designs


class Plan:
    """`ddp` (and one process): every rank holds the whole model; the plain state is its own."""

    name = "ddp"
    lockstep = False  # must every rank run every forward (evaluation then pads batch counts)?

    def __init__(self, info: D.DistInfo):
        self.info = info
        self.wire_meter = Wire(info.world_size)
        self.ddp: Optional[DDP] = None
        self.hook_bytes = 4  # bytes per gradient element on the wire (2 with a bf16/fp16 hook)

    def wire(self) -> Wire:
        if self.ddp is not None:
            # the reducer's own buckets: fp32 gradient bytes of every parameter DDP manages
            sizes = str(self.ddp._get_ddp_logging_data().get("bucket_sizes", "0"))
            grad_bytes = sum(int(s) for s in sizes.split(",") if s.strip())
            self.wire_meter.add("ddp_gradients", "all_reduce", grad_bytes * self.hook_bytes // 4)
        return self.wire_meter

    # -- the plain (single-process) state, consolidated; collectives: every rank calls them
    def full_model_state(self, module: nn.Module) -> dict[str, Any]:
        return module.state_dict()

    def load_full_model_state(self, module: nn.Module, state: dict[str, Any]) -> None:
        module.load_state_dict(state)

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_full_optimizer_state(self, optimizer: torch.optim.Optimizer, module: nn.Module,
                                  state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def finish_gradients(self) -> None:
        """After the step's last backward, before unscaling and clipping: wait for the gradient
        collectives the layout issued itself (the 2-D hybrid's head shards over `dp`)."""

    def gradient_sync(self, enabled: bool):
        """A context for one micro-batch's backward: DDP's no_sync when `enabled` is False (the
        gradients accumulate locally until the last micro-batch of the step). The hybrid's head
        collectives move activations, not gradients: they run every micro-batch."""
        return self.ddp.no_sync() if self.ddp is not None and not enabled else contextlib.nullcontext()

    def clip_gradients(self, module: nn.Module, max_norm: float) -> torch.Tensor:
        """Scale every gradient so that the global L2 norm over all parameters is at most
        `max_norm`; returns the norm before clipping (a device scalar, the same on every rank).
        DDP's gradients are already averaged and identical on every rank."""
        return torch.nn.utils.clip_grad_norm_(list(module.parameters()), max_norm)

    def replicated_parameters(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The parameters every rank holds in full (and must hold identically)."""
        shards = getattr(self, "shards", {})
        return [(name, p) for name, p in module.named_parameters() if name not in shards]

    def describe(self) -> str:
        if not self.info.distributed:
            return "one process"
        if self.ddp is None:
            return "ddp at world size 1: the bare module, no DDP wrapper or comm hook (--ddp-single adds them)"
        return "ddp (every rank holds the whole model)" + (" at world size 1 (--ddp-single)" if self.info.world_size == 1 else "")


@dataclass(frozen=True)
class Shard:
    """This rank's slice of a parameter of the plain model: along `dim`, `sizes[r]` rows for rank r."""

    dim: int
    sizes: tuple[int, ...]

    def offset(self, rank: int) -> int:
        return sum(self.sizes[:rank])

    def local(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        return full.narrow(self.dim, self.offset(rank), self.sizes[rank])


class ShardedPlan(Plan):
    """Parameters some of which are split over the ranks (`shards`: FQN -> Shard); consolidation
    gathers them on rank 0, loading keeps this rank's slice of the plain tensor."""

    lockstep = True

    def __init__(self, info: D.DistInfo):
        super().__init__(info)
        self.shards: dict[str, Shard] = {}
        # the ranks a parameter is split over, this rank's slice among them, and whether this
        # rank's group is the one holding rank 0 (the others hold replicas of the same slices)
        self.shard_group, self.shard_rank, self.gathers = None, info.rank, True
        self.gather_on_host = False  # the shard group is gloo under an NCCL run

    def _gather(self, local: torch.Tensor, shard: Shard) -> Optional[torch.Tensor]:
        """The plain tensor on rank 0 (None elsewhere); uneven slices are padded for the gather.
        Only rank 0's shard group takes part (a collective of that group)."""
        if not self.gathers:
            return None
        biggest = max(shard.sizes)
        pad = [0, 0] * (local.dim() - 1 - shard.dim) + [0, biggest - local.shape[shard.dim]]
        padded = F.pad(local.detach(), pad).contiguous()
        if self.gather_on_host:
            padded = padded.cpu()
        pieces = [torch.empty_like(padded) for _ in shard.sizes] if self.info.is_main else None
        dist.gather(padded, pieces, dst=0, group=self.shard_group)
        if not self.info.is_main:
            return None
        return torch.cat([p.narrow(shard.dim, 0, n) for p, n in zip(pieces, shard.sizes)], dim=shard.dim)

    def full_model_state(self, module: nn.Module) -> dict[str, Any]:
        state = module.state_dict()
        for name, shard in self.shards.items():
            state[name] = self._gather(state[name], shard)
        return state if self.info.is_main else {}

    def load_full_model_state(self, module: nn.Module, state: dict[str, Any]) -> None:
        mine = dict(state)
        for name, shard in self.shards.items():
            mine[name] = shard.local(state[name], self.shard_rank)
        module.load_state_dict(mine)

    def _param_shards(self, module: nn.Module) -> dict[int, Shard]:
        """Optimizer index -> Shard (the optimizer holds module.parameters() in order)."""
        return {i: self.shards[name] for i, (name, _) in enumerate(module.named_parameters()) if name in self.shards}

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, Any]:
        state = optimizer.state_dict()
        params = list(module.parameters())
        for index, shard in self._param_shards(module).items():
            # a copy: state_dict() shares the per-parameter dicts with the live optimizer
            per_param = state["state"][index] = dict(state["state"].get(index, {}))
            for key, value in per_param.items():
                if isinstance(value, torch.Tensor) and value.shape == params[index].shape:
                    per_param[key] = self._gather(value, shard)  # moments; `step` stays as it is
        return state if self.info.is_main else {}

    def load_full_optimizer_state(self, optimizer: torch.optim.Optimizer, module: nn.Module,
                                  state: dict[str, Any]) -> None:
        mine = {"param_groups": state["param_groups"], "state": {i: dict(s) for i, s in state["state"].items()}}
        params = list(module.parameters())
        for index, shard in self._param_shards(module).items():
            full_shape = list(params[index].shape)
            full_shape[shard.dim] = sum(shard.sizes)
            for key, value in mine["state"].get(index, {}).items():
                if isinstance(value, torch.Tensor) and list(value.shape) == full_shape:
                    mine["state"][index][key] = shard.local(value, self.shard_rank).clone()
        optimizer.load_state_dict(mine)


# ---- hybrid: the collectives as autograd functions

# torch >= 2.12 renamed the tensor forms (the old names warn on every call); older torch has only those
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def gather_rows(x: torch.Tensor, head: "HeadComm", site: str) -> torch.Tensor:
    """Every head rank's rows, concatenated along dim 0 (all-gather over the tp group)."""
    x = x.contiguous()
    out = x.new_empty((head.world * x.shape[0], *x.shape[1:]))
    _all_gather_tensor(out, x, group=head.group)
    head.note(site, "all_gather", out)
    return out


def sum_rows_scattered(x: torch.Tensor, head: "HeadComm", site: str) -> torch.Tensor:
    """Summed over the head's ranks in fp32, each keeping its own slice of dim 0 (reduce-scatter)."""
    full = x.float().contiguous()
    mine = full.new_empty((full.shape[0] // head.world, *full.shape[1:]))
    _reduce_scatter_tensor(mine, full, group=head.group)
    head.note(site, "reduce_scatter", full)
    return mine


class GatherBatch(torch.autograd.Function):
    """Forward: every rank's rows, concatenated along the batch. Backward: the gradient's rows of
    this rank summed over ranks, times W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, head: "HeadComm") -> torch.Tensor:
        ctx.head = head
        return gather_rows(x, head, "head_features")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (sum_rows_scattered(grad, ctx.head, "head_features_grad") * ctx.head.world).to(grad.dtype), None


class ReduceScatterBatch(torch.autograd.Function):
    """Forward: partial outputs summed over ranks (fp32), each rank keeping its own samples' rows.
    Backward: every rank's output gradient, concatenated, over W."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, head: "HeadComm") -> torch.Tensor:
        ctx.head = head
        return sum_rows_scattered(partial, head, "head_outputs")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return gather_rows(grad, ctx.head, "head_outputs_grad") / ctx.head.world, None


@dataclass(eq=False)
class HeadComm:
    """What the head's collectives share: the ranks the head is sharded over (`world` of them:
    the tp group; None is every rank), and the meter of training steps' bytes (evaluation
    forwards are not training steps and are not metered)."""

    world: int
    wire: Wire
    metering: bool = True
    group: Optional[Any] = None

    def note(self, site: str, kind: str, full: torch.Tensor) -> None:
        if self.metering:
            self.wire.add(site, kind, full.numel() * full.element_size(), self.world)


class ColumnParallelLinear(nn.Module):
    """This rank's output neurons of a Linear, on every rank's samples (gathered first)."""

    def __init__(self, full: nn.Linear, shard: Shard, rank: int, comm: HeadComm):
        super().__init__()
        self.comm = comm
        self.weight = nn.Parameter(shard.local(full.weight.detach(), rank).clone())
        self.bias = nn.Parameter(shard.local(full.bias.detach(), rank).clone()) if full.bias is not None else None

    def forward(self, x_local: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x_local.device.type):  # features travel in the autocast dtype
            x_local = x_local.to(torch.get_autocast_dtype(x_local.device.type))
        self.comm.metering = self.training
        x = GatherBatch.apply(x_local, self.comm) if self.comm.world > 1 else x_local
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """This rank's input columns of a Linear; partial outputs reduce-scattered back to each
    rank's own samples, then the (replicated) bias."""

    def __init__(self, full: nn.Linear, shard: Shard, rank: int, comm: HeadComm):
        super().__init__()
        self.comm = comm
        self.weight = nn.Parameter(shard.local(full.weight.detach(), rank).clone())
        self.bias = nn.Parameter(full.bias.detach().clone()) if full.bias is not None else None

    def forward(self, x_columns: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x_columns, self.weight)
        out = ReduceScatterBatch.apply(partial, self.comm) if self.comm.world > 1 else partial.float()
        return out + self.bias if self.bias is not None else out


ELEMENTWISE_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Mish,
                       nn.Dropout, nn.Identity)
ELEMENTWISE_FUNCTIONS = (torch.relu, torch.relu_, F.relu, F.relu_, F.gelu, F.silu, torch.tanh, torch.sigmoid,
                         F.leaky_relu, F.elu, F.dropout, F.hardswish, F.mish)
ELEMENTWISE_METHODS = ("relu", "relu_", "tanh", "sigmoid")


def head_pair_problem(module: nn.Module, first: str, second: str) -> str:
    """Why `second` does not consume `first`'s output through elementwise ops alone ('' when it
    does). A column-parallel `first` leaves each rank a slice of its output features; anything
    but elementwise ops (a residual, a norm over features, a reshape) would mix slices."""
    import torch.fx
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception as exc:  # data-dependent control flow, untraceable ops
        return f"the model does not trace with torch.fx ({type(exc).__name__}), so that cannot be checked"
    calls = {node.target: node for node in graph.nodes if node.op == "call_module"}
    if first not in calls or second not in calls:
        return f"{first} or {second} is not called in forward (or called more than once)"
    node, end = calls[first], calls[second]
    while True:
        users = list(node.users)
        if len(users) != 1:
            return f"the output of {node.name} is used {len(users)} times"
        node = users[0]
        if node is end:
            return ""
        elementwise = ((node.op == "call_module" and isinstance(module.get_submodule(node.target), ELEMENTWISE_MODULES))
                       or (node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS)
                       or (node.op == "call_method" and node.target in ELEMENTWISE_METHODS))
        if not elementwise:
            return f"{node.name} ({node.op} {getattr(node.target, '__name__', node.target)}) stands between them"


def head_ranks(info: D.DistInfo, tp_size: int) -> int:
    """How many ranks share one copy of the head (the tp group): `--tp-size`, else the ranks of a
    node, else (one rank per node) every rank: the flat layout."""
    size = tp_size or (info.local_world_size if 1 < info.local_world_size < info.world_size else info.world_size)
    if size > info.world_size or info.world_size % size:
        raise ConfigError(f"--tp-size {size} must divide the world size {info.world_size} (the ranks form "
                          f"world/tp groups of tp ranks that each hold one copy of the head)")
    return size


class HybridPlan(ShardedPlan):
    """The head sharded over tp groups of `tp` consecutive ranks (a node's GPUs by default), its
    slices averaged over the `dp` ranks holding the same slice (one per tp group), everything
    else averaged over all ranks by DDP. Flat (tp = world): one tp group and no dp sync."""

    name = "hybrid"

    def __init__(self, info: D.DistInfo, module: nn.Module, tp_size: int = 0, comm_hook: str = "none"):
        super().__init__(info)
        self.tp = head_ranks(info, tp_size)
        self.dp = info.world_size // self.tp
        self.tp_group, self.dp_group = D.mesh_groups(info, self.tp)
        self.shard_group, self.shard_rank, self.gathers = self.tp_group, info.rank % self.tp, info.rank < self.tp
        if info.backend == "nccl":  # consolidation (best.pt) gathers host copies: no GPU ever holds the full head
            self.shard_group, self.gather_on_host = dist.new_group(list(range(self.tp)), backend="gloo"), True
        self.sync_shards, self.pending = True, []
        # the slices' all-reduce in the DDP hook's dtype, as DDP's own buckets go (fp32 without one)
        self.slice_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(comm_hook)
        linears = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
        if len(linears) < 2:
            raise ConfigError("--parallel hybrid shards a classifier of at least two Linear layers; this model has "
                              f"{len(linears)}: use --parallel ddp")
        (first_name, first), (second_name, second) = linears[:2]
        problem = head_pair_problem(module, first_name, second_name)
        if problem:
            raise ConfigError(f"--parallel hybrid shards {first_name} by output and {second_name} by input, which "
                              f"needs {second_name} to read {first_name}'s output through elementwise ops only; "
                              f"{problem}: use --parallel ddp")
        if first.out_features < self.tp:
            raise ConfigError(f"--parallel hybrid: {first.out_features} output neurons of {first_name} cannot be "
                              f"split over {self.tp} ranks: use --parallel ddp (or a smaller --tp-size)")
        sizes = split_sizes(first.out_features, self.tp)
        self.comm = HeadComm(self.tp, self.wire_meter, group=self.tp_group)
        column = ColumnParallelLinear(first, Shard(0, sizes), self.shard_rank, self.comm)
        row = RowParallelLinear(second, Shard(1, sizes), self.shard_rank, self.comm)
        for name, replacement in ((first_name, column), (second_name, row)):
            parent_name, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, child, replacement)
        self.shards = {f"{first_name}.weight": Shard(0, sizes), f"{second_name}.weight": Shard(1, sizes)}
        if first.bias is not None:
            self.shards[f"{first_name}.bias"] = Shard(0, sizes)
        self.layers = (first_name, second_name, sizes)
        if self.dp > 1:
            for name in self.shards:
                module.get_parameter(name).register_post_accumulate_grad_hook(
                    functools.partial(self._average_over_dp, name))

    def _average_over_dp(self, name: str, param: nn.Parameter) -> None:
        """As soon as backward has a head slice's gradient (the head's come first), its all-reduce
        over the ranks holding the same slice starts, overlapping the trunk's backward; in the
        DDP hook's dtype when --ddp-comm-hook compresses (fp16/bf16), as DDP's own buckets are."""
        if not self.sync_shards:
            return  # an accumulating micro-batch (--grad-accum-steps): the last one syncs
        grad = param.grad
        wire = grad.to(self.slice_dtype) if self.slice_dtype is not None else grad
        self.pending.append((dist.all_reduce(wire, group=self.dp_group, async_op=True), grad, wire))
        if self.comm.metering:
            self.wire_meter.add(f"head_slice_grads {name}", "all_reduce", wire.numel() * wire.element_size(), self.dp)

    def finish_gradients(self) -> None:
        for work, grad, wire in self.pending:
            work.wait()
            if wire is not grad:
                grad.copy_(wire)
            grad.div_(self.dp)
        self.pending.clear()

    def gradient_sync(self, enabled: bool):
        self.sync_shards = enabled
        return super().gradient_sync(enabled)

    def clip_gradients(self, module: nn.Module, max_norm: float) -> torch.Tensor:
        """The replicated parameters' squared norm (identical on every rank) plus the head slices'
        squared norms summed over the tp group (each slice once; its dp replicas are equal) in one
        tiny all-reduce: one global norm and one coefficient everywhere. Clipping each rank by its
        own slices would give the ranks different coefficients and split the replicas."""
        grads = [(name, p.grad) for name, p in module.named_parameters() if p.grad is not None]
        zero = torch.zeros((), dtype=torch.float32, device=self.info.device)
        sliced = sum((g.float().pow(2).sum() for name, g in grads if name in self.shards), zero)
        whole = sum((g.float().pow(2).sum() for name, g in grads if name not in self.shards), zero)
        if self.tp > 1:
            dist.all_reduce(sliced, group=self.tp_group)
        total = (whole + sliced).sqrt()
        coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([g for _, g in grads], coefficient)
        return total

    def describe(self) -> str:
        first, second, sizes = self.layers
        spread = f"{sizes[0]}" if len(set(sizes)) == 1 else "/".join(map(str, sizes))
        layout = (f"; 2-D: {self.dp} groups of {self.tp} ranks each hold the head, its slices averaged across groups"
                  if self.dp > 1 else "")
        return (f"hybrid (convolutions data-parallel; {first} column-parallel, {second} row-parallel: "
                f"{spread} neurons per rank{layout})")


class FSDPPlan(ShardedPlan):
    """FSDP2 over `cost.fsdp_units`: every BatchNorm in one unit that keeps fp32 parameters under
    bf16, every Linear its own unit (resharded after forward), the rest in the root unit."""

    name = "fsdp"

    def __init__(self, info: D.DistInfo, module: nn.Module, precision: str):
        super().__init__(info)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        self.precision = precision
        self.param_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        low = MixedPrecisionPolicy(param_dtype=self.param_dtype if precision == "bf16" else None,
                                   reduce_dtype=torch.float32)
        full = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
        mesh = init_device_mesh(info.device.type, (info.world_size,))
        self.units = fsdp_units(module)
        for unit in self.units:
            targets = [module.get_submodule(name) for name in unit.modules]
            fully_shard(targets if len(targets) > 1 else targets[0], mesh=mesh,
                        mp_policy=full if unit.full_precision else low, reshard_after_forward=unit.regathered)
        self.module = module

    def replicated_parameters(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return []  # every parameter is a shard

    def gradient_sync(self, enabled: bool):
        """FSDP2's own switch: without sync, each micro-batch's gradients accumulate unsharded and
        the reduce-scatter runs once, in the last micro-batch's backward."""
        self.module.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def clip_gradients(self, module: nn.Module, max_norm: float) -> torch.Tensor:
        """torch's own clipping over the DTensor gradients: it sums the shards' squared norms
        over the mesh, so every rank scales by the same global coefficient."""
        total = torch.nn.utils.clip_grad_norm_(list(module.parameters()), max_norm)
        return total.full_tensor() if hasattr(total, "full_tensor") else total

    def wire(self) -> Wire:
        # Computed from the shapes FSDP2 shards (dim 0 padded to the world size) by the function
        # dist_cifar.cost.predict_wire uses too: FSDP2's collectives have no hook to meter them.
        for site, (kind, full) in fsdp_wire(self.module, self.info.world_size, self.precision).items():
            self.wire_meter.add(site, kind, full)
        return self.wire_meter

    def full_model_state(self, module: nn.Module) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_model_state(self, module: nn.Module, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        # a copy: set_model_state_dict rewrites the dict it is given into DTensors, in place
        set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True))

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        by_name = get_optimizer_state_dict(module, optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.info.is_main:
            return {}
        index = {name: i for i, (name, _) in enumerate(module.named_parameters())}
        groups = [dict(g, params=[index[n] for n in g["params"]]) for g in by_name["param_groups"]]
        return {"state": {index[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}

    def load_full_optimizer_state(self, optimizer: torch.optim.Optimizer, module: nn.Module,
                                  state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        names = [name for name, _ in module.named_parameters()]
        by_name = {"state": {names[int(i)]: s for i, s in state["state"].items()},
                   "param_groups": [dict(g, params=[names[int(i)] for i in g["params"]]) for g in state["param_groups"]]}
        set_optimizer_state_dict(module, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    def describe(self) -> str:
        gather = "bf16 parameter all-gather (BatchNorm fp32)" if self.param_dtype == torch.bfloat16 \
            else "fp32 parameter all-gather"
        return f"fsdp (FSDP2: {len(self.units)} units, {gather}, fp32 gradient reduce-scatter)"


# ------------------------------------------------------------------------------ replica-drift guard


class ReplicaDrift(RuntimeError):
    """Parameters that every rank should hold identically differ between ranks."""


CHECKSUM_CHUNK = 1 << 24  # elements widened to int64 at a time (128 MB)
_INT_OF_SIZE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def checksum(tensor: torch.Tensor) -> torch.Tensor:
    """Two int64 sums over the tensor's bit patterns (plain, and weighted by position): exact
    integer arithmetic, so equal tensors give equal sums on any rank, whatever the reduction
    order; any changed element changes them (a swap of two changes the weighted one)."""
    bits = tensor.detach().reshape(-1)
    bits = bits.view(_INT_OF_SIZE[bits.element_size()])
    total = torch.zeros(2, dtype=torch.int64, device=tensor.device)
    for start in range(0, bits.numel(), CHECKSUM_CHUNK):
        chunk = bits[start:start + CHECKSUM_CHUNK].to(torch.int64)
        weights = torch.arange(start, start + chunk.numel(), device=tensor.device) % 1_000_003 + 1
        total[0] += chunk.sum()
        total[1] += (chunk * weights).sum()
    return total


def check_replicas(plan: Plan, module: nn.Module, where: str) -> None:
    """Every rank's replicated parameters against rank 0's (one all-gather of two int64 per
    parameter); ReplicaDrift, identically on every rank, naming the first that differs. A
    collective: every rank calls it at the same point (before each checkpoint and at the end)."""
    info = plan.info
    named = plan.replicated_parameters(module)
    # the 2-D hybrid's head slices: every tp group holds a copy, which must equal tp group 0's
    sliced = [(name, module.get_parameter(name)) for name in plan.shards] if getattr(plan, "dp", 1) > 1 else []
    if not info.distributed or info.world_size == 1 or not (named or sliced):
        return
    mine = torch.stack([checksum(p) for _, p in named + sliced])
    every = torch.stack(D.all_gather_tensors(info, mine))  # (rank, parameter, 2)
    reference = every[0].expand_as(every).clone()  # replicated: rank 0's; a slice: its copy in rank 0's tp group
    if sliced:
        reference[:, len(named):] = every[torch.arange(info.world_size) % plan.tp, len(named):]
    differs = (every != reference).any(dim=2).cpu()  # (rank, parameter)
    if not differs.any():
        return
    first = int(differs.any(dim=0).nonzero()[0])
    ranks = [r for r in range(info.world_size) if differs[r, first]]
    count = int(differs.any(dim=0).sum())
    name = (named + sliced)[first][0]
    against = "rank 0" if first < len(named) else "the same slice in rank 0's tp group"
    raise ReplicaDrift(f"replicas diverged {where}: {name} differs on rank{'s' if len(ranks) > 1 else ''} "
                       f"{', '.join(map(str, ranks))} from {against} ({count} of {len(named) + len(sliced)} replicated "
                       f"parameters differ); nothing was checkpointed after it and the newest committed checkpoint is "
                       f"kept: rerun to resume from it, and report the command if it happens again")


# ------------------------------------------------------------------------------ entry point


def parallelize(module: nn.Module, cfg: TrainConfig, info: D.DistInfo) -> WrappedModel:
    """Spread `module` (built with the run's seed, on its device) over the ranks as `cfg.parallel`
    says; return what the step loop, evaluation and checkpoints use."""
    if cfg.sync_bn and info.distributed:  # runtime.resolve has refused it on CPU
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    design = cfg.parallel if info.distributed else "ddp"  # one process: nothing to spread
    # FSDP2 refuses non-contiguous parameters; channels_last inputs still make the convolutions
    # run channels_last (the format follows the input), so only the weights stay contiguous
    channels_last = cfg.channels_last and design != "fsdp"
    module = module.to(info.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    plan: Plan
    ignored: list[str] = []
    if design == "hybrid":
        plan = HybridPlan(info, module, cfg.tp_size, cfg.ddp_comm_hook)
        ignored = list(plan.shards)  # DDP neither broadcasts nor all-reduces this rank's own slices
    elif design == "fsdp":
        plan = FSDPPlan(info, module, cfg.precision)
    else:
        plan = Plan(info)
    train_model: nn.Module = module
    comm = None
    # one process: DDP would only add its reducer and hook to every step (unless asked for)
    if info.distributed and design != "fsdp" and (info.world_size > 1 or cfg.ddp_single):
        if ignored:
            DDP._set_params_and_buffers_to_ignore_for_model(module, ignored)
        with warnings.catch_warnings():
            # torch >= 2.12 deprecates the name, but its replacement still syncs buffers at init
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            train_model = DDP(
                module, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                bucket_cap_mb=cfg.ddp_bucket_mb, gradient_as_bucket_view=cfg.ddp_grad_as_bucket_view,
                static_graph=cfg.ddp_static_graph,
                # BatchNorm statistics stay per rank while training (no broadcast before every forward);
                # the trainer broadcasts rank 0's buffers once before each evaluation instead.
                broadcast_buffers=False,
            )
        plan.ddp = train_model
        if cfg.ddp_comm_hook != "none":
            comm = CommTimer(cfg.ddp_comm_hook)
            train_model.register_comm_hook(None, comm.hook)
            plan.hook_bytes = 2 if cfg.ddp_comm_hook in ("fp16", "bf16") else 4
    torch.manual_seed(cfg.seed + 7_919 * (info.rank + 1))  # dropout masks differ between ranks
    eval_model = module
    if cfg.compile:
        # the head's collectives live in autograd functions: it runs eagerly (disabled here, not
        # with a decorator, so a run without compile never imports torch._dynamo: ~1 s a start)
        for head in (m for m in module.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))):
            head.forward = torch.compiler.disable(head.forward)
        train_model = torch.compile(train_model, mode=cfg.compile_mode, dynamic=False)
        eval_model = torch.compile(module, mode=cfg.compile_mode, dynamic=False)
    if cfg.tta_flip:
        eval_model = FlipAveraged(eval_model)  # outside compile: both views reuse one graph
    return WrappedModel(module, train_model, eval_model, plan, comm)


class ConsolidatedModel:
    """The checkpoint's view of the model: the plain state_dict, whatever the layout."""

    def __init__(self, plan: Plan, module: nn.Module):
        self.plan, self.module = plan, module

    def state_dict(self) -> dict[str, Any]:
        return self.plan.full_model_state(self.module)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plan.load_full_model_state(self.module, state)


class ConsolidatedOptimizer:
    """The checkpoint's view of the optimizer: a single process's state_dict."""

    def __init__(self, plan: Plan, optimizer: torch.optim.Optimizer, module: nn.Module):
        self.plan, self.optimizer, self.module = plan, optimizer, module

    def state_dict(self) -> dict[str, Any]:
        return self.plan.full_optimizer_state(self.optimizer, self.module)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plan.load_full_optimizer_state(self.optimizer, self.module, state)
