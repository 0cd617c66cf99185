"""One optimizer step of a (possibly sharded) model on a fixed global batch; writes the plain
gradients, updated weights and optimizer state (rank 0). Run alone (the reference) or under torchrun.

    python tests/parallel_worker.py OUT DESIGN[,DESIGN...] [--load STATE.pt]

Writes OUT-DESIGN.pt per design (one process group serves them all, one launch). DESIGN:clip clips
the gradients' global norm to CLIP (--clip-grad-norm's code) before the step; DESIGN:fp16 runs the
step under fp16 autocast with the GradScaler the trainer builds; DESIGN:sgd is a plain SGD step and
DESIGN:bf16hook the same with --ddp-comm-hook bf16 (gradients on the wire in bf16). hybrid-tpT shards the head over tp
groups of T ranks (--tp-size T: the 2-D layout when T < world). With --load, the
plain state in STATE.pt (model + optimizer, as a checkpoint holds them) is then also loaded
through the layout and consolidated again (key "round_trip"): resharding."""
import sys

import torch
import torch.nn.functional as F

from dist_cifar import distributed as D
from dist_cifar.config import make_config
from dist_cifar.engine import Precision
from dist_cifar.models import build_model
from dist_cifar.parallel import ConsolidatedModel, ConsolidatedOptimizer, check_replicas, parallelize


GLOBAL_BATCH = 12  # divides over 1, 2, 3 and 4 ranks
CLIP = 0.05  # well below this model's first-step gradient norm: the clip acts


def plain_grads(wrapped, info) -> dict:
    """Gradients of the plain model (a sharded parameter's slices gathered on rank 0)."""
    plan, grads = wrapped.plan, {}
    for name, p in wrapped.module.named_parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()  # FSDP2: a DTensor
        elif name in getattr(plan, "shards", {}):
            g = plan._gather(g, plan.shards[name])
        grads[name] = g
    return grads


def one_step(spec: str, info: D.DistInfo) -> dict:
    layout, _, variant = spec.partition(":")
    design, _, tp = layout.partition("-tp")
    cfg = make_config(model="small_cnn", batchnorm=False, dropout=False, parallel=design, device="cpu",
                      precision="fp32", channels_last=False, compile=False, tp_size=int(tp or 0),
                      ddp_comm_hook="bf16" if variant == "bf16hook" else "none")
    torch.manual_seed(cfg.seed)
    wrapped = parallelize(build_model(cfg.model, batchnorm=False, dropout=False), cfg, info)
    # the clipped and fp16 steps use plain SGD: Adam's first step divides by |g|, so an element whose
    # gradient sits near 0 (clipped to ~1e-8, or rounded by fp16) moves by +-lr on a rounding's whim
    optimizer = (torch.optim.SGD(wrapped.module.parameters(), lr=1.0) if variant in ("clip", "fp16", "sgd", "bf16hook") else
                 torch.optim.Adam(wrapped.module.parameters(), lr=1e-2))
    model_state = ConsolidatedModel(wrapped.plan, wrapped.module)
    optim_state = ConsolidatedOptimizer(wrapped.plan, optimizer, wrapped.module)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)
    b = GLOBAL_BATCH // info.world_size
    mine = slice(info.rank * b, (info.rank + 1) * b)
    precision = Precision.build("fp16" if variant == "fp16" else "fp32", info.device,
                                agree_overflows=design == "hybrid" and info.distributed)
    with precision.autocast():
        loss = F.cross_entropy(wrapped.train_model(x[mine]), y[mine])
    (precision.scaler.scale(loss) if precision.scaler else loss).backward()
    wrapped.plan.finish_gradients()
    if precision.scaler:
        precision.scaler.unscale_(optimizer)
    norm = wrapped.plan.clip_gradients(wrapped.module, CLIP).item() if variant == "clip" else None
    grads = plain_grads(wrapped, info)
    if precision.scaler:
        precision.scaler.step(optimizer)
        precision.scaler.update()
    else:
        optimizer.step()
    check_replicas(wrapped.plan, wrapped.module, "after the step")  # every tp group's head copy too
    result = {"grads": grads, "weights": model_state.state_dict(), "optimizer": optim_state.state_dict(),
              "norm": norm, "scale": precision.scaler.get_scale() if precision.scaler else None}
    if "--load" in sys.argv and not variant and not tp:  # the reference state is an Adam one
        saved = torch.load(sys.argv[sys.argv.index("--load") + 1], weights_only=True)
        model_state.load_state_dict(saved["weights"])
        optim_state.load_state_dict(saved["optimizer"])
        result["round_trip"] = {"weights": model_state.state_dict(), "optimizer": optim_state.state_dict()}
    return result


def main() -> None:
    out, designs = sys.argv[1], sys.argv[2].split(",")
    with D.session("cpu", "gloo") as info:
        for design in designs:
            result = one_step(design, info)
            if info.is_main:
                torch.save(result, f"{out}-{design}.pt")
        D.barrier(info)  # no rank closes its sockets while a peer's last collective is in flight (gloo aborts it)


if __name__ == "__main__":
    main()
