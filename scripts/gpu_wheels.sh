#!/usr/bin/env bash
# Wheels the GPU machine lacks (no network there), downloaded here into .whl/ (git-ignored)
# for its Python 3.12 on manylinux x86_64; scripts/gpu_check.sh installs them from there.
# The GPU image has torch, triton, numpy, safetensors, pytest, pytest-benchmark, click,
# tqdm, scikit-learn, matplotlib, pillow and pybind11; d3fast needs kornia (ZCA) besides,
# and kornia needs kornia_rs. Versions: those of .venv when it has them, else these pins.
# ~7 MiB in all (the device machine takes 64 MiB of carried files).
set -euo pipefail
cd "$(dirname "$0")/.."
version() {  # the version .venv holds, else $2
  local v
  v=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null) || v=$2
  echo "$v"
}
mkdir -p .whl
rm -f .whl/kornia-*.whl .whl/kornia_rs-*.whl  # one version of each: two stop the install
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "kornia==$(version kornia 0.9.0)" "kornia_rs==$(version kornia_rs 0.2.0)"
ls -la .whl
