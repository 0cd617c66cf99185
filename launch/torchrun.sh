# Sourced by the launch scripts: run_torchrun ARGS... runs torchrun (as python -m dist_cifar.launcher,
# which is torchrun plus graceful stops) in its own session and passes it the stop signals this
# script gets: SIGTERM, SIGINT (Ctrl-C), SIGHUP. The workers then agree on a step, checkpoint and
# exit 75, which is what this returns (a second signal stops them at once: 130). Without an exit
# within LAUNCH_STOP_GRACE_S seconds of a stop (default 300) the stop is repeated, which kills.
#   run_torchrun TORCHRUN ARGS...      (PYTHON names the interpreter)
run_torchrun() {
  local child code stopped_at="" grace=${LAUNCH_STOP_GRACE_S:-300}
  # its own session: a signal to this script's process group reaches the launcher once, through
  # the trap below, not twice (which would mean "stop at once")
  setsid "$PYTHON" -m dist_cifar.launcher "$@" &
  child=$!
  trap 'kill -TERM "$child" 2>/dev/null; stopped_at=${stopped_at:-$SECONDS}; trapped=1' TERM HUP
  trap 'kill -INT "$child" 2>/dev/null; stopped_at=${stopped_at:-$SECONDS}; trapped=1' INT
  while :; do
    code="" trapped=""
    if [ -z "$stopped_at" ]; then wait "$child" && code=0 || code=$?; else sleep 1; fi
    [ -z "$trapped" ] || code=""   # wait was cut short by the signal, not ended by the child
    if [ -n "$code" ]; then break; fi
    if ! kill -0 "$child" 2>/dev/null; then wait "$child" && code=0 || code=$?; break; fi
    if [ -n "$stopped_at" ] && [ $(( SECONDS - stopped_at )) -gt "$grace" ]; then
      echo "[launch] the workers did not stop within ${grace}s of the stop signal (LAUNCH_STOP_GRACE_S): stopping them at once" >&2
      kill -TERM "$child" 2>/dev/null || true
      stopped_at=$(( SECONDS + 100000 ))
    fi
  done
  trap - TERM INT HUP
  return "$code"
}
