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
    if args.batch_size <= 0 or args.gpus <= 0:
        print("error: --batch-size and --gpus must be > 0", file=sys.stderr)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
