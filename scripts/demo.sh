#!/usr/bin/env bash
# The main job on the embedded default dataset (scikit-learn digits), set-up included:
# prepare -> expert trajectories -> distillation -> evaluation against random-real baselines.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/d3fast distill --dataset digits --evaluate
