#!/usr/bin/env bash
# Installs everything d3fast needs into .venv/ at the repository root. Idempotent: a
# second run only checks (it reinstalls when pyproject.toml, setup.py or csrc/ change).
#   - Debian packages, when run as root with apt-get: dataset-fashion-mnist (real data)
#     and what FFCV builds against (pkg-config, libturbojpeg0-dev, libopencv-dev)
#   - the CPU build torch==2.13.0 when no NVIDIA GPU is present (a plain `torch`
#     requirement would pull a multi-GB CUDA build)
#   - d3fast itself, editable, with the C++ extension d3fast._C, the dev extras and FFCV
#     (without FFCV when it cannot build: d3fast then streams from its uint8 cache)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEB_PACKAGES=(dataset-fashion-mnist pkg-config libturbojpeg0-dev libopencv-dev)

missing=()
if command -v dpkg >/dev/null 2>&1; then
  for p in "${DEB_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
fi
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "bootstrap: warning: missing Debian packages ${missing[*]} (need root + apt-get); continuing" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python

stamp=$(cat pyproject.toml setup.py csrc/* | sha256sum | cut -c1-16)
if [ -f .venv/.d3fast-stamp ] && [ "$(cat .venv/.d3fast-stamp)" = "$stamp" ] \
   && "$PY" -c "import d3fast, torch" >/dev/null 2>&1; then
  exit 0
fi

"$PY" -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # no GPU: the CPU wheel (on this machine kind it is served from local disk)
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q "setuptools>=77" wheel "pybind11>=2.12"
# no build isolation: the build needs only setuptools + pybind11, installed just above
if ! "$PY" -m pip install -q --no-build-isolation -e ".[dev,ffcv]"; then
  echo "bootstrap: warning: FFCV did not install (needs pkg-config libturbojpeg0-dev libopencv-dev);" \
       "continuing without it" >&2
  "$PY" -m pip install -q --no-build-isolation -e ".[dev]"
fi
echo "$stamp" > .venv/.d3fast-stamp
echo "bootstrap: ready ($("$PY" -c 'import torch, d3fast; print("d3fast", d3fast.__version__, "torch", torch.__version__)'))"
