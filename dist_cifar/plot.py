"""Figures: loss curves and confusion matrix of one run; overlays of several runs.

    python -m dist_cifar.plot RUN_DIR [RUN_DIR ...] [--out compare.png]

draws train/val loss, train/val accuracy and time-per-epoch bars of every run, overlaid.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from . import files


def pyplot():
    """matplotlib on the file backend, imported when a figure is drawn: training processes that
    never draw (every rank but 0, every benchmark run) do not pay its import."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / files.METRICS
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a dist_cifar run folder?")
    return files.read_jsonl(path)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) with the epochs numbered as metrics.jsonl numbers them (from 0)."""
    pts = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def best_epoch(records: list[dict]) -> int | None:
    """The epoch with the lowest validation loss (the weights best.pt keeps by default)."""
    x, y = series(records, "val_loss")
    return x[y.index(min(y))] if y else None


def epoch_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (numbered as in metrics.jsonl)")


def loss_curves(records: list[dict], path: Path, title: str = "", best: int | None = None) -> Path:
    """Train and validation loss per epoch, as the report's figures, with the kept epoch marked
    (`best`: the run's best_epoch; default: the lowest validation loss)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        x, y = series(records, key)
        if x:
            ax.plot(x, y, marker="o", label=label)
    best = best_epoch(records) if best is None else best
    if best is not None and best >= 0:
        ax.axvline(best, color="gray", linestyle=":", label=f"best epoch ({best}: weights kept)")
    epoch_axis(ax)
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title or "loss per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)
    return path


def confusion_matrix(matrix, classes: Sequence[str], path: Path, title: str = "") -> Path:
    import numpy as np
    m = np.asarray(matrix, dtype=float)
    rates = m / np.maximum(m.sum(1, keepdims=True), 1)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (test)")
    fig.colorbar(im, ax=ax, fraction=0.046).set_label("share of the true class (row); cells: image counts")
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)
    return path


def overlay(runs: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """Loss, accuracy and epoch time of several runs side by side."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i % 10}"
        for key, style in (("train_loss", "-"), ("val_loss", "--")):
            x, y = series(records, key)
            axes[0].plot(x, y, style, color=color, marker="o", markersize=3, label=f"{name} {key.split('_')[0]}")
        for key, style in (("train_accuracy", "-"), ("val_accuracy", "--")):
            x, y = series(records, key)
            axes[1].plot(x, y, style, color=color, marker="o", markersize=3, label=f"{name} {key.split('_')[0]}")
        best = best_epoch(records)
        if best is not None:  # a star on the kept epoch's validation loss
            axes[0].plot([best], [next(r["val_loss"] for r in records if r["epoch"] == best)], "*", color=color,
                         markersize=11, markeredgecolor="black")
        x, y = series(records, "epoch_time_s")
        width = 0.8 / max(len(runs), 1)
        axes[2].bar([e + (i - (len(runs) - 1) / 2) * width for e in x], y, width=width, color=color, label=name)
    for ax, label in zip(axes, ("loss (solid: train, dashed: val; star: best epoch)",
                                "accuracy % (solid: train, dashed: val)", "time per epoch (s)")):
        epoch_axis(ax)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)
    return path


def loss_overlay(runs: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """Train (solid) and validation (dashed) loss of several runs on one axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, records) in enumerate(runs.items()):
        for key, style in (("train_loss", "-"), ("val_loss", "--")):
            x, y = series(records, key)
            if x:
                ax.plot(x, y, style, color=f"C{i % 10}", marker="o", markersize=3,
                        label=f"{name} ({key.split('_')[0]})")
    epoch_axis(ax)
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_cifar.plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl)")
    parser.add_argument("--out", default="", help="PNG path (default: compare.png in the first run)")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    try:
        runs = {Path(r).name: read_metrics(Path(r)) for r in args.runs}
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a line in the middle of metrics.jsonl that is not JSON
        print(f"error: a run's metrics.jsonl is corrupt ({exc}); rerun or repair that run", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.runs[0]) / "compare.png"
    if not out.parent.is_dir():
        print(f"error: --out {out}: the folder {out.parent} does not exist", file=sys.stderr)
        return 2
    try:
        overlay(runs, out, args.title)
    except OSError as exc:
        print(f"error: --out {out} cannot be written ({exc.strerror}): choose another path", file=sys.stderr)
        return 2
    print(out)
    return 0


def save(fig, path: Path) -> None:
    """PNG through files.atomic_writer: never half a picture, never through a planted link."""
    with files.atomic_writer(Path(path)) as f:
        fig.savefig(f, dpi=110, format="png")


if __name__ == "__main__":
    sys.exit(main())

