#!/usr/bin/env bash
# Copy finished ablation studies (reports, PNGs, each variant's summary/metrics/config, no
# weights) from a runs folder into a results folder, then rewrite that folder's REPORT.md index
# (keeping its VERDICTS.md table on top).
#   bash benchmarks/copy_ablations.sh runs/ablations benchmarks/results/ablations [STUDY_FOLDER ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}; [ -x .venv/bin/python ] && PY=.venv/bin/python
src=${1:?give the runs folder}; dest=${2:?give the results folder}; shift 2
folders=("$@")
[ ${#folders[@]} -gt 0 ] || for dir in "$src"/*/; do folders+=("$(basename "$dir")"); done
mkdir -p "$dest"
for study in "${folders[@]}"; do
  dir="$src/$study/"
  [ -f "${dir}report.md" ] || continue
  mkdir -p "$dest/$study"
  cp "${dir}report.md" "$dest/$study/"
  cp "$dir"*.png "$dest/$study/" 2>/dev/null || true
  for run in "$dir"*/; do
    [ -f "$run/summary.json" ] || continue
    mkdir -p "$dest/$study/$(basename "$run")"
    cp "$run"summary.json "$run"metrics.jsonl "$run"config.json "$dest/$study/$(basename "$run")/"
  done
done
PYTHONPATH=$PWD $PY -c 'import sys; from pathlib import Path; from dist_cifar.ablate import write_index; print(write_index(Path(sys.argv[1])))' "$dest"
