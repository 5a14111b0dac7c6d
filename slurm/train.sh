#!/usr/bin/env bash
# Train under SLURM, on one node or many: one launcher per node, one process per GPU.
#
#   sbatch [sbatch options] slurm/train.sh CONFIG [key=value ...]
#   sbatch --nodes=2 --gpus-per-node=8 --partition=gpu slurm/train.sh configs/dcgan_mnist32.yaml run.name=big
#   bash slurm/train.sh --dry-run CONFIG [key=value ...]    # print what the job would run
#
# Submit from the project root (or set GAN_DIST_ROOT); the job inherits your environment.
# The job log is <job name>-<job id>.out there (git ignores it); --output=DIR/%x-%j.out puts
# it in DIR instead, which must exist: sbatch does not create it, and the job fails unlogged.
# The options below are defaults: sbatch options on the command line replace them.
# Environment: LAUNCHER=torchrun|accelerate (default torchrun, c10d rendezvous),
# NPROC_PER_NODE (default: the GPUs allocated per node, or 1 without GPUs), MASTER_PORT
# (default: a free port on the head node), PYTHON, SHUTDOWN_TIMEOUT_S (default 120: time the
# ranks get to checkpoint after a signal), REQUEUE=0 (checkpoint and stop, never requeue).
#
# Preemption: SLURM sends SIGUSR1 120 s before the time limit (or `scancel --signal=USR1
# --batch JOB`); it is forwarded to every rank, which checkpoint and leave the REQUEUE marker
# in the run directory; this script then requeues the job, and the rerun resumes. A plain
# `scancel JOB` (SIGTERM) checkpoints and stops without requeueing. See docs/slurm.md.
# Ask for GPUs with --gpus-per-node (or --gres=gpu:N) and CPUs with --cpus-per-task: --gpus
# and --cpus-per-gpu clash with the defaults below.
#
#SBATCH --job-name=gan_dist
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail

die() { echo "slurm/train.sh: $1" >&2; exit "${2:-2}"; }

# sbatch runs a copy of this file from its spool directory, so find the project by name.
root="${GAN_DIST_ROOT:-}"
if [[ -z "$root" ]]; then
  for candidate in "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-.}"; do
    [[ -f "$candidate/train.py" && -f "$candidate/slurm/node.sh" ]] && { root="$(cd "$candidate" && pwd)"; break; }
  done
fi
[[ -n "$root" ]] || die "cannot find the gan_dist project: submit from its root directory or set GAN_DIST_ROOT"
source "$root/launch/lib.sh"
python="${PYTHON:-python3}"
[[ -z "${PYTHON:-}" && -x "$root/.venv/bin/python" ]] && python="$root/.venv/bin/python"
export PYTHON="$python"

