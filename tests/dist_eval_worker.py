"""Run under torchrun (or alone): evaluate fixed weights on 1001 synthetic images with the real
EvalShards + evaluate, and write rank 0's all-reduced counts to the JSON path in argv[1]."""
import json
import sys

import torch

from dist_cifar import distributed as D
from dist_cifar.data import make_splits, make_synthetic, normalization
from dist_cifar.engine import Precision, evaluate
from dist_cifar.loaders import EvalShards
from dist_cifar.models import build_model

with D.session("cpu", "gloo", 60) as info:
    raw = make_synthetic(1600)  # a pool of 2000 images; hold out 1001 of them
    split = make_splits(raw, "full", val_size=1001).val
    assert len(split) == 1001
    torch.manual_seed(0)
    model = build_model("small_cnn")
    model.load_state_dict(torch.load(sys.argv[2], weights_only=True))
    mean, std = normalization("cifar")
    shards = EvalShards(split, info.device, 64, info.rank, info.world_size, mean, std)
    result = evaluate(model, shards, Precision.build("fp32", info.device), info, confusion=True)
    if info.is_main:
        json.dump({"loss": result.loss, "accuracy": result.accuracy, "count": result.count,
                   "correct": round(result.accuracy * result.count / 100),
                   "confusion": result.confusion.tolist(), "local": len(shards.y)}, open(sys.argv[1], "w"))
