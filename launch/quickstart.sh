#!/usr/bin/env bash
# The main job in one command. CPU host: a short report-protocol run of small_cnn (minutes on
# 2 cores). GPU host: vgg16_cifar under torchrun on every GPU (the `fast` preset).
# Data, the first that works: data/cifar-10-batches-py or data/cifar-10-python.tar.gz; the official
# archive downloaded into data/ (DIST_CIFAR_CIFAR10_URL/_MD5 name a mirror); a CIFAR-10 image
# tarball (the file DIST_CIFAR_DATA names, or data/*.tar.gz); else, loudly, synthetic data.
# Extra arguments go to the trainer, e.g. `bash launch/quickstart.sh --epochs 1`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
PYTHON=.venv/bin/python

mkdir -p data
data=(--dataset synthetic --synthetic-size 8000 --split full)
if $PYTHON -m dist_cifar.fetch data 2>data/.fetch-error >/dev/null; then
  data=(--dataset cifar10 --data-dir data)
else
  for tarball in ${DIST_CIFAR_DATA:-} data/*.tar.gz; do
    if [ -f "$tarball" ] && [ "$(basename "$tarball")" != cifar-10-python.tar.gz ]; then
      data=(--dataset imagefolder --data-dir "$tarball"); break
    fi
  done
  fallback="the image tarball ${data[3]:-}"; [ "${data[1]}" = synthetic ] && fallback="SYNTHETIC DATA"
  echo "[quickstart] $(tail -1 data/.fetch-error | sed 's/^dist-cifar-fetch: //'); falling back to $fallback" >&2
fi
rm -f data/.fetch-error
if [ "${data[1]}" = synthetic ]; then
  echo "!!!!! NO CIFAR-10: TRAINING ON SYNTHETIC DATA; the accuracies say nothing about CIFAR-10 !!!!!" >&2
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
