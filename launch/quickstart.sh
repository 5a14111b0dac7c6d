#!/usr/bin/env bash
# Train the default GAN (an MLP on the bundled 8x8 digits) and show where the results are.
#   bash launch/quickstart.sh [key=value overrides...]
# Re-running replaces runs/default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
if [ ! -f data/digits/index.json ]; then
  .venv/bin/gan-dist prepare digits --out data/digits
fi
.venv/bin/python train.py --config configs/default.yaml run.overwrite=true "$@"
echo
echo "Are the digits recognisable? (a classifier fitted on the real digits labels 4,096 samples)"
.venv/bin/python bench/digits_quality.py --run runs/default || true
echo
echo "Next:"
echo "  plot the run:  .venv/bin/gan-dist plot --run runs/default    (writes runs/default/plot.png)"
echo "  TensorBoard:   add log.tensorboard=true to a run, then .venv/bin/tensorboard --logdir runs/NAME"
echo "  your images:   README.md, 'Train on your own images'; more GPUs or nodes: README.md, 'Training'"
