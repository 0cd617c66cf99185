"""What a model costs: parameters by layer, FLOPs per image, gradient bytes, time floors.

    python -m dist_cifar.cost --model vgg16_cifar --batch-size 512 --gpus 8 \
        --peak-tflops 790 --link-gbs 400

FLOPs are measured, not derived: one forward (and one forward+backward) of a batch of two on
the meta device under torch's FlopCounterMode (matmuls and convolutions, 2 FLOPs per MAC).
Floors assume perfect utilisation: compute = FLOPs / peak; all-reduce = ring traffic
2 (N-1)/N x gradient bytes per GPU / link bandwidth.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .models import MODELS, build_model

TRAIN_IMAGES = 50_000


@dataclass
class ModelCost:
    model: str
    params: int
    param_groups: dict[str, int]
    forward_flops_per_image: float
    train_flops_per_image: float
    grad_bytes_fp32: int
    grad_bytes_bf16: int


def param_groups(model: nn.Module) -> dict[str, int]:
    """Parameters per layer kind; each Linear separately, since one of them usually dominates."""
    groups: dict[str, int] = {}
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if not own:
            continue
        if isinstance(module, nn.Linear):
            key = f"linear {name} ({module.in_features}->{module.out_features})"
        elif isinstance(module, nn.Conv2d):
            key = "conv (all)"
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            key = "batchnorm (all)"
        else:
            key = f"other {type(module).__name__}"
        groups[key] = groups.get(key, 0) + own
    return groups


def measure(name: str, **switches) -> ModelCost:
    with torch.device("meta"):
        model = build_model(name, **switches)
    x = torch.empty(2, 3, 32, 32, device="meta")
    y = torch.zeros(2, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as fwd:
        model(x)
    with FlopCounterMode(display=False) as train:
        nn.functional.cross_entropy(model(x), y).backward()
    params = sum(p.numel() for p in model.parameters())
    return ModelCost(model=name, params=params, param_groups=param_groups(model),
                     forward_flops_per_image=fwd.get_total_flops() / 2, train_flops_per_image=train.get_total_flops() / 2,
                     grad_bytes_fp32=params * 4, grad_bytes_bf16=params * 2)


def ring_allreduce_s(grad_bytes: float, gpus: int, link_gbs: float) -> float:
    return 0.0 if gpus <= 1 else 2 * (gpus - 1) / gpus * grad_bytes / (link_gbs * 1e9)


def split_sizes(n: int, world: int) -> tuple[int, ...]:
    """How the hybrid cuts a layer of n neurons over `world` ranks (torch.tensor_split's sizes: the
    first n % world ranks get one more)."""
    return tuple(n // world + (1 if r < n % world else 0) for r in range(world))


def ring_bytes(kind: str, full_bytes: int, world: int) -> int:
    """What one rank sends for one collective over `full_bytes` (the all-reduced tensor, or the
    gathered / scattered full tensor) with the ring algorithm."""
    if world <= 1:
        return 0
    if kind == "all_reduce":
        return 2 * (world - 1) * full_bytes // world
    return (world - 1) * full_bytes // world  # all_gather, reduce_scatter


DESIGNS = ("ddp", "hybrid", "fsdp")


@dataclass(frozen=True)
class FSDPUnit:
    """One `fully_shard` call of the fsdp design: the modules it wraps ("" is the root, which
    owns every parameter no other unit does), whether it reshards after forward (and so
    all-gathers again in backward), and whether its parameters keep fp32 under bf16 (BatchNorm:
    its running statistics stay fp32, and F.batch_norm refuses a bf16 weight beside them)."""

    name: str
    modules: tuple[str, ...]
    regathered: bool
    full_precision: bool = False


def fsdp_units(net: nn.Module) -> list[FSDPUnit]:
    """The fsdp design's units, innermost first (the order `fully_shard` must be applied in):
    every BatchNorm together in one fp32 unit, each Linear its own unit, then the root."""
    norms = tuple(name for name, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    units = [FSDPUnit("batchnorm", norms, regathered=False, full_precision=True)] if norms else []
    units += [FSDPUnit(name, (name,), regathered=True) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    return units + [FSDPUnit("root", ("",), regathered=False)]


def fsdp_unit_elements(net: nn.Module, world: int) -> dict[str, int]:
    """Elements each unit all-gathers and reduce-scatters: its parameters, dim 0 of each padded to
    a multiple of the world size, as FSDP2 shards them."""
    units = fsdp_units(net)
    owners = {module: unit.name for unit in units for module in unit.modules if module}
    out = {unit.name: 0 for unit in units}
    for name, p in net.named_parameters():
        module = name.rpartition(".")[0]
        owner = max((m for m in owners if module == m or module.startswith(m + ".")), key=len, default=None)
        rows = max(p.shape[0], 1) if p.dim() else 1
        out[owners[owner] if owner is not None else "root"] += -(-rows // world) * world * (p.numel() // rows)
    return out


def fsdp_wire(net: nn.Module, world: int, precision: str) -> dict[str, tuple[str, int]]:
    """site -> (collective, full bytes) of one fsdp training step: per unit, one all-gather of its
    padded parameters in forward (again in backward when resharded), in bf16 under bf16 except the
    fp32 BatchNorm unit, and one fp32 reduce-scatter of their gradients."""
    elements = fsdp_unit_elements(net, world)
    sites: dict[str, tuple[str, int]] = {}
    for unit in fsdp_units(net):
        n = elements[unit.name]
        gather_bytes = n * (2 if precision == "bf16" and not unit.full_precision else 4)
        sites[f"fsdp_{unit.name}_gather"] = ("all_gather", gather_bytes)
        if unit.regathered:
            sites[f"fsdp_{unit.name}_regather"] = ("all_gather", gather_bytes)
        sites[f"fsdp_{unit.name}_grads"] = ("reduce_scatter", n * 4)
    return sites


@dataclass(frozen=True)
class Collective:
    """One collective of a training step: its kind, the full tensor's bytes, and the ranks it spans."""

    site: str
    kind: str
    full_bytes: int
    ranks: int
    across_nodes: bool = True  # False: its group lies inside one node (the 2-D head's tp group)

    @property
    def sent(self) -> int:
        """Bytes one rank sends for it (ring accounting)."""
        return ring_bytes(self.kind, self.full_bytes, self.ranks)


