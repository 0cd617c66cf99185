#!/usr/bin/env bash
# Every GPU number this project needs, in one call of at most ~8 minutes on one GPU (an H200),
# stages in order of value, each time-boxed so the call ends on time even if one overruns:
#   a. fast  torchrun (NCCL, DDP, bf16 all-reduce hook) of `--preset fast` (vgg16_cifar) on the
#            real CIFAR-10, run to its end: test accuracy, steady epoch time, images/s, MFU,
#            compile time, checkpoint blocked time, peak memory            -> fast_run.json
#   b. peers dist_cifar vs Lightning (bf16-mixed + compile) vs a plain fp32 DDP loop, vgg16_cifar
#            at the fast preset's global batch of 512, a fixed number of steps  -> peers.json/.png
#   c. headline  `torchrun --nproc_per_node=1 -m dist_cifar.train --model vgg16_cifar` with no
#            other flags, two epochs: its epoch time against a's          -> headline.json
#   d. ladder  the feature ladder at batch 512, training steps only      -> ladder.json/.png
# plus suite_summary.json (provenance, each stage's status, the numbers, one line saying what was
# skipped and why) and suite.log: 7 files and a log, in $OUT when set (the device tool's folder)
# else benchmarks/results/gpu_suite/.
#
# On a GPU host (see README, "Running the GPU suite"): the checkout travels without .git and
# without ../shared, so first, here:
#   git rev-parse HEAD > .gpu_commit && mkdir -p .gpu_data && cp <cifar10-jpeg.tar.gz> .gpu_data/
# then there: bash benchmarks/gpu_suite.sh          (python3 with torch; Lightning optional)
#   bash benchmarks/gpu_suite.sh --smoke   # every stage, tiny, on CPU, under 3 minutes; same files
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0; [ "${1:-}" = "--smoke" ] && smoke=1
PY=${PYTHON:-python3}; [ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled
[ -f .gpu_commit ] && export DIST_CIFAR_GIT_COMMIT=$(cat .gpu_commit)
if [ $smoke = 1 ]; then budget=${SUITE_BUDGET_S:-170}; out=${OUT:-runs/gpu_suite_smoke}
else budget=${SUITE_BUDGET_S:-470}; out=${OUT:-benchmarks/results/gpu_suite}; fi
mkdir -p "$out"
exec > >(tee "$out/suite.log") 2>&1
scratch=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
stages="$scratch/stages.tsv"; : > "$stages"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
log() { echo "[suite +$(( $(date +%s) - start ))s] $*"; }
torchrun=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1)

# stage NAME MAX_SECONDS MIN_SECONDS -- command...: runs it under `timeout` for at most
# MAX_SECONDS (less when the budget is short), skips it when fewer than MIN_SECONDS are left.
stage() {
  local name=$1 max=$2 min=$3; shift 4
  local box=$(( $(left) < max ? $(left) : max )) t0=$(date +%s) rc
  if [ "$box" -lt "$min" ]; then
    log "$name: skipped, $(left)s left"; printf '%s\tskipped\t0\tonly %ss of the budget left\n' "$name" "$(left)" >> "$stages"; return
  fi
  log "$name: up to ${box}s"
  timeout --kill-after=20 "$box" "$@"; rc=$?
  local took=$(( $(date +%s) - t0 )) status=ok note=""
  [ $rc = 0 ] || { status=failed; note="exit $rc"; }
  [ $rc = 124 ] || [ $rc = 137 ] && { status=timed_out; note="stopped at ${box}s"; }
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "$note" >> "$stages"
  log "$name: $status in ${took}s"
}

"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
[ $smoke = 1 ] || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
tarball=""
[ -f .gpu_data/cifar10-jpeg.tar.gz ] && tarball=.gpu_data/cifar10-jpeg.tar.gz
if [ -n "$tarball" ]; then
  data=(--dataset imagefolder --data-dir "$tarball"); bench_data=("${data[@]}"); what="$tarball"
  log "decoding CIFAR-10 once (cached beside the tarball for every later stage)"
  "$PY" -c "import sys; from dist_cifar.data import load_source; r = load_source('imagefolder', sys.argv[1]); print(len(r.train_y), 'train images')" "$tarball"
else
  data=(--dataset synthetic --synthetic-size $([ $smoke = 1 ] && echo 1024 || echo 8192)); bench_data=(--dataset synthetic --data-dir data); what=synthetic
  [ $smoke = 1 ] || log "NO .gpu_data/cifar10-jpeg.tar.gz: every stage trains on synthetic data"
fi

if [ $smoke = 1 ]; then
  fast=(--preset fast --model small_cnn --epochs 2 --global-batch-size 128 --no-compile --checkpoint-every 1)
  headline=(--model small_cnn --epochs 2)
  peers=(--models small_cnn --global-batch-size 64 --steps 2 --num-workers 0)
  ladder=(--model small_cnn --batch-size 64 --steps-per-epoch 3 --rungs 0,1)
else
  fast=(--preset fast --checkpoint-every 6)
  headline=(--model vgg16_cifar --epochs 2)
  peers=(--models vgg16_cifar --global-batch-size 512 --steps 20)
  ladder=(--model vgg16_cifar --batch-size 512 --steps-per-epoch 24)
fi

stage fast 230 60 -- "${torchrun[@]}" -m dist_cifar.train "${fast[@]}" "${data[@]}" --out-dir "$scratch/fast" --wandb off
[ -f "$scratch/fast/config.json" ] && "$PY" benchmarks/suite_report.py run "$scratch/fast" "$out/fast_run.json"

stage peers 130 60 -- "$PY" benchmarks/peers.py "${peers[@]}" --rounds 1 --nproc 1 "${bench_data[@]}" \
  --timeout 100 --no-txt --out "$out/peers.json"

stage headline 100 45 -- "${torchrun[@]}" -m dist_cifar.train "${headline[@]}" "${data[@]}" --out-dir "$scratch/headline"
[ -f "$scratch/headline/config.json" ] && "$PY" benchmarks/suite_report.py run "$scratch/headline" "$out/headline.json"

stage ladder 200 40 -- "$PY" benchmarks/epoch_time.py "${ladder[@]}" --epochs 2 "${bench_data[@]}" --out "$out/ladder.json"
[ -f "$out/ladder.json" ] && [ ! -f "$out/ladder.png" ] && "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from charts import ladder_chart; ladder_chart(sys.argv[1])" "$out/ladder.json"

"$PY" benchmarks/suite_report.py summary "$out" "$stages" --data "$what" $([ $smoke = 1 ] && echo --smoke)
rm -rf "$scratch"
log "done in $(( $(date +%s) - start ))s; files in $out: $(cd "$out" && ls | tr '\n' ' ')"
