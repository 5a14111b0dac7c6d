#!/usr/bin/env bash
# Here, before borrowing a GPU: download into .whl/ the pure-Python wheels that bench/gpu.sh
# needs and the GPU machine's image lacks (it has torch, accelerate, rich, safetensors, numpy,
# scikit-learn, tensorboard; not omegaconf, webdataset, braceexpand, torch-fidelity), at the
# versions this .venv runs. Then carry .whl with the run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
packages=()
for name in omegaconf webdataset braceexpand torch-fidelity; do
  packages+=("$name==$("$python" -m pip show "$name" | sed -n 's/^Version: //p')")
done
rm -rf "$here/.whl"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$here/.whl" "${packages[@]}"
ls -l "$here/.whl"
