#!/usr/bin/env bash
# The main job on the embedded default dataset (scikit-learn digits), set-up included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
D3FAST=.venv/bin/d3fast
"$D3FAST" prepare --dataset digits
"$D3FAST" experts --dataset digits
