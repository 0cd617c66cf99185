#!/usr/bin/env bash
# The report's ablations on the real (JPEG) CIFAR-10, CPU, report protocol, into runs/ablations/
# (RUNS=...). With --publish, and only when every variant finished, the results (reports, PNGs,
# each variant's summary/metrics/config, no weights) are copied to benchmarks/results/ablations/.
# Each argument is one study plus its ablate flags; a study with recipe overrides lands in its own
# folder (weight_decay-e10, dropout-wd0, ...). Interrupted runs resume from their last checkpoint
# when the same command is run again. Exits 1 when a variant failed (nothing is copied), 2 without data.
#   bash benchmarks/ablations_cpu.sh "weight_decay --epochs 10" "dropout --weight-decay 0"
#   bash benchmarks/ablations_cpu.sh --publish batchnorm
# Data: DATA=PATH, else data/cifar10-jpeg.tar.gz (or another image tarball in data/).
# EXTRA adds trainer flags to every variant (recorded in each config.json), e.g.
#   EXTRA="--precision bf16 --channels-last" bash benchmarks/ablations_cpu.sh "weight_decay --epochs 10"
# vgg_truncated takes about 90 s an epoch on 2 cores in fp32, about 30 s with bf16 autocast +
# channels_last; the vgg16 study needs a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
publish=0
if [ "${1:-}" = --publish ]; then publish=1; shift; fi
data=${DATA:-}
if [ -z "$data" ]; then
  for tarball in data/cifar10-jpeg.tar.gz data/*.tar.gz; do
    if [ -f "$tarball" ] && [ "$(basename "$tarball")" != cifar-10-python.tar.gz ]; then data=$tarball; break; fi
  done
fi
if [ -z "$data" ] || [ ! -e "$data" ]; then
  echo "[ablations] no CIFAR-10 image tarball${data:+ at $data}: put one in data/ (e.g. data/cifar10-jpeg.tar.gz) or set DATA=PATH" >&2
  exit 2
fi
runs=${RUNS:-runs/ablations}
specs=("$@")
[ ${#specs[@]} -gt 0 ] || specs=(batchnorm dropout pooling epochs batch_size "weight_decay --epochs 10")
failed=()
for spec in "${specs[@]}"; do
  read -r -a words <<< "$spec"
  $PY -m dist_cifar.ablate "${words[@]}" --dataset imagefolder --data-dir "$data" --out "$runs" \
      --extra "--keep-last 1 ${EXTRA:-}" || failed+=("$spec")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "[ablations] failed: ${failed[*]}; nothing published (rerun the same command to resume)" >&2
  exit 1
fi
$PY -m dist_cifar.ablate all --report-only --out "$runs"
if [ "$publish" = 1 ]; then
  bash benchmarks/copy_ablations.sh "$runs" benchmarks/results/ablations
  echo "[ablations] results in benchmarks/results/ablations"
else
  echo "[ablations] results in $runs (add --publish to copy them to benchmarks/results/ablations)"
fi
