#!/usr/bin/env bash
# One node's launcher inside a SLURM job: slurm/train.sh starts this once per node with srun
# and passes everything through the environment (LAUNCHER, NNODES, NPROC_PER_NODE,
# MASTER_ADDR, MASTER_PORT, RDZV_ID, PYTHON, SHUTDOWN_TIMEOUT_S). Not meant to be run by hand.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/launch/lib.sh"
: "${NNODES:?}" "${NPROC_PER_NODE:?}" "${MASTER_ADDR:?}" "${MASTER_PORT:?}"
case "${LAUNCHER:-torchrun}" in
  torchrun)
    RDZV_ENDPOINT="$MASTER_ADDR:$MASTER_PORT" exec bash "$here/launch/torchrun.sh" "$@" ;;
  accelerate)
    # accelerate launch reads torchrun's signal and shutdown settings from the environment
    # only: without them SIGUSR1 would kill it instead of reaching the ranks.
    export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT_S:-120}"
    exec_or_print "${PYTHON:-python}" -m accelerate.commands.launch \
      --config_file "${ACCELERATE_CONFIG:-$here/launch/accelerate/multi-node.yaml}" \
      --num_machines "$NNODES" --num_processes "$((NNODES * NPROC_PER_NODE))" --machine_rank "${SLURM_NODEID:-0}" \
      --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" "$here/train.py" "$@" ;;
  *)
    echo "slurm/node.sh: LAUNCHER must be torchrun or accelerate, not '$LAUNCHER'" >&2; exit 2 ;;
esac
