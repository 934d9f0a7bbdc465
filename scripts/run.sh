#!/usr/bin/env bash
# One entry for both README commands: creates .venv on first use, installs acestep-ft into it, then runs
#   bash scripts/run.sh train [hydra overrides...]   -> python train.py ...
#   bash scripts/run.sh test  [pytest args...]       -> python -m pytest ...
# TORCH_SPEC picks the torch build to install when .venv has none (default torch==2.13.0; on a CUDA machine
# install your CUDA build into .venv first, or set TORCH_SPEC, see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
stamp=.venv/.acestep-ft-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    if ! .venv/bin/python -c "import torch" 2>/dev/null; then
        echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0}"
        .venv/bin/python -m pip install --quiet --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
    fi
    echo "[setup] installing acestep-ft and its dependencies into .venv"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
    touch "$stamp"
fi
cmd="${1:-}"; shift || true
case "$cmd" in
    train) exec .venv/bin/python train.py "$@" ;;
    test)  exec .venv/bin/python -m pytest "$@" ;;
    *) echo "usage: bash scripts/run.sh train|test [args...]" >&2; exit 2 ;;
esac
