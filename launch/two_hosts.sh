#!/usr/bin/env bash
# Two emulated hosts on one machine (root): two network namespaces joined by a veth pair with
# addresses this script gives them, the link optionally shaped with tc tbf, and one torchrun per
# namespace (--nnodes=2, c10d rendezvous on the first namespace's address, gloo over the veth).
#   bash launch/two_hosts.sh [--rate 1gbit] [--nproc-per-host N] [--module M] -- ARGS...
# ARGS go to the trainer (or to --module M, any torch.distributed script run with -m).
# Exit: the workers' status (75 when they were stopped and checkpointed); 77 when namespaces
# cannot be made here (not root, no `ip netns`).
# Both namespaces see the same files (only the network is split), so the out dir is shared.
# Stops: SIGTERM or Ctrl-C ask both hosts to checkpoint and exit 75 (up to STOP_GRACE_S, default
# 60 s; a second signal kills at once); a host that ends while the other runs on, or the link
# going down, stops the other too; whatever still runs after the grace is killed. On every exit
# path every process in the namespaces is killed and the namespaces (with the veth pair) are
# deleted. Only a SIGKILL of this script leaves them: `ip netns list | grep dc` names them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
rate="" nproc=1 module=dist_cifar.train join_timeout=${JOIN_TIMEOUT:-60}
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --rate|--nproc-per-host|--module)
      [ $# -ge 2 ] || { echo "two_hosts.sh: $1 needs a value (see the header of launch/two_hosts.sh)" >&2; exit 2; }
      case "$1" in --rate) rate=$2 ;; --nproc-per-host) nproc=$2 ;; --module) module=$2 ;; esac
      shift 2 ;;
    *) echo "two_hosts.sh: unknown option $1 (see the header of launch/two_hosts.sh)" >&2; exit 2 ;;
  esac
done
[ "${1:-}" = "--" ] && shift
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || { echo "two_hosts.sh: --nproc-per-host must be a positive integer, got '$nproc'" >&2; exit 2; }
[ -z "$rate" ] || [[ "$rate" =~ ^[0-9]+(\.[0-9]+)?[kmgt]?(bit|bps)$ ]] || {
  echo "two_hosts.sh: --rate takes a tc rate such as 1gbit, 100mbit or 10mbps, got '$rate'" >&2; exit 2; }
grace=${STOP_GRACE_S:-60}
[[ "$grace" =~ ^[1-9][0-9]*$ ]] || { echo "two_hosts.sh: STOP_GRACE_S must be a positive number of seconds, got '$grace'" >&2; exit 2; }

tag=$(printf '%04x' $(( ($$ + RANDOM) % 65536 )))
ns=("dcA$tag" "dcB$tag") dev=("vdcA$tag" "vdcB$tag")
# a /30 of our own inside namespaces we make; no traffic leaves them
subnet=$(( 16 + RANDOM % 200 ))
addr=("10.213.$subnet.1" "10.213.$subnet.2")
link_bytes() {  # what each end sent over the link, from the veth counters (headers included)
  for i in 0 1; do ip netns exec "${ns[$i]}" cat "/sys/class/net/${dev[$i]}/statistics/tx_bytes" 2>/dev/null || echo 0; done
}
kill_all() {  # every process left in our namespaces: launchers, workers, W&B services
  local n
  for n in "${ns[@]}"; do ip netns pids "$n" 2>/dev/null | xargs -r kill -9 2>/dev/null || true; done
}
cleanup() {
  [ -z "${started:-}" ] || echo "[two_hosts] link tx_bytes host0=$(link_bytes | paste -sd' ' | sed 's/ / host1=/')" >&2
  kill_all
  for n in "${ns[@]}"; do ip netns del "$n" 2>/dev/null || true; done
  ip link del "${dev[0]}" 2>/dev/null || true  # made but not yet moved into a namespace
}
trap cleanup EXIT
signalled=""
trap 'signalled=${signalled:+again}${signalled:-TERM}; [ -n "${pids:-}" ] || exit 143' TERM
trap 'signalled=${signalled:+again}${signalled:-INT}; [ -n "${pids:-}" ] || exit 130' INT
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
  # its own session: our signals reach each host's launcher once, from the loop below
  ip netns exec "${ns[$i]}" setsid env GLOO_SOCKET_IFNAME="${dev[$i]}" \
    "$PYTHON" -m dist_cifar.launcher --nnodes=2 --node_rank="$i" --nproc_per_node="$nproc" \
    --rdzv-backend=c10d --rdzv-endpoint="${addr[0]}:$port" --rdzv-id="two_hosts_$tag" \
    --rdzv-conf="join_timeout=$join_timeout,is_host=$(( i == 0 ))" --local-addr="${addr[$i]}" \
    -m "$module" "$@" &
  pids+=($!)
done

link_up() {
  local i
  for i in 0 1; do ip -n "${ns[$i]}" -o link show "${dev[$i]}" 2>/dev/null | grep -q 'state UP' || return 1; done
}
failed() { [ "$1" != 0 ] && [ "$1" != 75 ]; }
codes=("" "") stop_at="" first_end=""
while :; do
  alive=0
  for i in 0 1; do
    [ -z "${codes[$i]}" ] || continue
    if kill -0 "${pids[$i]}" 2>/dev/null; then alive=$(( alive + 1 )); continue; fi
    wait "${pids[$i]}" && codes[$i]=0 || codes[$i]=$?
    first_end=${first_end:-$SECONDS}
  done
  [ "$alive" -gt 0 ] || break
  reason=""
  if [[ "$signalled" == again* ]]; then
    echo "[two_hosts] signalled again: killing both hosts at once" >&2
    kill_all
  elif [ -z "$stop_at" ]; then
    if [ -n "$signalled" ]; then reason="got SIG$signalled"
    elif ! link_up; then reason="the link between the hosts went down"; grace=10
    # a host that ended with 75 checkpointed and stopped as asked: the other, still writing its
    # own preemption checkpoint (rank 0 under ddp holds the whole state), gets the grace below
    elif [ -n "$first_end" ] && { failed "${codes[0]:-0}" || failed "${codes[1]:-0}"; }; then
      reason="one host ended (exit ${codes[0]:-running}/${codes[1]:-running}) while the other runs on"
    elif [ -n "$first_end" ] && [ $(( SECONDS - first_end )) -gt "$grace" ]; then
      reason="one host finished ${grace}s ago and the other has not"
    fi
    if [ -n "$reason" ]; then
      echo "[two_hosts] $reason: asking both hosts to checkpoint and stop (killed after ${grace}s)" >&2
      for i in 0 1; do [ -n "${codes[$i]}" ] || kill -TERM "${pids[$i]}" 2>/dev/null || true; done
      stop_at=$SECONDS
    fi
  elif [ $(( SECONDS - stop_at )) -gt "$grace" ]; then
    echo "[two_hosts] still running ${grace}s after the stop: killing every process in the namespaces" >&2
    kill_all
    stop_at=$(( SECONDS + 100000 ))
  fi
  sleep 0.5
done
# both 0: 0; both checkpointed (75): 75; else the first failure
if [ "${codes[0]}" = "${codes[1]}" ]; then status=${codes[0]}
elif [ "${codes[0]}" != 0 ] && [ "${codes[0]}" != 75 ]; then status=${codes[0]}
elif [ "${codes[1]}" != 0 ] && [ "${codes[1]}" != 75 ]; then status=${codes[1]}
else status=75
fi
echo "[two_hosts] host0 exited ${codes[0]}, host1 exited ${codes[1]}" >&2
exit "$status"
