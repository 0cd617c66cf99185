"""`--parallel auto`: measure this job's links, predict every design's communication, choose.

At start (after the process group, before the model is built) every rank joins a second or two of
all-reduces: once inside each node (the ranks torchrun numbered together) and once across nodes
(one rank per node). Rank 0's measured bandwidths, with the global batch, the layout (nodes x
ranks per node), the precision and the memory per device, go to `dist_cifar.cost`, which
predicts for each design the bytes each rank sends inside and across nodes and the seconds they
take (a collective spanning nodes runs at the across-node rate). The fastest design whose state
fits in memory is chosen; compute is the same for every design and left out. The table is printed
(rank 0) and the measurements, predictions and choice are recorded in config.json
(`parallel_auto`).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from . import cost
from . import distributed as D
from .config import ConfigError, TrainConfig, validate
from .models import build_model
from .parallel import head_pair_problem
from .timing import synchronize

PROBE_BYTES = 8 << 20   # per all-reduce: large enough to be bandwidth-bound on every link
PROBE_SECONDS = 1.0     # per link; at least 3 timed all-reduces after one warm-up
ADAM_STATE_COPIES = 4   # weights, gradients and two moments, fp32 (what a rank holds per parameter)


@dataclasses.dataclass(frozen=True)
class Candidate:
    label: str
    parallel: str
    ddp_comm_hook: str = "none"
    tp_size: int = 0


def probe_gbs(info: D.DistInfo, group, ranks: int) -> Optional[float]:
    """Ring all-reduce bandwidth (GB/s of bytes each rank sends) over `group` (None: every rank);
    None when it has a single rank. Every rank calls it (each in its own group, if any): the
    number of timed rounds is rank 0's, so every group runs the same count."""
    if ranks <= 1:
        return None
    buf = torch.ones(PROBE_BYTES // 4, dtype=torch.float32, device=info.device)
    dist.all_reduce(buf, group=group)  # warm-up: connections, allocations
    synchronize(info.device)
    t0 = time.perf_counter()
    dist.all_reduce(buf, group=group)
    synchronize(info.device)
    first = time.perf_counter() - t0
    count = int(D.broadcast_object(info, max(3, min(50, int(PROBE_SECONDS / max(first, 1e-6))))))
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        dist.all_reduce(buf, group=group)
        synchronize(info.device)
        times.append(time.perf_counter() - t0)
    median = sorted(times)[len(times) // 2]
    return cost.ring_bytes("all_reduce", PROBE_BYTES, ranks) / median / 1e9


def measure_links(info: D.DistInfo) -> dict:
    """{'nodes', 'ranks_per_node', 'inside_node_gbs', 'across_nodes_gbs'} as rank 0 measured them."""
    per_node = info.local_world_size if info.world_size % max(info.local_world_size, 1) == 0 else 1
    nodes = info.world_size // per_node
    inside_group, across_group = D.mesh_groups(info, per_node)  # (a node's ranks, one rank per node)
    inside = probe_gbs(info, inside_group, per_node)
    across = probe_gbs(info, across_group, nodes)
    for group in (inside_group, across_group):
        if group is not None:  # the chosen design makes its own; NCCL's communicators hold memory
            dist.destroy_process_group(group)
    links = {"nodes": nodes, "ranks_per_node": per_node, "inside_node_gbs": inside, "across_nodes_gbs": across}
    return D.broadcast_object(info, links)


def candidates(cfg: TrainConfig, links: dict, net: nn.Module) -> list[Candidate]:
    """Every design this config and model allow (a flag set by the user, such as --ddp-comm-hook,
    is kept); `net`: the plain model on the meta device."""
    hook = cfg.ddp_comm_hook
    out = [Candidate("ddp", "ddp", hook)]
    if hook == "none" and cfg.precision in ("bf16", "fp16"):  # never coarser gradients than the run asked for
        out.append(Candidate("ddp + bf16 hook", "ddp", "bf16"))
    linears = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if len(linears) >= 2 and not head_pair_problem(net, linears[0], linears[1]):
        out.append(Candidate("hybrid (flat)", "hybrid", hook, links["nodes"] * links["ranks_per_node"]))
        if links["nodes"] > 1 and links["ranks_per_node"] > 1:
            out.append(Candidate("hybrid (2-D)", "hybrid", hook, links["ranks_per_node"]))
    out.append(Candidate("fsdp", "fsdp"))
    allowed = []
    for c in out:
        try:
            validate(dataclasses.replace(cfg, parallel=c.parallel, ddp_comm_hook=c.ddp_comm_hook, tp_size=c.tp_size))
        except ConfigError:
            continue
        allowed.append(c)
    return allowed


def state_bytes(c: Candidate, net: nn.Module, world: int) -> int:
    """What one rank keeps per step: weights, gradients and Adam's moments of its parameters."""
    total = sum(p.numel() for p in net.parameters())
    if c.parallel == "fsdp":
        return ADAM_STATE_COPIES * 4 * -(-total // world)
    if c.parallel == "hybrid":
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        head = sum(p.numel() for m in linears[:2] for p in m.parameters())
        return ADAM_STATE_COPIES * 4 * (total - head + -(-head // c.tp_size))
    return ADAM_STATE_COPIES * 4 * total


def memory_per_rank(info: D.DistInfo) -> int:
    if info.device.type == "cuda":
        return torch.cuda.mem_get_info(info.device)[0]
    from .budget import available_memory
    return available_memory() // max(info.local_world_size, 1)


def predict(cfg: TrainConfig, info: D.DistInfo, links: dict, precision: str) -> list[dict]:
    inside = links["inside_node_gbs"] or links["across_nodes_gbs"]
    across = links["across_nodes_gbs"] or inside
    memory = D.broadcast_object(info, memory_per_rank(info))
    with torch.device("meta"):
        net = build_model(cfg.model, cfg.batchnorm, cfg.dropout, cfg.pooling)
    rows = []
    for c in candidates(cfg, links, net):
        collectives = cost.step_collectives(c.parallel, cfg.model, batch_per_rank=cfg.batch_size * cfg.grad_accum_steps,
                                            world=info.world_size, precision=precision, comm_hook=c.ddp_comm_hook,
                                            tp=c.tp_size, batchnorm=cfg.batchnorm, dropout=cfg.dropout,
                                            pooling=cfg.pooling)
        comm = cost.predict_comm_s(collectives, nodes=links["nodes"], intra_gbs=inside, inter_gbs=across)
        need = state_bytes(c, net, info.world_size)
        rows.append({"design": c.label, "parallel": c.parallel, "ddp_comm_hook": c.ddp_comm_hook,
                     "tp_size": c.tp_size, "comm_ms": 1000 * comm["comm_s"],
                     "mb_across_nodes": comm["bytes_across_nodes"] / 1e6,
                     "mb_inside_nodes": comm["bytes_inside_nodes"] / 1e6, "state_gb": need / 1e9,
                     "fits": need <= memory})
    return rows


def choose(cfg: TrainConfig, info: D.DistInfo, precision: str) -> tuple[TrainConfig, Optional[dict]]:
    """The config with `--parallel auto` replaced by the chosen design (and its hook and tp size),
    and the record for config.json; one process: ddp, nothing measured."""
    if cfg.parallel != "auto":
        return cfg, None
    if not info.distributed or info.world_size == 1:
        return dataclasses.replace(cfg, parallel="ddp"), {"chosen": "ddp", "why": "one process: nothing to spread"}
    links = measure_links(info)
    rows = predict(cfg, info, links, precision)
    fitting = [r for r in rows if r["fits"]] or rows
    best = min(fitting, key=lambda r: r["comm_ms"])
    chosen = dataclasses.replace(cfg, parallel=best["parallel"], ddp_comm_hook=best["ddp_comm_hook"],
                                 tp_size=best["tp_size"])
    return chosen, {"links": links, "predicted": rows, "chosen": best["design"], "probe_mb": PROBE_BYTES / 1e6}


def table(record: dict) -> str:
    """What `choose` measured and predicted, as rank 0 prints it (the chosen design marked)."""
    links, rows = record["links"], record["predicted"]
    rate = lambda gbs: f"{gbs:.2f} GB/s" if gbs else "-"  # noqa: E731
    lines = [f"--parallel auto: {links['nodes']} node(s) x {links['ranks_per_node']} rank(s); measured all-reduce "
             f"{rate(links['inside_node_gbs'])} inside a node, {rate(links['across_nodes_gbs'])} across nodes"]
    for r in rows:
        mark = "->" if r["design"] == record["chosen"] else "  "
        fits = "" if r["fits"] else "  (does not fit)"
        lines.append(f"  {mark} {r['design']:<16} {r['comm_ms']:9.1f} ms communication per step  "
                     f"{r['mb_across_nodes']:9.1f} MB across nodes  {r['mb_inside_nodes']:9.1f} MB inside  "
                     f"{r['state_gb']:6.2f} GB state per rank{fits}")
    return "\n".join(lines)
