# Sourced by the sbatch scripts: run the job in the background, turn SLURM's warning signal
# (USR1, --signal=B:USR1@90) into SIGTERM for the trainer, and requeue once it has written
# its checkpoint. The requeued job resumes by itself (--resume auto, same out dir).
#   run_preemptible KILL_CMD -- CMD...   KILL_CMD is how to deliver SIGTERM to the job.
preempted=0
requeue_id=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
requeue_id=${requeue_id:-$SLURM_JOB_ID}

steps_done() {
  # srun returns before its step's processes have all exited; a job requeued (and restarted)
  # while they still run is refused by slurmd ("credential revoked") and ends FAILED. Wait
  # until the controller lists no step and this node holds no process of one.
  for _ in $(seq 1 120); do
    if ! squeue -h --steps -j "$SLURM_JOB_ID" -o %i 2>/dev/null | grep -qE '\.[0-9]+$' \
        && ! scontrol listpids "$SLURM_JOB_ID.0" 2>/dev/null | grep -qE '^[0-9]'; then
      return 0
    fi
    sleep 0.5
  done
}

count_exit75() {  # the trainer's "preempted ... exit 75" lines in a log (0 without one)
  local n
  n=$(grep -c 'checkpoint written; exit 75' "$1" 2>/dev/null)
  echo "${n:-0}"
}

run_preemptible() {
  local kill_cmd=$1; shift; [ "$1" = "--" ] && shift
  on_signal() {
    echo "[slurm] $(date +%T) got $1: asking the trainer to checkpoint and stop" >&2
    preempted=1
    # KILL_CMD reaches only what must stop (train.sbatch: the launcher on each node, which passes
    # SIGTERM to its workers; they agree on a step, save and exit 75). Signalling srun aborts the
    # step, and `scancel --signal` reaches every process of it, W&B's service included.
    eval "$kill_cmd" || true
  }
  trap 'on_signal USR1' USR1
  trap 'on_signal TERM' TERM
  # Workers that exit 75 were preempted by something else (SIGTERM from an admin, a node drain):
  # their checkpoint is written. The trainer says so in the job's log; count those lines.
  local log marks_before
  log=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdErr=//p' | head -n 1)
  marks_before=$(count_exit75 "$log")
  "$@" &
  local child=$!
  local status=0
  while true; do
    wait "$child"; status=$?
    kill -0 "$child" 2>/dev/null || break   # wait returned because of a trapped signal
  done
  # Requeue only what checkpointed: exit 75, or (several nodes, where srun ends the other nodes'
  # tasks once one has exited) the trainer's "exit 75" line in this job's log.
  local checkpointed=0
  if [ "$status" = 75 ] || { [ "$status" -ne 0 ] && [ "$(count_exit75 "$log")" -gt "$marks_before" ]; }; then
    checkpointed=1
  fi
  if [ "$checkpointed" = 1 ]; then
    steps_done
    echo "[slurm] $(date +%T) the workers checkpointed and exited 75; requeueing $requeue_id" >&2
    scontrol requeue "$requeue_id"
    exit 0
  fi
  [ "$preempted" = 0 ] || echo "[slurm] $(date +%T) stop asked, but the trainer exited $status without a checkpoint: not requeued" >&2
  return "$status"
}
