#!/usr/bin/env bash
# The test suite, set-up included: lint (ruff) and types (mypy on d3fast/, kernels
# included), then the tests twice, each pass under another of torch's CPU kernel sets
# (ATEN_CPU_CAPABILITY: their summation orders differ as another CPU's would, so a test that
# holds only for one CPU's rounding fails here, not on the next machine):
#   1. with the C++ extension, under this CPU's own kernels (or ATEN_CPU_CAPABILITY when set);
#   2. with D3FAST_PUREPYTHON=1 (the pure-PyTorch fallbacks everywhere, slow end-to-end runs
#      left out), under `default` (the scalar kernels), or `avx2` when pass 1 was `default`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/mypy
capability() { .venv/bin/python -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"; }
first=$(capability)
second=default
[ "$first" = default ] && second=avx2
echo "tests: pass 1 under ATen CPU capability $first, pass 2 (D3FAST_PUREPYTHON=1) under $second"
.venv/bin/python -m pytest tests/ -q "$@"
D3FAST_PUREPYTHON=1 ATEN_CPU_CAPABILITY=$second .venv/bin/python -m pytest tests/ -q -m "not slow" "$@"
