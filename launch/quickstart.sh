#!/usr/bin/env bash
# The main job in one command. CPU host: a short report-protocol run of small_cnn (minutes on
# 2 cores). GPU host: vgg16_cifar under torchrun on every GPU (the `fast` preset).
# Data: the first of data/cifar-10-batches-py, data/cifar-10-python.tar.gz, a CIFAR-10 image
# tarball (data/*.tar.gz, or the file DIST_CIFAR_DATA names); else, loudly, synthetic data.
# Extra arguments go to the trainer, e.g. `bash launch/quickstart.sh --epochs 1`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
PYTHON=.venv/bin/python

data=(--dataset synthetic --synthetic-size 8000 --split full)
if [ -e data/cifar-10-batches-py/data_batch_1 ] || [ -e data/cifar-10-python.tar.gz ]; then
  data=(--dataset cifar10 --data-dir data)
else
  for tarball in ${DIST_CIFAR_DATA:-} data/*.tar.gz; do
    if [ -f "$tarball" ]; then data=(--dataset imagefolder --data-dir "$tarball"); break; fi
  done
fi
if [ "${data[1]}" = synthetic ]; then
  echo "!!!!! NO CIFAR-10 FOUND (looked in data/ and \$DIST_CIFAR_DATA): TRAINING ON SYNTHETIC DATA !!!!!" >&2
  echo "!!!!! put cifar-10-python.tar.gz in data/, or pass --download with a network              !!!!!" >&2
fi

ngpu=$($PYTHON -c "import torch; print(torch.cuda.device_count())")
out="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
if [ "$ngpu" -gt 0 ]; then
  exec $PYTHON -m torch.distributed.run --standalone --nproc_per_node="$ngpu" -m dist_cifar.train \
    --preset fast "${data[@]}" --split full --out-dir "$out" "$@"
fi
if [ "${data[1]}" = synthetic ]; then
  exec $PYTHON -m dist_cifar.train --model small_cnn "${data[@]}" --epochs 3 --batch-size 64 --out-dir "$out" "$@"
fi
exec $PYTHON -m dist_cifar.train --preset report --model small_cnn "${data[@]}" --epochs 5 --out-dir "$out" "$@"
