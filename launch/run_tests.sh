#!/usr/bin/env bash
# The test suite, on a fresh machine too: sets up .venv, then runs pytest (extra args pass on).
#   bash launch/run_tests.sh            everything CI runs (the README states how long it takes)
#   bash launch/run_tests.sh --quick    the quick tier: unit checks of every module and one
#                                       end-to-end run of each design (under 3 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
cpus=$(.venv/bin/python -c 'import os; print(len(os.sched_getaffinity(0)))')  # not nproc: it obeys OMP_NUM_THREADS
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
tier=()
if [ "${1:-}" = "--quick" ]; then shift; tier=(-m "quick and not slow"); fi
# One worker per CPU (pytest-xdist), a test module to a worker: its module-scoped fixtures (one
# torchrun launch serving many checks) run once. Most tests wait on processes, SLURM or signals,
# or use one core: two workers on two cores take ~60% of one worker's time.
workers=()
if .venv/bin/python -c "import xdist" 2>/dev/null && [ "${DIST_CIFAR_TEST_WORKERS:-$cpus}" -gt 1 ]; then
  workers=(-n "${DIST_CIFAR_TEST_WORKERS:-$cpus}" --dist loadscope)
fi
start=$(date +%s)
status=0
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "${workers[@]}" "${tier[@]}" "$@" || status=$?
echo "[run_tests] the suite took $(( $(date +%s) - start )) s on $cpus CPU(s), ${workers[1]:-1} worker(s) (exit $status)"
exit $status
