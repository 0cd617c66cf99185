"""Evaluate a finished run's weights: accuracy, per-class accuracy and the confusion matrix.

    python -m dist_cifar.evaluate runs/small_cnn-...            (its best.pt, on the test split)
    python -m dist_cifar.evaluate runs/x/ckpt-e0010-s0000000.pt --split val --tta-flip --json val.json
    torchrun --standalone --nproc_per_node=2 -m dist_cifar.evaluate runs/x

The run's own config.json (beside the weights) rebuilds the data split and the model exactly as
the run had them, and the evaluation is the trainer's own (`engine.evaluate`: exact over ranks,
every image counted once), so the test accuracy of a run's best.pt equals its summary.json's
`best_test_accuracy`. Weights: a run folder's best.pt, a best.pt, or a checkpoint (its model).
Exit codes as the trainer's: 0, or 2 with one line (no weights, a corrupt file, bad flags).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from . import checkpoint as ckpt
from . import distributed as D
from . import files, shards
from .assembly import assemble
from .config import ConfigError, make_config, read_config_file
from .data import DataError, load_source, make_splits
from .engine import evaluate
from .parallel import ConsolidatedModel
from .runtime import resolve

SPLITS = ("test", "val", "train")


def weights_and_config(target: Path) -> tuple[Path, Path]:
    """(weights file, the run's config.json) for a run folder or a weights file inside one."""
    sharded = target.is_dir() and target.suffix == shards.SUFFIX  # a sharded checkpoint: a folder
    weights = target / files.BEST if target.is_dir() and not sharded else target
    config = weights.parent / files.CONFIG
    if not (weights.is_file() or sharded):
        raise ConfigError(f"{target}: no weights there (expected a run folder with {files.BEST}, a {files.BEST} or "
                          f"a ckpt-*.pt checkpoint)")
    if not config.is_file():
        raise ConfigError(f"{weights}: no {files.CONFIG} beside it: the run's own folder is needed to rebuild its "
                          f"data split and model")
    return weights, config


def load_weights(weights: Path, trust: bool) -> dict[str, torch.Tensor]:
    """The plain model state of best.pt or of a checkpoint, verified against its commit marker."""
    why = files.distrust(weights) or files.distrust(weights.parent)
    if why and not trust:
        raise ConfigError(f"{weights}: {why}, so another user could have replaced it: pass --trust-shared to "
                          f"evaluate it anyway")
    if ckpt.marker_path(weights).exists() and not ckpt.verify(weights):
        raise ConfigError(f"{weights} does not match its commit marker (corrupt or torn)")
    if weights.is_dir():  # a sharded checkpoint, read whole: the weights only, not the optimizer state
        return ckpt.plain_model_state(weights)
    blob = ckpt.load(weights) if weights.name != files.BEST else \
        torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    state = blob.get("state_dict") if weights.name == files.BEST else blob.get("model")
    if not isinstance(state, dict):
        raise ConfigError(f"{weights} holds no model weights")
    return state


def run_config(config_path: Path, args) -> Any:
    """The run's settings, with what evaluation changes: no compile (one pass is not worth it),
    the batch per process only (the world size may differ from the run's), the flags given here."""
    settings = read_config_file(str(config_path))
    settings.update(compile=False, global_batch_size=0, wandb="off", resume="none", out_dir="")
    if args.tta_flip:
        settings["tta_flip"] = True
    if args.data_dir:
        settings["data_dir"] = args.data_dir
    if args.device:
        settings["device"] = args.device
    if args.eval_batch_size:
        settings["eval_batch_size"] = args.eval_batch_size
    cfg, _ = resolve(make_config(**settings))
    return cfg


def measure(target: Path, args) -> dict[str, Any]:
    weights, config_path = weights_and_config(target)
    cfg = run_config(config_path, args)
    with D.session(cfg.device, cfg.backend, cfg.dist_timeout) as info:
        state = load_weights(weights, args.trust_shared)
        raw = load_source(cfg.dataset, cfg.data_dir, cfg.download, cfg.synthetic_size, trust=cfg.trust_shared)
        splits = make_splits(raw, cfg.split, cfg.val_size, cfg.max_train)
        split = getattr(splits, args.split)
        if split is None:
            raise ConfigError(f"--split {args.split}: this run has no {args.split} split (--val-size 0)")
        run = assemble(cfg, info, splits)
        try:
            ConsolidatedModel(run.model.plan, run.model.module).load_state_dict(state)
        except (RuntimeError, KeyError) as exc:
            raise ConfigError(f"{weights} does not hold a {cfg.model}'s weights "
                              f"({str(exc).splitlines()[0][:120]})") from None
        result = evaluate(run.model.eval_model, run.shards(split), run.precision, info,
                          num_classes=len(splits.classes), confusion=True)
        D.barrier(info)
        return {"weights": str(weights), "split": args.split, "images": result.count, "accuracy": result.accuracy,
                "loss": result.loss, "tta_flip": cfg.tta_flip, "world_size": info.world_size, "model": cfg.model,
                "per_class_accuracy": dict(result.per_class_accuracy(splits.classes)),
                "confusion_matrix": result.confusion.tolist(), "is_main": info.is_main}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dist_cifar.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("target", help="a run folder (its best.pt), a best.pt, or a checkpoint (ckpt-*.pt, or a sharded ckpt-*.dcp folder)")
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--tta-flip", action="store_true", help="average each image's logits with its mirror's")
    p.add_argument("--json", default="", metavar="FILE", help="also write the result (per-class, confusion) here")
    p.add_argument("--data-dir", default="", help="where the data lies now, if it moved since the run")
    p.add_argument("--device", default="", help="cpu or cuda (default: the run's)")
    p.add_argument("--eval-batch-size", type=int, default=0)
    p.add_argument("--trust-shared", action="store_true", help="evaluate weights another user could have replaced")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = measure(Path(args.target), args)
    except (ConfigError, DataError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    if result.pop("is_main"):
        print(f"{result['split']} accuracy {result['accuracy']:.2f}% over {result['images']:,} images "
              f"(loss {result['loss']:.4f}) of {result['weights']}")
        for name, accuracy in result["per_class_accuracy"].items():
            print(f"  {name:<12} {accuracy:6.2f}%")
        if args.json:
            files.atomic_write_bytes(Path(args.json), json.dumps(result, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
