# Sourced by the launch scripts. torchrun reports a job whose workers exited 75 (preempted: each
# wrote its checkpoint and stopped on purpose) as FAILED and exits 1; run_torchrun passes stdout
# and stderr through unchanged and turns that case into exit 75 with one line saying so.
#   run_torchrun TORCHRUN ARGS...      (PYTHON names the interpreter)
run_torchrun() {
  local log code
  log=$(mktemp)
  set +e
  # stderr goes through tee (to the terminal and the log), stdout straight to fd 3
  { "$PYTHON" -m torch.distributed.run "$@" 2>&1 1>&3 3>&- | tee "$log" 1>&2 3>&-; } 3>&1
  code=${PIPESTATUS[0]}
  set -e
  if [ "$code" -ne 0 ] && grep -qE 'exitcode *: 75' "$log"; then
    echo "[launch] preempted: the workers checkpointed and exited 75; run the same command again to resume" >&2
    code=75
  fi
  rm -f "$log"
  return "$code"
}
