"""Run under torchrun (or alone): evaluate fixed weights on 1001 synthetic images with the real
assembler's eval shards + evaluate, and write rank 0's all-reduced counts to the JSON path in argv[1]."""
import json
import sys

import torch

from dist_cifar import distributed as D
from dist_cifar.assembly import assemble
from dist_cifar.config import make_config
from dist_cifar.data import make_splits, make_synthetic
from dist_cifar.engine import evaluate

with D.session("cpu", "gloo", 60) as info:
    raw = make_synthetic(1600)  # a pool of 2000 images; hold out 1001 of them
    splits = make_splits(raw, "full", val_size=1001)
    assert len(splits.val) == 1001
    run = assemble(make_config(model="small_cnn", eval_batch_size=64, precision="fp32"), info, splits)
    run.model.module.load_state_dict(torch.load(sys.argv[2], weights_only=True))
    shards = run.shards(splits.val)
    result = evaluate(run.model.module, shards, run.precision, info, confusion=True)
    if info.is_main:
        json.dump({"loss": result.loss, "accuracy": result.accuracy, "count": result.count,
                   "correct": round(result.accuracy * result.count / 100),
                   "confusion": result.confusion.tolist(), "local": len(shards.y)}, open(sys.argv[1], "w"))
    D.barrier(info)  # no rank closes its sockets while a peer's last collective is in flight (gloo aborts it)
