"""PNG charts beside the benchmark JSON: the peers comparison, the feature ladder, the scaling
model. The benchmarks call these after writing their JSON; `python benchmarks/charts.py [FOLDER]`
redraws every chart from the JSON in FOLDER (default runs/benchmarks/; benchmarks/results/ for the
committed ones)."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def where(meta: dict) -> str:
    return f"{meta.get('device_name', '?')}, torch {meta.get('torch_version', '?')}, {meta.get('date', '')[:10]}"


def warn(fig, data: dict) -> None:
    """The run's warnings (a busy machine, repeats that disagree) printed on the picture itself:
    a chart is often seen without its table."""
    warnings = [w for w in data.get("warnings") or [] if w]
    if warnings:
        width = int(fig.get_figwidth() * 17)  # characters of 6.5 pt text across the figure
        lines = [line for w in warnings[:4] for line in textwrap.wrap(w, width)]
        fig.text(0.01, 0.005, "\n".join(lines), color="tab:red", fontsize=6.5, va="bottom")
        fig.subplots_adjust(bottom=0.12 + 0.035 * len(lines))


def save(fig, path: Path, data: dict | None = None) -> Path:
    fig.tight_layout()
    if data is not None:
        warn(fig, data)
    from common import files  # the one way to create a file: no planted link followed
    with files.atomic_writer(Path(path)) as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    print(f"wrote {path}")
    return path


def peers_chart(json_path: Path) -> Path:
    data = json.loads(Path(json_path).read_text())
    models = list(data["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in data["models"][model]["rows"] if "images_per_s" in r]
        names = [r["contestant"].split(" (")[0] for r in rows]
        values = [r["images_per_s"] for r in rows]
        # the rounds' spread (min..max) where the run repeated its measurement
        low = [v - min(r.get("per_round") or [v]) for v, r in zip(values, rows)]
        high = [max(r.get("per_round") or [v]) - v for v, r in zip(values, rows)]
        bars = ax.bar(names, values, color=["tab:blue", "tab:purple", "tab:gray"][:len(rows)],
                      yerr=[low, high] if any(low) or any(high) else None, capsize=4, ecolor="black")
        for bar, row, above in zip(bars, rows, high):
            ratio = "" if row.get("key") == "dist_cifar" or "dist_cifar_ratio" not in row else \
                f"\ndist_cifar {row['dist_cifar_ratio']:.2f}x"
            ax.annotate(f"{row['images_per_s']:,.0f}{ratio}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height() + above), ha="center", va="bottom",
                        fontsize=8)
        ax.set_title(f"{model}, global batch {data['args']['global_batch_size']}", fontsize=10)
        ax.set_ylabel("training images/s (steady state)")
        ax.set_ylim(0, max([v + h for v, h in zip(values, high)], default=1) * 1.25)
    world = data["world"]
    rounds = max((len(r.get("per_round") or []) for m in models for r in data["models"][m]["rows"]), default=0)
    spread = f"; bars: median, whiskers: min..max of {rounds} rounds" if rounds > 1 else ""
    fig.suptitle(textwrap.fill(f"peers: {world['processes']} processes on {world['backend']} "
                               f"({where(data['provenance'])}){spread}", int(fig.get_figwidth() * 12)), fontsize=10)
    return save(fig, Path(json_path).with_suffix(".png"), data)


def ladder_chart(json_path: Path) -> Path:
    data = json.loads(Path(json_path).read_text())
    rungs = data["rungs"]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    bars = ax.bar(range(len(rungs)), [r["images_per_s"] for r in rungs], color="tab:blue")
    for bar, rung in zip(bars, rungs):
        ax.annotate(f"{rung['images_per_s']:,.0f}\nx{rung['speedup']:.2f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rungs)), [r["rung"].replace(", ", ",\n") for r in rungs], fontsize=8)
    ax.set_ylabel("training images/s")
    ax.set_ylim(0, max(r["images_per_s"] for r in rungs) * 1.3)
    args = data["args"]
    ax.set_title(f"feature ladder: {args['model']}, batch {args['batch_size']}/process, {args['nproc']} process(es)\n"
                 f"({where(data['provenance'])})", fontsize=9)
    return save(fig, Path(json_path).with_suffix(".png"), data)


def scaling_chart(json_path: Path) -> Path:
    data = json.loads(Path(json_path).read_text())
    model = data["model"]
    rows = model["rows"]
    gpus = [r["gpus"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for key, label, style in (("compute_s", "compute only (ideal)", ":"),
                              ("epoch_s_fp32_no_overlap", "fp32 all-reduce, no overlap", "-"),
                              ("epoch_s_fp32_overlap", "fp32 all-reduce, full overlap", "--"),
                              ("epoch_s_bf16_no_overlap", "bf16 hook, no overlap", "-.")):
        ax.plot(gpus, [r[key] for r in rows], style, marker="o", markersize=3, label=label)
    measured = data.get("measured", [])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("GPUs")
    ax.set_ylabel("modelled seconds per epoch")
    ax.legend(fontsize=8)
    source = (f"measured on {data['provenance'].get('device_name')}" if model.get("t1_source", "measured") == "measured"
              else "ASSUMED, not measured")
    ax.set_title(f"scaling model, {data['args']['model']}, batch {data['args']['batch_size']}/GPU: "
                 f"t1 = {1000 * model['t1_s']:.1f} ms/step {source},\n{model['grad_bytes_fp32'] / 1e6:.1f} MB of gradients, "
                 f"{model['link_gbs']:g} GB/s links ({len(measured)} process counts measured)", fontsize=8)
    return save(fig, Path(json_path).with_suffix(".png"), data)


DESIGN_STYLES = {"ddp": ("DDP, fp32 all-reduce", "-"), "ddp_bf16_hook": ("DDP + bf16 hook", "-."),
                 "hybrid": ("hybrid, flat (head sharded over all ranks)", "--"),
                 "hybrid_2d": ("hybrid, 2-D (head sharded inside each node)", (0, (5, 1, 1, 1))),
                 "fsdp": ("FSDP2", ":")}


def designs_chart(json_path: Path) -> Path:
    """scaling.py --designs: the modelled step time of every design against the number of GPUs."""
    data = json.loads(Path(json_path).read_text())
    rows = data["rows"]
    gpus = [r["gpus"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.8, 4.0))
    ax.plot(gpus, [r["compute_ms"] for r in rows], color="gray", linestyle=(0, (1, 3)), marker=".",
            label="compute only (no communication)")
    for design, (label, style) in DESIGN_STYLES.items():
        if f"{design}_ms" in rows[0]:
            ax.plot(gpus, [r[f"{design}_ms"] for r in rows], linestyle=style, marker="x" if design == "fsdp" else "o",
                    markersize=4, label=label)
    if any(r["nodes"] > 1 for r in rows):
        first = min(r["gpus"] for r in rows if r["nodes"] > 1)
        ax.axvline(first, color="gray", alpha=0.4, label=f"more than one node from {first} GPUs")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(gpus, [str(g) for g in gpus])
    ax.set_xlabel("GPUs")
    ax.set_ylabel("modelled ms per step")
    ax.legend(fontsize=7)
    ax.set_title(textwrap.fill(f"designs, {data['args']['model']} (MODELLED, not measured): "
                               f"{data.get('assumptions', '')}", 110), fontsize=7)
    return save(fig, Path(json_path).with_suffix(".png"), data)


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="Redraw the benchmark PNGs from their JSON.")
    p.add_argument("folder", nargs="?", default=str(RESULTS.parents[1] / "runs" / "benchmarks"),
                   help="where the JSON is (default runs/benchmarks/; benchmarks/results/ redraws the committed ones)")
    folder = Path(p.parse_args(argv).folder)
    drawn = 0
    for pattern, chart in (("peers_*.json", peers_chart), ("epoch_time_*.json", ladder_chart),
                           ("scaling_*.json", scaling_chart)):
        for path in sorted(folder.glob(pattern)):
            draw = chart
            if chart is scaling_chart and "model" not in json.loads(path.read_text()):
                if "rows" not in json.loads(path.read_text()):
                    continue  # scaling.py --check-scaleout alone: a table, no chart
                draw = designs_chart  # scaling.py --designs
            draw(path)
            drawn += 1
    print(f"redrew {drawn} chart(s) in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
