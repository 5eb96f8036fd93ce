#!/usr/bin/env bash
# The test suite, set-up included: lint (ruff) and types (mypy on d3fast/, kernels
# included), then the tests twice, each pass under other CPU kernels of torch's libraries
# (their summation orders differ as another CPU's would, so a test that holds only for one
# CPU's rounding fails here, not on the next machine):
#   1. with the C++ extension, under this CPU's own kernels (or ATEN_CPU_CAPABILITY when set);
#   2. with D3FAST_PUREPYTHON=1 (the pure-PyTorch fallbacks everywhere, slow end-to-end runs
#      left out), under the oldest x86-64 kernels of each library: ATen `default` (scalar),
#      oneDNN's SSE4.1 convolutions, MKL's SSE4.2 matrix products (ATen `avx2` instead when
#      pass 1 already ran `default`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/mypy
first=$(.venv/bin/python -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())")
if [ "$first" = default ]; then
  second=(ATEN_CPU_CAPABILITY=avx2)
else
  second=(ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2)
fi
echo "tests: pass 1 under ATen CPU capability $first; pass 2 (D3FAST_PUREPYTHON=1) under ${second[*]}"
.venv/bin/python -m pytest tests/ -q "$@"
# pass 2 compiles in its own Inductor cache: with another ATEN_CPU_CAPABILITY, kernels cached by
# pass 1 fail to build against the other ISA's headers (torch 2.13: "at::vec has not been declared")
env D3FAST_PUREPYTHON=1 "${second[@]}" TORCHINDUCTOR_CACHE_DIR="${TMPDIR:-/tmp}/torchinductor_$(id -u)_${second[0]#ATEN_CPU_CAPABILITY=}" \
  .venv/bin/python -m pytest tests/ -q -m "not slow" "$@"
