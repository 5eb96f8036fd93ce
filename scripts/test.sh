#!/usr/bin/env bash
# The test suite, set-up included. Runs twice: with the C++ extension, then with
# D3FAST_PUREPYTHON=1 for the extension-dependent tests (the pure-PyTorch fallbacks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/python -m pytest tests/ -q "$@"
D3FAST_PUREPYTHON=1 .venv/bin/python -m pytest tests/ -q -m purepython "$@"
