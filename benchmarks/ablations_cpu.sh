#!/usr/bin/env bash
# The report's ablations on the real (JPEG) CIFAR-10, CPU, report protocol; results (reports,
# PNGs, each variant's summary/metrics/config, no weights) are copied to
# benchmarks/results/ablations/. Each argument is one study plus its ablate flags; a study with
# recipe overrides lands in its own folder (weight_decay-e10, dropout-wd0, ...). Interrupted runs
# resume from their last checkpoint when the same command is run again.
#   bash benchmarks/ablations_cpu.sh "weight_decay --epochs 10" "dropout --weight-decay 0"
# EXTRA adds trainer flags to every variant (recorded in each config.json), e.g.
#   EXTRA="--precision bf16 --channels-last" bash benchmarks/ablations_cpu.sh "weight_decay --epochs 10"
# vgg_truncated takes about 90 s an epoch on 2 cores in fp32, about 30 s with bf16 autocast +
# channels_last; the vgg16 study needs a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
data=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
runs=${RUNS:-runs/ablations}
specs=("$@")
[ ${#specs[@]} -gt 0 ] || specs=(batchnorm dropout pooling epochs batch_size "weight_decay --epochs 10")
for spec in "${specs[@]}"; do
  read -r -a words <<< "$spec"
  $PY -m dist_cifar.ablate "${words[@]}" --dataset imagefolder --data-dir "$data" --out "$runs" \
      --extra "--keep-last 1 ${EXTRA:-}" || echo "[ablations] $spec had failures"
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
