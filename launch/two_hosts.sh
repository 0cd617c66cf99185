#!/usr/bin/env bash
# Two emulated hosts on one machine (root): two network namespaces joined by a veth pair with
# addresses this script gives them, the link optionally shaped with tc tbf, and one torchrun per
# namespace (--nnodes=2, c10d rendezvous on the first namespace's address, gloo over the veth).
#   bash launch/two_hosts.sh [--rate 1gbit] [--nproc-per-host N] [--module M] -- ARGS...
# ARGS go to the trainer (or to --module M, any torch.distributed script run with -m).
# Exit: the workers' status; 77 when namespaces cannot be made here (not root, no `ip netns`).
# Both namespaces see the same files (only the network is split), so the out dir is shared.
# The namespaces (and with them the veth pair) are deleted on every exit path.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
rate="" nproc=1 module=dist_cifar.train join_timeout=${JOIN_TIMEOUT:-60}
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --rate) rate=$2; shift 2 ;;
    --nproc-per-host) nproc=$2; shift 2 ;;
    --module) module=$2; shift 2 ;;
    *) echo "two_hosts.sh: unknown option $1 (see the header of launch/two_hosts.sh)" >&2; exit 2 ;;
  esac
done
[ "${1:-}" = "--" ] && shift
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || { echo "two_hosts.sh: --nproc-per-host must be a positive integer, got '$nproc'" >&2; exit 2; }

tag=$(printf '%04x' $(( ($$ + RANDOM) % 65536 )))
ns=("dcA$tag" "dcB$tag") dev=("vdcA$tag" "vdcB$tag")
# a /30 of our own inside namespaces we make; no traffic leaves them
subnet=$(( 16 + RANDOM % 200 ))
addr=("10.213.$subnet.1" "10.213.$subnet.2")
link_bytes() {  # what each end sent over the link, from the veth counters (headers included)
  for i in 0 1; do ip netns exec "${ns[$i]}" cat "/sys/class/net/${dev[$i]}/statistics/tx_bytes" 2>/dev/null || echo 0; done
}
cleanup() {
  [ -z "${started:-}" ] || echo "[two_hosts] link tx_bytes host0=$(link_bytes | paste -sd' ' | sed 's/ / host1=/')" >&2
  for n in "${ns[@]}"; do ip netns del "$n" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 143' TERM INT
if [ "$(id -u)" != 0 ] || ! ip netns add "${ns[0]}" 2>/dev/null; then
  echo "two_hosts.sh: cannot make network namespaces here (needs root and iproute2's ip netns)" >&2
  exit 77
fi
ip netns add "${ns[1]}"
ip link add "${dev[0]}" type veth peer name "${dev[1]}"
for i in 0 1; do
  ip link set "${dev[$i]}" netns "${ns[$i]}"
  ip -n "${ns[$i]}" addr add "${addr[$i]}/30" dev "${dev[$i]}"
  ip -n "${ns[$i]}" link set "${dev[$i]}" up
  ip -n "${ns[$i]}" link set lo up
  if [ -n "$rate" ]; then  # both directions shaped: each end's egress
    ip netns exec "${ns[$i]}" tc qdisc add dev "${dev[$i]}" root tbf rate "$rate" burst 1mbit latency 100ms
  fi
done
echo "[two_hosts] ${ns[0]} ${addr[0]} <-> ${ns[1]} ${addr[1]} (${rate:-unshaped}), $nproc rank(s) per host" >&2

started=1
port=$(( 20000 + RANDOM % 20000 ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
pids=()
for i in 0 1; do
  ip netns exec "${ns[$i]}" env GLOO_SOCKET_IFNAME="${dev[$i]}" \
    "$PYTHON" -m torch.distributed.run --nnodes=2 --node_rank="$i" --nproc_per_node="$nproc" \
    --rdzv-backend=c10d --rdzv-endpoint="${addr[0]}:$port" --rdzv-id="two_hosts_$tag" \
    --rdzv-conf="join_timeout=$join_timeout,is_host=$(( i == 0 ))" --local-addr="${addr[$i]}" \
    -m "$module" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { rc=$?; [ "$status" -ne 0 ] || status=$rc; }
done
exit "$status"
