#!/usr/bin/env bash
# GPU acceptance check in one command (logic and row list: scripts/gpu_check.py):
#   bash scripts/gpu_check.sh [--out FILE.json] [--only ROWS] [--checkpoint DIR]   # a CUDA machine, ~8 minutes
#   bash scripts/gpu_check.sh --cpu-dry-run --out FILE.json                         # same rows, tiny model, CPU
# Runs the gpu-marked tests (pytest -m gpu, the first row), writes a random 2B turbo checkpoint, then measures short
# LoRA / full training runs; prints a Markdown table and writes the JSON. GPU_CHECK_BUDGET_S (default 480) is the
# wall-time budget on CUDA: rows that no longer fit are skipped with a note, and a hard stop 60 s past it ends the
# run with the table of what finished. Python: GPU_CHECK_PYTHON when set (an environment that already has
# acestep-ft and a CUDA build of torch), else .venv as scripts/run.sh makes it (created on first use; on a CUDA
# machine install the CUDA build of torch into .venv first, see README).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
py="${GPU_CHECK_PYTHON:-.venv/bin/python}"
if [ -z "${GPU_CHECK_PYTHON:-}" ] && [ ! -x .venv/bin/python ]; then
    bash scripts/run.sh test --version >/dev/null  # creates .venv and installs acestep-ft into it
fi
export WANDB_MODE=offline HYDRA_FULL_ERROR=1 PYTHONUNBUFFERED=1
budget="${GPU_CHECK_BUDGET_S:-480}"
for arg in "$@"; do
    if [ "$arg" = "--cpu-dry-run" ]; then
        exec "$py" scripts/gpu_check.py "$@"
    fi
done
# the hard stop sends SIGTERM: the check finishes its table and JSON with the rows done (exit 124)
exec timeout --signal=TERM --kill-after=30 "$((budget + 60))" \
    "$py" scripts/gpu_check.py --deadline "$((start + budget))" --budget-s "$budget" "$@"
