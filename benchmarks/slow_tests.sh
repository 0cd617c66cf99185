#!/usr/bin/env bash
# The checks marked slow (each tens of seconds: every ablation study in one run, a stalled rank
# timing out, resuming at another world size), kept out of the default suite so that stays short.
#   bash benchmarks/slow_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -p no:cacheprovider -m slow "$@"