def step_collectives(design: str, model: str, *, batch_per_rank: int, world: int, precision: str = "fp32",
                     comm_hook: str = "none", tp: int = 0, **switches) -> list[Collective]:
    """The collectives one rank takes part in per training step under `design`, from the model's
    shapes alone. parallel.py records the same bytes from the running job.

    ddp: every gradient all-reduced (2 bytes an element with an fp16/bf16 hook).
    hybrid: the first Linear column-parallel, the second row-parallel: features all-gathered
    (in the autocast dtype) and their gradients reduce-scattered (fp32); the second Linear's
    outputs reduce-scattered (fp32) and their gradients all-gathered (fp32); every other
    parameter (the trunk, the second Linear's bias, later layers) all-reduced by DDP. With
    `tp` < world (the 2-D layout) the head's collectives span the tp ranks of a node and rank 0's
    head slices' gradients are all-reduced over the world/tp ranks holding the same slice (fp32,
    or 2 bytes an element with an fp16/bf16 hook, like DDP's buckets).
    fsdp: per unit (`fsdp_units`: the BatchNorms in fp32, each Linear, the root with the rest)
    its parameters, dim 0 padded to a multiple of the world size, all-gathered in the parameter
    dtype in forward (and again in backward for the Linear units, resharded after forward) and
    reduce-scattered in fp32."""
    if world <= 1:
        return []
    with torch.device("meta"):
        net = build_model(model, **switches)
    low = 2 if precision in ("bf16", "fp16") else 4
    hook = 2 if comm_hook in ("fp16", "bf16") else 4
    params = dict(net.named_parameters())
    if design == "ddp":
        return [Collective("ddp_gradients", "all_reduce", sum(p.numel() for p in params.values()) * hook, world)]
    if design == "fsdp":
        return [Collective(site, kind, full, world) for site, (kind, full) in fsdp_wire(net, world, precision).items()]
    if design != "hybrid":
        raise ValueError(f"unknown design {design!r}")
    (first_name, first), (second_name, second) = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)][:2]
    sharded = {f"{first_name}.weight", f"{first_name}.bias", f"{second_name}.weight"}
    rest = sum(p.numel() for name, p in params.items() if name not in sharded)
    tp = tp or world
    inside = tp < world  # the 2-D layout: a tp group is a node's ranks
    rows = batch_per_rank * tp
    out = [Collective("ddp_gradients", "all_reduce", rest * hook, world),
           Collective("head_features", "all_gather", rows * first.in_features * low, tp, not inside),
           Collective("head_features_grad", "reduce_scatter", rows * first.in_features * 4, tp, not inside),
           Collective("head_outputs", "reduce_scatter", rows * second.out_features * 4, tp, not inside),
           Collective("head_outputs_grad", "all_gather", rows * second.out_features * 4, tp, not inside)]
    if inside:
        neurons = split_sizes(first.out_features, tp)[0]  # rank 0's slice
        elements = neurons * first.in_features + (neurons if first.bias is not None else 0) + second.out_features * neurons
        out.append(Collective("head_slice_grads", "all_reduce", elements * hook, world // tp))  # in the hook's dtype
    return out


def predict_wire(design: str, model: str, *, batch_per_rank: int, world: int, precision: str = "fp32",
                 comm_hook: str = "none", tp: int = 0, **switches) -> dict[str, int]:
    """Bytes one rank sends per training step under `design`, by collective kind (ring
    accounting): `step_collectives` summed."""
    out = {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0}
    for c in step_collectives(design, model, batch_per_rank=batch_per_rank, world=world, precision=precision,
                              comm_hook=comm_hook, tp=tp, **switches):
        out[c.kind] += c.sent
    return out


def bytes_across_link_per_node(collectives: list[Collective], *, world: int, nodes: int,
                               gloo: bool = False) -> int:
    """What one node sends to the others per step, as a link's counters would see it: a ring
    over a group laid out in contiguous blocks per node leaves each node once, so a node sends one
    rank's ring share per group it belongs to (world / ranks of them). `gloo`: gloo runs a
    reduce-scatter as a whole all-reduce, sending twice the ring share."""
    if nodes <= 1:
        return 0
    total = 0
    for c in collectives:
        if not c.across_nodes:
            continue
        sent = ring_bytes("all_reduce", c.full_bytes, c.ranks) if gloo and c.kind == "reduce_scatter" else c.sent
        total += (world // c.ranks) * sent
    return total


def predict_comm_s(collectives: list[Collective], *, nodes: int, intra_gbs: float, inter_gbs: float) -> dict:
    """Communication seconds per step without overlap: a collective whose ranks span nodes runs at
    the slower, inter-node bandwidth (its ring crosses that link); one inside a node at the
    intra-node one. Also the bytes each rank sends over each."""
    across = sum(c.sent for c in collectives if nodes > 1 and c.across_nodes)
    inside = sum(c.sent for c in collectives) - across
    return {"comm_s": across / (inter_gbs * 1e9) + inside / (intra_gbs * 1e9), "bytes_across_nodes": across,
            "bytes_inside_nodes": inside}


def hybrid_crossover(model: str, *, world: int, precision: str = "fp32", comm_hook: str = "none",
                     limit: int = 1 << 17) -> int:
    """The smallest global batch at which the hybrid head sends more bytes per rank per step than
    DDP does (0 when it never does below `limit`)."""
    ddp = sum(predict_wire("ddp", model, batch_per_rank=1, world=world, comm_hook=comm_hook).values())
    per_rank = 1
    while per_rank * world <= limit:
        hybrid = sum(predict_wire("hybrid", model, batch_per_rank=per_rank, world=world, precision=precision,
                                  comm_hook=comm_hook).values())
        if hybrid > ddp:
            return per_rank * world
        per_rank *= 2
    return 0


# Datasheet dense peaks per GPU in TFLOP/s (no sparsity), by the name torch.cuda reports and the
# precision the matmuls run in: bf16/fp16 tensor cores, TF32 for fp32 with --tf32, plain fp32 without.
# The first entry whose key is in the device name counts ("H100 PCIe" before "H100").
DATASHEET_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "V100": {"fp16": 125.0, "fp32": 15.7, "tf32": 15.7},
}


def peak_tflops(device_name: str, precision: str, *, tf32: bool = False, given: float = 0.0) -> tuple[float, str]:
    """(peak TFLOP/s per device that MFU is measured against, where the number comes from);
    (0.0, why not) when neither `given` (--peak-tflops) nor the datasheet table knows it."""
    if given:
        return given, "--peak-tflops"
    kind = "tf32" if precision == "fp32" and tf32 else precision
    for key, peaks in DATASHEET_TFLOPS.items():
        if key in device_name and kind in peaks:
            return peaks[kind], f"{key} {kind} dense, datasheet"
    return 0.0, f"no datasheet peak for {device_name} {kind} (give --peak-tflops)"


def floors(cost: ModelCost, *, batch_size: int, gpus: int, peak_tflops: float, link_gbs: float,
           images: int = TRAIN_IMAGES) -> dict[str, float]:
    steps = images // (batch_size * gpus)
    compute = cost.train_flops_per_image * images / (gpus * peak_tflops * 1e12)
    return {
        "steps_per_epoch": steps,
        "compute_floor_s_per_epoch": compute,
        "allreduce_fp32_s_per_step": ring_allreduce_s(cost.grad_bytes_fp32, gpus, link_gbs),
        "allreduce_bf16_s_per_step": ring_allreduce_s(cost.grad_bytes_bf16, gpus, link_gbs),
        "allreduce_fp32_s_per_epoch": steps * ring_allreduce_s(cost.grad_bytes_fp32, gpus, link_gbs),
        "allreduce_bf16_s_per_epoch": steps * ring_allreduce_s(cost.grad_bytes_bf16, gpus, link_gbs),
        "images_per_s_ceiling": images / compute if compute else float("inf"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_cifar.cost", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16_cifar", choices=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=256, help="per-GPU batch")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak per GPU (H200 ~790 measured)")
    parser.add_argument("--link-gbs", type=float, default=400.0, help="all-reduce bus bandwidth per GPU, GB/s")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.batch_size <= 0 or args.gpus <= 0 or not args.peak_tflops > 0 or not args.link_gbs > 0:
        print("error: --batch-size, --gpus, --peak-tflops and --link-gbs must be > 0", file=sys.stderr)
        return 2
    cost = measure(args.model)
    fl = floors(cost, batch_size=args.batch_size, gpus=args.gpus, peak_tflops=args.peak_tflops, link_gbs=args.link_gbs)
    if args.json:
        print(json.dumps({**asdict(cost), **fl, **vars(args)}, indent=2))
        return 0
    print(f"{args.model}: {cost.params:,} parameters")
    for group, n in sorted(cost.param_groups.items(), key=lambda kv: -kv[1]):
        print(f"  {group:<44} {n:>13,}  {100 * n / cost.params:5.1f}%")
    print(f"forward FLOPs / image        {cost.forward_flops_per_image / 1e9:10.3f} GFLOP")
    print(f"training FLOPs / image       {cost.train_flops_per_image / 1e9:10.3f} GFLOP (forward + backward)")
    print(f"gradient bytes / step        {cost.grad_bytes_fp32 / 1e9:10.3f} GB fp32, "
          f"{cost.grad_bytes_bf16 / 1e9:.3f} GB bf16")
    print(f"epoch of {TRAIN_IMAGES:,} images on {args.gpus} GPU(s), batch {args.batch_size}/GPU, "
          f"{args.peak_tflops:g} TFLOP/s, {args.link_gbs:g} GB/s links:")
    print(f"  compute floor              {fl['compute_floor_s_per_epoch']:10.3f} s/epoch "
          f"({fl['images_per_s_ceiling']:,.0f} images/s)")
    print(f"  all-reduce floor fp32      {fl['allreduce_fp32_s_per_epoch']:10.3f} s/epoch "
          f"({1000 * fl['allreduce_fp32_s_per_step']:.2f} ms/step x {fl['steps_per_epoch']} steps)")
    print(f"  all-reduce floor bf16 hook {fl['allreduce_bf16_s_per_epoch']:10.3f} s/epoch")
    if args.gpus > 1:
        print(f"bytes each GPU sends per step at {args.batch_size}/GPU (ring; --parallel):")
        for design, precision, hook in (("ddp", "fp32", "none"), ("ddp", "bf16", "bf16"), ("hybrid", "fp32", "none"),
                                        ("hybrid", "bf16", "bf16"), ("fsdp", "bf16", "none")):
            if design == "hybrid" and sum(isinstance(m, nn.Linear) for m in build_model(args.model).modules()) < 2:
                continue
            wire = predict_wire(design, args.model, batch_per_rank=args.batch_size, world=args.gpus,
                                precision=precision, comm_hook=hook)
            print(f"  {design:<7} {precision} (hook {hook:<4}) {sum(wire.values()) / 1e6:12.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
