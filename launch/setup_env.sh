#!/usr/bin/env bash
# Create .venv with everything dist_cifar and its tests need, once. Safe to re-run: it does
# nothing when .venv already matches this file's package list.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch/torchvision are pinned to the wheels these machines keep on local disk; GPU hosts that
# bring their own torch can install the project with plain `pip install -e .` instead.
PACKAGES=(torch==2.14.1 torchvision==0.29.1 numpy rich matplotlib wandb pytest)
stamp=".venv/.dist_cifar-$(printf '%s\n' "${PACKAGES[@]}" | sha1sum | cut -c1-12)"
if [ -f "$stamp" ] && .venv/bin/python -c "import torch, dist_cifar" 2>/dev/null; then
  exit 0
fi
echo "[setup] creating .venv (torch from local disk; a few minutes the first time)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "${PACKAGES[@]}"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
touch "$stamp"
