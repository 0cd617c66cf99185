#!/usr/bin/env bash
# The report's vgg16 study on one GPU: vgg16_cifar against vgg_truncated, report protocol
# (batch 32, Adam 1e-3, weight decay 0.01, 20k/5k/5k split), 40 epochs each, as two ordinary
# single-process ablation runs. Sized for one device call: bf16 autocast, channels_last and
# cuDNN autotuning (the report's cuDNN-deterministic setting is dropped for speed; the config
# records it), no torch.compile (40 short epochs of batch 32 would spend more on compiling than
# they save), checkpoints every 10 epochs so an interrupted call resumes where it stopped.
# vgg16_cifar costs 18.9x the training FLOPs of vgg_truncated per image (`python -m dist_cifar.cost`);
# vgg_truncated runs an epoch in about 90 s on this project's 2-core CPU machine, so vgg16_cifar
# is a GPU job. Not yet run on a GPU; the FLOPs (17.8 GFLOP per
# training image x 20,000 images x 40 epochs = 14 PFLOP, under a minute at H200 bf16 peak)
# bound it from below only: batch 32 runs far below peak.
#   bash benchmarks/vgg16_study_gpu.sh                # results under $OUT or benchmarks/results/
# Data: .gpu_data/cifar10-jpeg.tar.gz (carry it to the GPU host), or DATA=...
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}; [ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
data=${DATA:-.gpu_data/cifar10-jpeg.tar.gz}
runs=${RUNS:-runs/ablations}
dest=${OUT:-benchmarks/results/ablations}
if ! $PY -m dist_cifar.ablate vgg16 --dataset imagefolder --data-dir "$data" --out "$runs" \
    --extra "--device cuda --precision bf16 --channels-last --no-compile --no-deterministic --checkpoint-every 10 --keep-last 1"; then
  echo "[vgg16] a variant failed; nothing copied to $dest (rerun to resume it)" >&2
  exit 1
fi
bash benchmarks/copy_ablations.sh "$runs" "$dest" vgg16
echo "[vgg16] results in $dest/vgg16"
