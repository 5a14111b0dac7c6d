#!/usr/bin/env bash
# The GPU benchmark in one prepared run (bench/gpu.py): DCGAN-64 and ResNet-32 at batch 256 in
# fp32, bf16 and bf16+channels_last+compile, plus the hand-written loop; rows print as they
# finish and the table goes to bench/results/gpu.md. Sized to finish within 4 minutes on one
# GPU, so a 15-minute loan covers start-up and a rerun.
#
#   bash bench/gpu.sh              on a machine with one CUDA GPU
#   bash bench/gpu.sh --dry-run    on a CPU: builds and checks every configuration, no timing
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
cd "$here"
exec timeout 240 "$python" bench/gpu.py "$@"
