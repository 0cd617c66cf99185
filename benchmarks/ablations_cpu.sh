#!/usr/bin/env bash
# The report's ablations on the real (JPEG) CIFAR-10, CPU, report protocol; results (reports,
# PNGs, each variant's summary/metrics/config, no weights) are copied to
# benchmarks/results/ablations/. weight_decay trains vgg_truncated for WD_EPOCHS epochs only
# (about 90 s an epoch on 2 cores); the vgg16 study needs a GPU and is not run here.
#   bash benchmarks/ablations_cpu.sh [STUDY ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
data=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
runs=${RUNS:-runs/ablations}
studies=${*:-batchnorm dropout pooling epochs batch_size weight_decay}
for study in $studies; do
  extra=()
  [ "$study" = weight_decay ] && extra=(--epochs "${WD_EPOCHS:-2}")
  $PY -m dist_cifar.ablate "$study" --dataset imagefolder --data-dir "$data" --out "$runs" \
      --extra "--keep-last 1" "${extra[@]}" || echo "[ablations] $study had failures"
done
$PY -m dist_cifar.ablate all --report-only --out "$runs"
dest=benchmarks/results/ablations
mkdir -p "$dest"
cp "$runs/REPORT.md" "$dest/"
for dir in "$runs"/*/; do
  study=$(basename "$dir")
  mkdir -p "$dest/$study"
  cp "$dir"report.md "$dir"*.png "$dest/$study/" 2>/dev/null || true
  for run in "$dir"*/; do
    [ -f "$run/summary.json" ] || continue
    mkdir -p "$dest/$study/$(basename "$run")"
    cp "$run"summary.json "$run"metrics.jsonl "$run"config.json "$dest/$study/$(basename "$run")/"
  done
done
echo "[ablations] results in $dest"
