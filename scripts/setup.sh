#!/usr/bin/env bash
# Sets up .venv with optstudy and its test dependencies. Idempotent: re-running only installs what is missing.
#
# torch is installed first, pinned to 2.13.0, unless the venv already has a torch: a looser requirement would pull
# the registry's newest build (several GB of CUDA packages) where 2.13.0 resolves to a local CPU wheel. On a GPU
# machine, install the torch build you want into .venv first and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
say() { echo "setup: $*" >&2; }
[ -x .venv/bin/python ] || { say "creating .venv"; "$PYTHON" -m venv .venv; }
say "upgrading pip"
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  say "installing torch 2.13.0 (CPU wheel; about a minute)"
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
fi
say "installing optstudy and its dependencies (Lightning, Hydra, Optuna, MLflow; about a minute the first time)"
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, optstudy; print(f'optstudy {optstudy.__version__} ready: torch {torch.__version__}')"
