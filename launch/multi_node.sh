#!/usr/bin/env bash
# Several nodes: run this once on every node, with the same endpoint and job id.
#   bash launch/multi_node.sh NNODES NODE_RANK ENDPOINT [NPROC_PER_NODE] -- TRAINER ARGS...
# or set NNODES, NODE_RANK, RDZV_ENDPOINT (host:port of node 0), NPROC_PER_NODE, RDZV_ID.
# Example (2 nodes x 8 GPUs; on node 1 use NODE_RANK=1):
#   bash launch/multi_node.sh 2 0 node0.cluster:29500 8 -- --preset fast --data-dir /data/cifar
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
nnodes=${args[0]:-${NNODES:?give NNODES}}
node_rank=${args[1]:-${NODE_RANK:?give NODE_RANK}}
endpoint=${args[2]:-${RDZV_ENDPOINT:?give the rendezvous endpoint host:port of node 0}}
nproc=${args[3]:-${NPROC_PER_NODE:-$($PYTHON -c "import torch; print(torch.cuda.device_count() or 1)")}}
for value in "$nnodes" "$nproc"; do
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || { echo "[launch] NNODES and NPROC_PER_NODE must be positive numbers, got '$value'" >&2; exit 2; }
done
[[ "$node_rank" =~ ^[0-9]+$ ]] && [ "$node_rank" -lt "$nnodes" ] || { echo "[launch] NODE_RANK must be in 0..$(( nnodes - 1 )), got '$node_rank'" >&2; exit 2; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# inductor would start min(32, CPUs) compile workers in every process: give each rank its share
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}
# torchrun's own join timeout is 600 s with nothing printed; bound it and say what is awaited
join_timeout=${JOIN_TIMEOUT:-300}
[[ "$join_timeout" =~ ^[1-9][0-9]*$ ]] || { echo "[launch] JOIN_TIMEOUT must be a positive number of seconds, got '$join_timeout'" >&2; exit 2; }
echo "[launch] node $node_rank of $nnodes: waiting up to ${join_timeout}s for all $nnodes nodes at $endpoint (rendezvous id ${RDZV_ID:-dist_cifar}; JOIN_TIMEOUT=... to change)" >&2
# bad flags: the trainer's one line and exit 2 now, not after torchrun started every worker
"$PYTHON" -c 'import sys; from dist_cifar.config import flag_problem; p = flag_problem(sys.argv[1:]); p and print("error: " + p, file=sys.stderr); sys.exit(2 if p else 0)' "$@" || exit 2
source launch/torchrun.sh
run_torchrun --nnodes="$nnodes" --node_rank="$node_rank" \
  --nproc_per_node="$nproc" --rdzv-backend=c10d --rdzv-endpoint="$endpoint" \
  --rdzv-id="${RDZV_ID:-dist_cifar}" --rdzv-conf="join_timeout=$join_timeout" -m dist_cifar.train "$@"
