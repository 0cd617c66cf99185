#!/usr/bin/env bash
# One node, one process per GPU (or NPROC CPU processes on gloo when there is no GPU).
#   bash launch/single_node.sh [NPROC] -- TRAINER ARGS...
#   NPROC defaults to $NPROC, else the number of GPUs, else 2.
# Exit 75: preempted or stopped (SIGTERM, Ctrl-C: checkpoint written), run the same command again;
# 130: a second Ctrl-C stopped it at once.
# Example: bash launch/single_node.sh 4 -- --model vgg16_cifar --preset fast --data-dir data
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
nproc=${NPROC:-}
if [ $# -gt 0 ] && [ "$1" != "--" ]; then nproc=$1; shift; fi
[ "${1:-}" = "--" ] && shift
if [ -z "$nproc" ]; then
  nproc=$($PYTHON -c "import torch; print(torch.cuda.device_count() or 2)")
fi
if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
  echo "[launch] NPROC must be a positive number of processes, got '$nproc' (bash launch/single_node.sh 4 -- ARGS)" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# inductor would start min(32, CPUs) compile workers in every process: give each rank its share
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}
# bad flags: the trainer's one line and exit 2 now, not after torchrun started every worker
"$PYTHON" -c 'import sys; from dist_cifar.config import flag_problem; p = flag_problem(sys.argv[1:]); p and print("error: " + p, file=sys.stderr); sys.exit(2 if p else 0)' "$@" || exit 2
source launch/torchrun.sh
run_torchrun --standalone --nproc_per_node="$nproc" -m dist_cifar.train "$@"
