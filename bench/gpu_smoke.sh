#!/usr/bin/env bash
# GPU smoke test: the default config and a DCGAN-64 config, 200 steps each, in bf16 and fp16
# (and DCGAN with SyncBatchNorm), printing img/s and skipped steps as each run finishes.
# Needs one CUDA GPU and the project's .venv (bash launch/setup.sh). Not yet timed on a GPU.
#
#   bash bench/gpu_smoke.sh [RUN_ROOT]        (default RUN_ROOT: runs/gpu_smoke)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
root="${1:-runs/gpu_smoke}"
"$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible")'

run() {  # name, then train.py arguments
  local name="$1"; shift
  local start=$SECONDS
  if ! "$@" run.root="$root" run.name="$name" run.overwrite=true train.max_steps=200 log.every_steps=50 \
      train.total_kimg=100000 > "$root-$name.log" 2>&1; then
    printf '| %-28s | FAILED after %3d s: see %s |\n' "$name" $((SECONDS - start)) "$root-$name.log"
    return
  fi
  "$python" - "$root/$name/metrics.jsonl" "$name" $((SECONDS - start)) <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
last, timed = records[-1], records[1:] or records
speed = sum(r["Speed/img_per_s"] for r in timed) / len(timed)
overflow = f'{last.get("Skipped/D_fp16_overflow", "-")}/{last.get("Skipped/G_fp16_overflow", "-")}'
print(f'| {sys.argv[2]:28s} | {speed:9,.0f} | {last["Skipped/D"]}/{last["Skipped/G"]:<3} | {overflow:9s} | '
      f'{last["Speed/data_wait_fraction"]:6.1%} | {last["Loss/D"]:8.3f} | {sys.argv[3]:>4} s |', flush=True)
PY
}

mkdir -p "$root"
"$python" -c 'import torch; print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")'
echo "| run                          |     img/s | skipped D/G | fp16 ovf D/G | data wait | Loss/D | wall |"
echo "|---|---|---|---|---|---|---|"
train=("$python" "$here/train.py")
dcgan64=(--config "$here/configs/dcgan_mnist32.yaml" data.dataset=digits data.resolution=64 model.conditional=false)
run default-bf16 "${train[@]}" --config "$here/configs/default.yaml" train.mixed_precision=bf16 train.num_threads=0
run default-fp16 "${train[@]}" --config "$here/configs/default.yaml" train.mixed_precision=fp16 train.num_threads=0
run dcgan64-bf16 "${train[@]}" "${dcgan64[@]}" train.mixed_precision=bf16 model.d_norm=batch
run dcgan64-fp16 "${train[@]}" "${dcgan64[@]}" train.mixed_precision=fp16 model.d_norm=batch
run dcgan64-bf16-syncbn "$python" -m torch.distributed.run --nproc_per_node 1 "$here/train.py" "${dcgan64[@]}" \
  train.mixed_precision=bf16 model.d_norm=batch model.sync_bn=true
