#!/usr/bin/env bash
# The GPU check (bench/gpu.py) as one command for a bare GPU machine, within 4 minutes:
# correctness first (host syncs per step in bf16 and fp16, fused Adam's found_inf, a CPU
# checkpoint resumed on the GPU, the real loader), speed last (DCGAN-64 and ResNet-32 in
# fp32, bf16 and bf16 + channels_last + compile). Rows print as each check ends; the log and
# the tables go to OUT (default bench/results/gpu): OUT/log and OUT/gpu.md, nothing else.
#
#   bash bench/gpu.sh [--out DIR]              on a machine with one CUDA GPU
#   bash bench/gpu.sh --dry-run [--out DIR]    on a CPU: every check at toy sizes, no timing
#
# On a bare machine (no .venv, packages missing): first, here, `bash bench/gpu_wheels.sh`
# downloads the pure-Python wheels it lacks into .whl/ (ignored by git); carry .whl and this
# script installs them into /tmp/gan_dist-site. gan_dist itself is put on PYTHONPATH.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$here/bench/results/gpu"
args=()
while (($#)); do
  case "$1" in
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
mkdir -p "$out"
python="${PYTHON:-}"
[[ -n "$python" ]] || { [[ -x "$here/.venv/bin/python" ]] && python="$here/.venv/bin/python"; } || python=python3
export PYTHONUNBUFFERED=1
{
  need='import omegaconf, webdataset, braceexpand, torch_fidelity, accelerate, rich, safetensors'
  if ! "$python" -c "$need" 2>/dev/null; then
    [[ -d "$here/.whl" ]] || { echo "bench/gpu.sh: $python lacks packages and no .whl/ was carried (bash bench/gpu_wheels.sh)"; exit 2; }
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gan_dist-site "$here"/.whl/*.whl
    export PYTHONPATH="/tmp/gan_dist-site${PYTHONPATH:+:$PYTHONPATH}"
    "$python" -c "$need"
  fi
  export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
  cd "$here"
  timeout -k 5 230 "$python" bench/gpu.py --out "$out" "${args[@]}"
} 2>&1 | tee "$out/log"
