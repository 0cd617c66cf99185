#!/usr/bin/env bash
# Every GPU number this project needs, in one call that fits `timeout 570` on one H200 (a budget
# of 540 s, the suite's own overhead included), stages in order of value, each time-boxed and
# writing its JSON as soon as it has one:
#   0. rehearsal within the first 30 s, two steps each of the two configurations the CPU
#                rehearsal (--resolve-as cuda) found broken before: fsdp + bf16 and hybrid + fp16 on
#                vgg_truncated, one rank each, side by side: rows in suite_summary.json, so the GPU
#                says in its first minute whether the CPU rehearsal was right
#   a. fast      `--preset fast` (vgg16_cifar) to its end on the real CIFAR-10, one rank, --keep-last 1:
#                test accuracy, steady epoch time, images/s, MFU (against 790 measured and 989
#                datasheet TFLOP/s), compile time, checkpoint blocked/write time, peak memory  -> fast_run.json
#   b. ladder    the feature ladder at batch 512, training steps only, DataLoader rungs with 8
#                workers, plus DDP + bf16 hook at world size 1 (what the trainer now skips there);
#                it reuses a's compiled graphs (inductor's cache)                  -> ladder.json/.png
#   c. peers     dist_cifar vs Lightning vs a plain loop at the fast preset's global batch of 512,
#                one row per contestant (an error is a row), none with DDP at world size 1 -> peers.json/.png
#   d. headline  `torchrun --nproc_per_node=1 -m dist_cifar.train --model vgg16_cifar`, 2 epochs,
#                without checkpoints, best weights or final evaluation, only when >= 120 s remain
#                                                                                 -> headline.json
# plus suite_summary.json (provenance, each stage's status, the numbers, what was skipped or cut),
# rewritten after every stage, and suite.log: at most 7 files and the log, in $OUT when set (the
# device tool's folder) else benchmarks/results/gpu_suite/. An earlier suite's files there are
# moved aside into previous/ first, and the summary reads only files that carry this suite's id
# in their provenance: a failed stage never reports an earlier suite's numbers.
#
# Stages a-c are launched without torchrun (a one-rank NCCL process group from RANK/WORLD_SIZE/
# MASTER_*), d under torchrun; each in its own process group, stopped at its box with SIGTERM and,
# 40 s later (longer than torchrun's 30 s grace), SIGKILL; a box leaves room for that grace and
# for the summaries still to come. Before every stage the suite looks for processes left by its
# own earlier stages (by a marker holding this suite's id in their environment, which survives
# setsid; another suite's processes are never touched) and on the GPU (nvidia-smi), kills them
# and says so. A stage that overruns its box is "cut": what it wrote is kept, the summary says
# so, and the suite goes on. Checkpoints are deleted once each stage is distilled; the data cache
# lives in a private scratch folder (mktemp -d; without a usable one the suite stops at once,
# exit 2), never beside the tarball.
#
# On a GPU host (README, "Running the GPU suite"): the checkout travels without .git and without
# ../shared, so first, here:
#   git rev-parse HEAD > .gpu_commit && mkdir -p .gpu_data && cp <cifar10-jpeg.tar.gz> .gpu_data/
# and carry exactly those two files; there: bash benchmarks/gpu_suite.sh (python3 with torch;
# Lightning optional). Without the tarball it stops at once (exit 2) instead of timing synthetic data.
#   bash benchmarks/gpu_suite.sh --smoke   # the same stages, order and files, tiny, on CPU
#   SUITE_STAGES="rehearsal peers" ...     # only those stages (the others are reported skipped)
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0; [ "${1:-}" = "--smoke" ] && smoke=1
PY=${PYTHON:-python3}; [ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled
[ -f .gpu_commit ] && export DIST_CIFAR_GIT_COMMIT=$(cat .gpu_commit)
if [ $smoke = 1 ]; then budget=${SUITE_BUDGET_S:-300}; out=${OUT:-runs/gpu_suite_smoke}
else budget=${SUITE_BUDGET_S:-540}; out=${OUT:-benchmarks/results/gpu_suite}; fi
tarball=${SUITE_DATA:-.gpu_data/cifar10-jpeg.tar.gz}
wanted=" ${SUITE_STAGES:-rehearsal fast ladder peers headline} "
# A private scratch folder first: without one nothing below may run (every path in it is built
# from $scratch, and a `rm -rf "$scratch/..."` with an empty $scratch would reach the root).
scratch=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX" 2>/dev/null) || scratch=""
if [ -z "$scratch" ] || [ ! -d "$scratch" ] || [ ! -w "$scratch" ]; then
  echo "error: no usable scratch folder (mktemp -d in ${TMPDIR:-/tmp} failed): set TMPDIR to a writable folder with a few GB free" >&2
  exit 2
fi
suite_id="$(basename "$scratch" | cut -d. -f2)-$$"
export DIST_CIFAR_SUITE_ID=$suite_id  # in every result's provenance, and in every stage's marker
mkdir -p "$out" || { echo "error: cannot create the out folder $out" >&2; rm -rf -- "${scratch:?}"; exit 2; }
# An earlier suite's files are moved aside, never mixed with this one's
own_files=(suite_summary.json fast_run.json ladder.json ladder.png peers.json peers.png headline.json suite.log)
earlier=(); for f in "${own_files[@]}"; do [ -e "$out/$f" ] && earlier+=("$f"); done
if [ ${#earlier[@]} -gt 0 ]; then
  rm -rf -- "${out:?}/previous" && mkdir "$out/previous" && for f in "${earlier[@]}"; do mv -- "$out/$f" "$out/previous/"; done
fi
exec > >(tee "$out/suite.log") 2>&1
tee_pid=$!
[ ${#earlier[@]} -gt 0 ] && echo "[suite] an earlier suite's files moved to $out/previous/: ${earlier[*]}"
export DIST_CIFAR_CACHE_DIR="$scratch/cache"  # 185 MB: never inside the folder that travels back
stages="$scratch/stages.tsv"; : > "$stages"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
log() { echo "[suite +$(( $(date +%s) - start ))s] $*"; }
finish() {  # the log is flushed before the call returns
  rm -rf -- "${scratch:?}"
  log "done in $(( $(date +%s) - start ))s; files in $out: $(cd "$out" && ls | tr '\n' ' ')"
  exec 1>&- 2>&-
  wait "$tee_pid" 2>/dev/null
  exit "${1:-0}"
}

# Processes of earlier stages still alive (torchrun workers sit in their own sessions, so a
# process group kill can miss them): found by the marker every stage's environment carries.
leftovers() {
  local pid
  for pid in $(grep -las "DIST_CIFAR_SUITE_STAGE=$suite_id:" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); do
    [ "$pid" = "$$" ] || [ "$pid" = "$BASHPID" ] || echo "$pid"
  done
}
sweep() {
  local pids; pids=$(leftovers | tr '\n' ' ')
  if [ -n "${pids// /}" ]; then
    log "before $1: killing processes left by earlier stages: $pids"; kill -9 $pids 2>/dev/null; sleep 1
  else
    log "before $1: no process left by earlier stages"
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    local gpu; gpu=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null | tr '\n' ';')
    log "before $1: GPU processes: ${gpu:-none}"
  fi
}

# What a stage's box must leave of the budget: the kill grace (40 s) should it be cut, and the
# Python starts (~py_s each, measured below) of its distillation and of the summaries after it.
reserve() { echo $(( 40 + 3 * py_s + 5 )); }
# stage NAME MAX_SECONDS MIN_SECONDS -- command...: at most MAX_SECONDS (less when the budget is
# short; skipped when fewer than MIN_SECONDS are left), in its own process group.
stage() {
  local name=$1 max=$2 min=$3; shift 4
  local room=$(( $(left) - $(reserve) )); local box=$(( room < max ? room : max )) t0=$(date +%s) rc cut=0
  if [[ "$wanted" != *" $name "* ]]; then
    log "$name: skipped (not in SUITE_STAGES)"; printf '%s\tskipped\t0\tnot in SUITE_STAGES\n' "$name" >> "$stages"; ran=0; return
  fi
  if [ "$box" -lt "$min" ]; then
    log "$name: skipped, $(left)s left"; printf '%s\tskipped\t0\tonly %ss of the budget left\n' "$name" "$(left)" >> "$stages"; ran=0; return
  fi
  ran=1
  sweep "$name"
  log "$name: up to ${box}s"
  DIST_CIFAR_SUITE_STAGE=$suite_id:$name setsid "$@" &
  local pid=$! deadline=$(( $(date +%s) + box ))
  while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 1; done
  if kill -0 "$pid" 2>/dev/null; then
    cut=1; log "$name: box of ${box}s reached: SIGTERM"
    kill -TERM -- -"$pid" 2>/dev/null
    local grace=$(( $(date +%s) + 40 ))
    while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$grace" ]; do sleep 1; done
    kill -KILL -- -"$pid" 2>/dev/null
  fi
  wait "$pid"; rc=$?
  local took=$(( $(date +%s) - t0 )) status=ok note=""
  [ $rc = 0 ] || { status=failed; note="exit $rc"; }
  [ $cut = 1 ] && { status=cut; note="stopped at its ${box}s box; what it wrote is kept"; }
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "$note" >> "$stages"
  log "$name: $status in ${took}s"
}
summarise() { "$PY" benchmarks/suite_report.py summary "$out" "$stages" --data "$what" --suite-id "$suite_id" \
  --rehearsal "$scratch/rehearsal.json" $([ $smoke = 1 ] && echo --smoke); }
# a one-rank process group without torchrun (NCCL on the GPU, as torchrun would set it up)
one_rank=(env RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1
          MASTER_PORT=$(( 20000 + RANDOM % 20000 )))

if [ -f "$tarball" ]; then
  data=(--dataset imagefolder --data-dir "$tarball"); bench_data=("${data[@]}"); what="$tarball"
elif [ $smoke = 1 ]; then
  data=(--dataset synthetic --synthetic-size 1024); bench_data=(--dataset synthetic --data-dir data); what=synthetic
else
  echo "error: $tarball is missing: copy cifar10-jpeg.tar.gz there and carry it (README, 'Running the GPU suite'); no GPU number is measured on synthetic data" >&2
  finish 2
fi
t0=$(date +%s)
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
py_s=$(( $(date +%s) - t0 + 1 ))  # one Python + torch start: each distillation and summary pays it

# 0. The first GPU minute: the two configurations that crashed or drifted before the CPU
# rehearsal, two steps each, side by side (one rank each: two NCCL ranks cannot share one GPU)
rehearse() {
  local design=$1 precision=$2
  env RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$(( 20000 + RANDOM % 20000 )) \
    "$PY" -m dist_cifar.train --model "$rehearsal_model" --dataset synthetic --synthetic-size 256 --batch-size 32 \
    --epochs 1 --steps-per-epoch 2 --parallel "$design" --precision "$precision" --resolve-as cuda --no-compile \
    --no-final-eval --no-save-best --wandb off --quiet --out-dir "$scratch/rehearsal-$design-$precision" \
    > "$scratch/rehearsal-$design-$precision.log" 2>&1
  echo $? > "$scratch/rehearsal-$design-$precision.exit"
}
rehearsal() { rehearse fsdp bf16 & rehearse hybrid fp16 & wait; }
rehearsal_model=vgg_truncated; [ $smoke = 1 ] && rehearsal_model=small_cnn  # CPU: the same steps, in the box
export PY scratch rehearsal_model
stage rehearsal 30 10 -- bash -c "$(declare -f rehearse rehearsal); rehearsal"
[ "$ran" = 1 ] && "$PY" benchmarks/suite_report.py rehearsal "$scratch" "$scratch/rehearsal.json"

[ $smoke = 1 ] || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
log "scratch disk: $(df -h "$scratch" | tail -1)"
if [ "$what" != synthetic ]; then
  log "decoding CIFAR-10 once (cached in the scratch folder for every later stage)"
  "$PY" -c "import sys; from dist_cifar.data import load_source; r = load_source('imagefolder', sys.argv[1]); print(len(r.train_y), 'train images')" "$tarball"
fi

if [ $smoke = 1 ]; then
  fast=(--preset fast --model small_cnn --epochs 3 --global-batch-size 128 --no-compile --checkpoint-every 2)
  ladder=(--model small_cnn --batch-size 64 --steps-per-epoch 3 --rungs 0,4,5 --num-workers 2 --extra=--no-compile)
  peers=(--models small_cnn --global-batch-size 64 --steps 2 --num-workers 0 --timeout 60)
  headline=(--model small_cnn --epochs 2)
  boxes=(120 70 70 120)
else
  fast=(--preset fast --checkpoint-every 6)
  ladder=(--model vgg16_cifar --batch-size 512 --steps-per-epoch 24 --num-workers 8)
  peers=(--models vgg16_cifar --global-batch-size 512 --steps 20 --num-workers 8 --timeout 100)
  headline=(--model vgg16_cifar --epochs 2)
  boxes=(270 150 110 120)
fi
no_saves=(--checkpoint-every 0 --checkpoint-interval-min 0 --no-save-best --no-final-eval)

stage fast "${boxes[0]}" 60 -- "${one_rank[@]}" "$PY" -m dist_cifar.train "${fast[@]}" "${data[@]}" --keep-last 1 \
  --out-dir "$scratch/fast" --wandb off
[ -f "$scratch/fast/config.json" ] && "$PY" benchmarks/suite_report.py run "$scratch/fast" "$out/fast_run.json"
rm -rf -- "${scratch:?}/fast"  # its 4 GB checkpoints, now distilled
[ "$ran" = 1 ] && summarise  # after a stage that ran (a Python start each)

stage ladder "${boxes[1]}" 40 -- "$PY" benchmarks/epoch_time.py "${ladder[@]}" --epochs 2 "${bench_data[@]}" \
  --out "$out/ladder.json"
[ -f "$out/ladder.json" ] && [ ! -f "$out/ladder.png" ] && "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from charts import ladder_chart; ladder_chart(sys.argv[1])" "$out/ladder.json"
[ "$ran" = 1 ] && summarise  # after a stage that ran (a Python start each)

stage peers "${boxes[2]}" 40 -- "$PY" benchmarks/peers.py "${peers[@]}" --rounds 1 --nproc 1 "${bench_data[@]}" \
  --no-txt --out "$out/peers.json"
[ "$ran" = 1 ] && summarise  # after a stage that ran (a Python start each)

if [ "$(left)" -ge "${boxes[3]}" ]; then
  stage headline "$(( $(left) - 15 ))" 45 -- "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
    -m dist_cifar.train "${headline[@]}" "${data[@]}" "${no_saves[@]}" --out-dir "$scratch/headline"
  [ -f "$scratch/headline/config.json" ] && "$PY" benchmarks/suite_report.py run "$scratch/headline" "$out/headline.json"
  rm -rf -- "${scratch:?}/headline"
else
  log "headline: skipped, $(left)s left (it needs ${boxes[3]})"
  printf 'headline\tskipped\t0\tonly %ss of the budget left (needs %s)\n' "$(left)" "${boxes[3]}" >> "$stages"
fi
sweep "the summary"
summarise
finish 0