signalled=""
trap 'signalled=USR1' USR1  # until the real handler below: the default action would kill the job
dry_run=""
[[ "${1:-}" == --dry-run ]] && { dry_run=1; shift; }
[[ "${1:-}" == -h || "${1:-}" == --help ]] && { sed -n '2,/^#SBATCH/p' "$root/slurm/train.sh" | sed '$d'; exit 0; }
(($#)) || die "usage: sbatch [sbatch options] slurm/train.sh CONFIG [key=value ...]"
config="$1"; shift
[[ -n "${SLURM_JOB_ID:-}" || -n "$dry_run" ]] || die "not inside a SLURM job: submit with 'sbatch slurm/train.sh $config ...' (or add --dry-run)"
launcher="${LAUNCHER:-torchrun}"
[[ "$launcher" == torchrun || "$launcher" == accelerate ]] || die "LAUNCHER must be torchrun or accelerate, not '$launcher'"

# The allocation: nodes, the head node, processes per node.
nnodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
command -v scontrol >/dev/null || die "scontrol not found: this needs SLURM's client commands on PATH"
# sed, not head: head would close the pipe early and pipefail would kill the script on large node lists.
[[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "SLURM_JOB_NODELIST is not set (for --dry-run, set it, e.g. SLURM_JOB_NODELIST='gpu[01-04]')"
master="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
[[ -n "$master" ]] || die "cannot read the head node from SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'"
# The job's own GPUs only: a CUDA_VISIBLE_DEVICES inherited from the submitting shell is not ours.
gpus="${SLURM_GPUS_ON_NODE:-}"
if [[ -z "$gpus" && -n "${SLURM_JOB_GPUS:-}" ]]; then gpus="$(tr ',' '\n' <<<"$SLURM_JOB_GPUS" | grep -c .)"; fi
nproc="${NPROC_PER_NODE:-${gpus:-0}}"
((nproc > 0)) || nproc=1  # no GPU allocated: one CPU process per node unless NPROC_PER_NODE says more
# The batch script runs on the head node, so a port free here is free where the rendezvous listens.
# Below the kernel's ephemeral range: a port the kernel hands out (bind to 0) can be handed out
# again to srun's own sockets in the moment before the rendezvous binds it.
port="${MASTER_PORT:-$("$python" "$root/slurm/free_port.py" "${SLURM_JOB_ID:-0}")}"
export LAUNCHER="$launcher" NNODES="$nnodes" NPROC_PER_NODE="$nproc" MASTER_ADDR="$master" MASTER_PORT="$port"
export RDZV_ID="gan_dist-${SLURM_JOB_ID:-dry-run}" GAN_DIST_ROOT="$root"
# srun no longer passes sbatch's --cpus-per-task on to its steps (SLURM 22.05+).
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"

echo "gan_dist slurm job ${SLURM_JOB_ID:-(dry run)}: SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}," \
  "$nnodes node(s) [${SLURM_JOB_NODELIST}], $nproc process(es) per node ($((nnodes * nproc)) in all," \
  "${gpus:-0} GPU(s) per node), launcher $launcher, master $master:$port, config $(quoted "$config" "$@")"

# A bad config fails the job now, with its one-line message here, not after N nodes started.
run_dir="$("$python" -m gan_dist.cli check --print-run-dir --world-size "$((nnodes * nproc))" "$config" "$@")" \
  || die "the config check failed (see above); nothing was launched" 2
step=(srun --nodes="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1 bash "$root/slurm/node.sh" --config "$config" "$@")
if [[ -n "$dry_run" ]]; then
  echo "run directory: $run_dir"
  echo "job step:      $(quoted "${step[@]}")"
  echo "on each node:  $(DRY_RUN=1 SLURM_NODEID=0 bash "$root/slurm/node.sh" --config "$config" "$@")"
  exit 0
fi

# The marker belongs to this attempt: one left by an earlier one must not requeue us.
rm -f "$run_dir/REQUEUE"
step_pid=""
traps=0
forward() {
  signalled="$1"
  traps=$((traps + 1))
  echo "slurm/train.sh: got SIG$1; forwarding it to the ranks, which checkpoint and stop"
  [[ -n "$step_pid" ]] && kill -s "$1" "$step_pid" 2>/dev/null
  return 0
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

requeue() {
  echo "slurm/train.sh: $1"
  if [[ "${REQUEUE:-1}" == 0 ]]; then
    echo "slurm/train.sh: REQUEUE=0, so not requeueing; submit the same command again to resume"
    exit 0
  fi
  # The requeue itself makes SLURM send SIGTERM to every process of the job, scontrol too:
  # scontrol ignores it, so it returns the requeue it made instead of dying half-way (143).
  (trap '' TERM; exec scontrol requeue "$SLURM_JOB_ID") \
    || die "scontrol requeue failed (was the job submitted with --no-requeue?); submit the same command again to resume" 1
  echo "slurm/train.sh: requeued job $SLURM_JOB_ID; it resumes from its latest checkpoint when it starts again"
  exit 0
}

case "$signalled" in  # a signal before anything started: nothing to save
  USR1) requeue "preempted (SIGUSR1) before the launchers started" ;;
  TERM) echo "slurm/train.sh: got SIGTERM before the launchers started; stopping"; exit 143 ;;
esac
# srun in the background: bash runs traps only between commands, and `wait` is one it can interrupt.
"${step[@]}" &
step_pid=$!
[[ -n "$signalled" ]] && kill -s "$signalled" "$step_pid" 2>/dev/null  # arrived while srun started
while :; do  # a trap interrupts `wait`; wait again for srun's own exit code (bash keeps it once reaped)
  seen=$traps
  rc=0
  wait "$step_pid" || rc=$?
  [[ $traps == "$seen" ]] && break
done

marker="$(cat "$run_dir/REQUEUE" 2>/dev/null)"
[[ -n "$marker" ]] && echo "slurm/train.sh: the run checkpointed and stopped: $marker" \
  "(a SignalException traceback above is how the launcher reports the forwarded signal)"
# SIGTERM is `scancel` (or a time limit without warning): stop, never requeue, or the job
# could not be cancelled. SIGUSR1 is the preemption warning: requeue, even if the ranks died
# before they could checkpoint (the run then resumes from its last periodic checkpoint).
if [[ "$signalled" == TERM || "$marker" == SIGTERM* ]]; then
  echo "slurm/train.sh: stopped by SIGTERM: not requeueing${marker:+; the same command resumes from the checkpoint}"
  exit "$rc"
fi
if [[ "$marker" == SIGUSR1* ]]; then
  requeue "preempted (SIGUSR1)"
elif [[ "$signalled" == USR1 && $rc != 0 ]]; then
  requeue "preempted (SIGUSR1), but the ranks left no checkpoint marker (exit code $rc): they had not started training"
fi
exit "$rc"
