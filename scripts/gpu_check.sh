#!/usr/bin/env bash
# The GPU check in one command (scripts/gpu_check.py says what it runs and writes):
#   scripts/gpu_check.sh --out DIR            on a CUDA machine, no network needed (< 8 min on an H200)
#   scripts/gpu_check.sh --out DIR --quick    setup, CUDA tests and the profile only (< 3 min)
#   scripts/gpu_check.sh --cpu --out DIR      the same driver on the CPU at tiny sizes
# On a GPU machine it runs with the python3 that holds torch (PYTHON overrides it); here,
# with --cpu, with .venv's when there is one.
# A relative --out is taken from where the command is run.
# Provenance: without .git (a copied tree) pass GPU_CHECK_COMMIT=<hash>.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY=${PYTHON:-python3}
if [[ " $* " == *" --cpu "* && -z "${PYTHON:-}" && -x "$ROOT/.venv/bin/python" ]]; then
  PY="$ROOT/.venv/bin/python"
fi
export PYTHONUNBUFFERED=1
exec "$PY" "$ROOT/scripts/gpu_check.py" "$@"
