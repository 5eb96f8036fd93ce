#!/usr/bin/env bash
# The test suite, set-up included: lint (ruff) and types (mypy on d3fast/, kernels
# included), then the tests twice: with the C++ extension, then with D3FAST_PUREPYTHON=1
# (the pure-PyTorch fallbacks everywhere, slow end-to-end runs left out).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python -m pytest tests/ -q "$@"
D3FAST_PUREPYTHON=1 .venv/bin/python -m pytest tests/ -q -m "not slow" "$@"
