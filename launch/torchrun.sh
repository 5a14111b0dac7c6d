#!/usr/bin/env bash
# torchrun for one node or several: the same train.py, with the same config, everywhere.
#
# One node (one process per GPU; one process on a machine without GPUs):
#   bash launch/torchrun.sh --config configs/default.yaml run.name=mine
# Two processes on a CPU (gloo):
#   NPROC_PER_NODE=2 bash launch/torchrun.sh --config configs/tiny.yaml
# Several nodes: run on every node, each with its NODE_RANK and the head node's address:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=head-node MASTER_PORT=29500 bash launch/torchrun.sh --config ...
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=head-node MASTER_PORT=29500 bash launch/torchrun.sh --config ...
# or, with c10d rendezvous (no node ranks), the same command on every node:
#   NNODES=2 RDZV_ENDPOINT=head-node:29500 RDZV_ID=myjob bash launch/torchrun.sh --config ...
#
# PYTHON picks the interpreter (default: the project's .venv if there is one).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python}"
if [[ -z "${PYTHON:-}" && -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; fi
nproc="${NPROC_PER_NODE:-$("$python" -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
# Forward SIGUSR1 too (SLURM's preemption warning) and give the ranks time to checkpoint
# before torchrun's SIGKILL.
signals=(--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT_S:-120}")
# DRY_RUN=1 prints the command instead of running it (slurm/train.sh --dry-run uses it).
source "$here/launch/lib.sh"
torchrun=("$python" -m torch.distributed.run "${signals[@]}" --nproc_per_node "$nproc")
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  # c10d rendezvous (slurm/train.sh): every node runs the same command and gets its rank at
  # the rendezvous, so nothing per node has to be computed or kept in step.
  exec_or_print "${torchrun[@]}" --nnodes "${NNODES:-1}" --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" \
    --rdzv_id "${RDZV_ID:-gan_dist}" "$here/train.py" "$@"
elif [[ "${NNODES:-1}" == 1 && -z "${MASTER_PORT:-}" ]]; then
  # One node: torchrun picks a free port, so two runs on one machine do not collide.
  exec_or_print "${torchrun[@]}" --standalone "$here/train.py" "$@"
else
  exec_or_print "${torchrun[@]}" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" "$here/train.py" "$@"
fi
