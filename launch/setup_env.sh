#!/usr/bin/env bash
# Create .venv with everything dist_cifar and its tests need, once. Safe to re-run: it does
# nothing when .venv already matches this file's package list.
#
# A torch already installed for $PYTHON (a GPU host's own build, matched to its driver) is used
# when it is recent enough: .venv then sees that interpreter's packages and installs only what is
# missing, so a host without a package index works too. Otherwise the pinned torch is installed
# (on these machines pip takes it from local disk). When nvidia-smi lists GPUs but torch sees
# none, setup stops with one line instead of leaving a venv that would train on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# With .venv activated, python3 is .venv's own: the host's interpreter is the one it was made from.
if [ -x .venv/bin/python ]; then
  prefix='import os, sys; print(os.path.realpath(sys.prefix))'
  if [ "$("$PY" -c "$prefix" 2>/dev/null)" = "$(.venv/bin/python -c "$prefix")" ]; then
    PY=$(.venv/bin/python -c 'import sys; print(sys._base_executable)')
  fi
fi
TORCH_PIN=(torch==2.14.1 torchvision==0.29.1)
REQUIRED=(numpy rich matplotlib)
OPTIONAL=(wandb pytest xdist:pytest-xdist)  # module[:pip package]
MIN_TORCH=2.4

usable_torch=$("$PY" - "$MIN_TORCH" <<'EOF' 2>/dev/null || echo ""
import sys
import torch, torchvision  # noqa: F401
version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
minimum = tuple(int(x) for x in sys.argv[1].split("."))
print(torch.__version__ if version >= minimum else "")
EOF
)
stamp=".venv/.dist_cifar-$(printf '%s\n' "${TORCH_PIN[@]}" "${REQUIRED[@]}" "${OPTIONAL[@]}" "setuptools:torch" "base:${usable_torch}" | sha1sum | cut -c1-12)"
if [ -f "$stamp" ] && .venv/bin/python -c "import torch, dist_cifar" 2>/dev/null; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
need=()
if [ -n "$usable_torch" ]; then
  # a .pth line puts $PY's packages after .venv's own: that torch, and whatever else is there
  "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/_dist_cifar_base.pth"
  echo "[setup] using the installed torch $usable_torch of $PY" >&2
else
  rm -f "$site/_dist_cifar_base.pth"
  need+=("${TORCH_PIN[@]}")
  echo "[setup] installing ${TORCH_PIN[*]} into .venv (from local disk here; a few minutes the first time)" >&2
fi
for module in "${REQUIRED[@]}"; do
  .venv/bin/python -c "import $module" 2>/dev/null || need+=("$module")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "[setup] installing: ${need[*]}" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check "${need[@]}"
fi
# `pip install .` without an index (tests, offline clusters) builds with this setuptools:
# bdist_wheel is built in from 70.1 on; torch's own bounds on it (e.g. <82 for torch 2.11) hold too
setuptools_spec=$(.venv/bin/python - <<'PYEOF' 2>/dev/null || echo ">=70.1"
import importlib.metadata as md
from packaging.requirements import Requirement
specs = [">=70.1"]
for line in md.requires("torch") or []:
    req = Requirement(line)
    if req.name == "setuptools" and (req.marker is None or req.marker.evaluate({"extra": ""})):
        specs += [str(s) for s in req.specifier]
print(",".join(specs))
PYEOF
)
if ! .venv/bin/python - "$setuptools_spec" <<'PYEOF' 2>/dev/null; then
import sys, importlib.metadata as md
from packaging.specifiers import SpecifierSet
sys.exit(0 if md.version("setuptools") in SpecifierSet(sys.argv[1]) else 1)
PYEOF
  .venv/bin/python -m pip install -q --disable-pip-version-check --retries 0 --timeout 15 "setuptools$setuptools_spec" >/dev/null 2>&1 \
    || echo "[setup] note: no setuptools$setuptools_spec to be had (no package index?): training is unaffected, 'pip install .' without an index is not" >&2
fi
# Optional: W&B logging and the test runner. A GPU host without an index may have neither.
for entry in "${OPTIONAL[@]}"; do
  module=${entry%%:*}; package=${entry#*:}
  .venv/bin/python -c "import $module" 2>/dev/null && continue
  .venv/bin/python -m pip install -q --disable-pip-version-check --retries 0 --timeout 15 "$package" >/dev/null 2>&1
  if ! .venv/bin/python -c "import $module" 2>/dev/null; then  # not installed, or installed but unusable
    case $module in
      wandb) echo "[setup] wandb is not installed and cannot be installed here: W&B logging is off until 'pip install wandb' (training is unaffected)" >&2 ;;
      xdist) echo "[setup] pytest-xdist is not installed and cannot be installed here: the test suite runs on one worker (slower)" >&2 ;;
      *) echo "[setup] $package is not installed and cannot be installed here: the test suite needs it ('pip install $package')" >&2 ;;
    esac
  fi
done
# The project itself as a path entry, and its console commands (dist-cifar-train, ...) as small
# launchers in .venv/bin, as `pip install -e .` would make them: no build backend, no index needed.
# A torch reused from the host has its torchrun outside .venv: .venv gets one of its own.
echo "$PWD" > "$site/_dist_cifar_repo.pth"
.venv/bin/python - <<'PYEOF'
import os, sys, tomllib
from pathlib import Path
scripts = tomllib.loads(Path("pyproject.toml").read_text())["project"]["scripts"]
if not Path(".venv/bin/torchrun").exists():
    scripts["torchrun"] = "torch.distributed.run:main"
for name, target in scripts.items():
    module, func = target.split(":")
    script = Path(".venv/bin") / name
    script.write_text(f"#!{Path(sys.executable).absolute()}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
    os.chmod(script, 0o755)
PYEOF
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  if ! .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "[setup] error: nvidia-smi lists GPUs but torch $(.venv/bin/python -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)') sees none: install a torch build for this driver into $PY (or PYTHON=...), then rerun" >&2
    exit 1
  fi
fi
.venv/bin/python -c "import torch, dist_cifar" >/dev/null
rm -f .venv/.dist_cifar-*
touch "$stamp"
