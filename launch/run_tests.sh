#!/usr/bin/env bash
# The test suite, on a fresh machine too: sets up .venv, then runs pytest (extra args pass on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
