#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for trying slurm/train.sh and for the tests.
#
#   bash slurm/local_cluster.sh install    # the Debian packages only (root; start does it too)
#   bash slurm/local_cluster.sh start [--gpus N] [--cpus N] [--no-install]
#   eval "$(bash slurm/local_cluster.sh env)"     # SLURM_CONF for sbatch/squeue/scancel
#   sbatch --wait --gpus-per-node=0 --cpus-per-task=2 slurm/train.sh configs/tiny.yaml
#   bash slurm/local_cluster.sh status
#   bash slurm/local_cluster.sh stop [--keep]     # --keep: leave LOCAL_SLURM_DIR (the logs) behind
#
# Everything (keys, sockets, state, logs, pid files) lives in LOCAL_SLURM_DIR (default
# /tmp/gan_dist-slurm-$UID), which stop removes; the machine's own /etc/slurm is not
# touched. munge, slurmctld and slurmd come from Debian packages: `start` installs them
# with apt-get when they are missing and this is root (--no-install forbids it). `--gpus N`
# declares N fake GPUs so --gpus-per-node directives run unchanged (jobs get
# CUDA_VISIBLE_DEVICES; the devices are /dev/null). `--cpus N` declares N CPUs whatever the
# machine has, so several small jobs can share a small machine. Daemons run as the calling
# user and are stopped by their pid files.
# Exit codes: 0 ok, 2 bad usage or a failed start, 3 SLURM missing and not installable here.
set -euo pipefail

dir="${LOCAL_SLURM_DIR:-${TMPDIR:-/tmp}/gan_dist-slurm-$(id -u)}"
conf="$dir/slurm.conf"
packages=(slurmctld slurmd slurm-client munge)
stamp=.gan_dist_local_cluster

die() { echo "local_cluster.sh: $1" >&2; exit "${2:-2}"; }

have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
  && command -v sbatch >/dev/null && command -v mungekey >/dev/null; }

install_slurm() {
  [[ "$(id -u)" == 0 ]] || die "SLURM is not installed and this is not root: run 'sudo apt-get install ${packages[*]}'" 3
  command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get: install ${packages[*]}" 3
  echo "local_cluster.sh: installing ${packages[*]} (Debian packages, about 20 s)"
  # Package scripts must not start the system-wide daemons: ours run from $dir.
  local policy=/usr/sbin/policy-rc.d added=""
  if [[ ! -e "$policy" ]]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; added=1; fi
  local rc=0
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${packages[@]}"; } >"${TMPDIR:-/tmp}/gan_dist-slurm-apt.log" 2>&1 || rc=$?
  [[ -n "$added" ]] && rm -f "$policy"
  [[ $rc == 0 ]] || die "apt-get failed (log: ${TMPDIR:-/tmp}/gan_dist-slurm-apt.log)" 3
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The pid in a pid file, only if that process is still the daemon we started.
live_pid() {
  local file="$1" name="$2" pid
  [[ -s "$file" ]] || return 1
  pid="$(tr -d '[:space:]' < "$file")"
  [[ -r "/proc/$pid/comm" && "$(cat "/proc/$pid/comm")" == "$name" ]] || return 1
  echo "$pid"
}

write_config() {
  local gpus="$1" cpus="$2" node hw user
  node="$(hostname -s)"
  hw="$(slurmd -C | sed -n 1p | sed -E 's/^NodeName=[^ ]+ //; s/ ?UpTime=.*//')"
  [[ -n "$cpus" ]] && hw="$(sed -E "s/CPUs=[0-9]+/CPUs=$cpus/; s/ (Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+//g" <<<"$hw")"
  user="$(id -un)"
  local gres_node="" gres_types=""
  if (( gpus > 0 )); then
    gres_types="GresTypes=gpu"
    gres_node="Gres=gpu:$gpus"
    : > "$dir/gres.conf"
    echo "AutoDetect=off" >> "$dir/gres.conf"
    for ((i = 0; i < gpus; i++)); do
      # slurmd wants device files, not regular files: links to /dev/null will do.
      ln -sf /dev/null "$dir/fake-gpu$i"
      echo "NodeName=$node Name=gpu File=$dir/fake-gpu$i" >> "$dir/gres.conf"
    done
  fi
  # EnforcePartLimits=ALL: sbatch refuses a job that asks for more CPUs or nodes than the
  # partition has, where the default (NO) queues it forever with reason PartitionConfig, as
  # slurm/train.sh's defaults (8 GPUs, 32 CPUs) would be on a small machine.
  cat > "$conf" <<EOF
ClusterName=gan_dist_local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.socket,cred_expire=10
SlurmUser=$user
SlurmdUser=$user
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MailProg=/bin/true
SchedulerParameters=sched_interval=2,bf_interval=2
EnforcePartLimits=ALL
MinJobAge=5
ReturnToService=2
$gres_types
NodeName=$node NodeAddr=127.0.0.1 $hw $gres_node State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  local gpus=0 cpus="" install=1
  while (($#)); do
    case "$1" in
      --gpus) gpus="${2:?--gpus needs a count}"; shift 2 ;;
      --cpus) cpus="${2:?--cpus needs a count}"; shift 2 ;;
      --no-install) install=""; shift ;;
      *) die "unknown option '$1' for start (known: --gpus N, --cpus N, --no-install)" ;;
    esac
  done
  [[ "$gpus" =~ ^[0-9]+$ ]] || die "--gpus takes a whole number, not '$gpus'"
  [[ -z "$cpus" || "$cpus" =~ ^[1-9][0-9]*$ ]] || die "--cpus takes a positive whole number, not '$cpus'"
  if ! have_slurm; then
    [[ -n "$install" ]] || die "SLURM is not installed (packages: ${packages[*]}) and --no-install was given" 3
    install_slurm
  fi
  if live_pid "$dir/slurmctld.pid" slurmctld >/dev/null; then
    die "a local cluster already runs from $dir: 'bash slurm/local_cluster.sh stop' first"
  fi
  # Only a directory we made is ever emptied: LOCAL_SLURM_DIR could name anything.
  if [[ -d "$dir" && -n "$(ls -A "$dir")" && ! -f "$dir/$stamp" ]]; then
    die "$dir is not empty and was not made by local_cluster.sh; set LOCAL_SLURM_DIR to a new directory"
  fi
  # What an earlier start left goes; files of others in a kept directory stay.
  [[ -f "$dir/$stamp" ]] && clean_ours
  mkdir -p "$dir/state" "$dir/spool"
  touch "$dir/$stamp"
  mungekey --create --keyfile="$dir/munge.key" --force
  munged --key-file="$dir/munge.key" --socket="$dir/munge.socket" --pid-file="$dir/munged.pid" \
    --log-file="$dir/munged.log" --seed-file="$dir/munge.seed" --force
  munge -S "$dir/munge.socket" -n | unmunge -S "$dir/munge.socket" >/dev/null \
    || die "munged did not start (log: $dir/munged.log)"
  write_config "$gpus" "$cpus"
  export SLURM_CONF="$conf"
  slurmctld -f "$conf" || die "slurmctld did not start (log: $dir/slurmctld.log)"
  slurmd -f "$conf" || die "slurmd did not start (log: $dir/slurmd.log)"
  local state=""
  for _ in $(seq 100); do
    state="$(sinfo -h -N -o %T 2>/dev/null || true)"
    [[ "$state" == idle ]] && break
    sleep 0.2
  done
  [[ "$state" == idle ]] || die "the node did not become idle (state '$state'; logs: $dir/slurmctld.log, $dir/slurmd.log)"
  echo "local_cluster.sh: one-node cluster up ($(sinfo -h -N -o '%N, %c CPUs, gres %G')) in $dir"
  echo "  use it with:  export SLURM_CONF=$conf"
}

# What start creates in $dir, and nothing else: a file someone put there (a job log written
# with --output=$dir/...) keeps the directory, with a message.
created=(slurm.conf gres.conf munge.key munge.socket munge.socket.lock munge.seed munged.log munged.pid
  slurmctld.log slurmctld.pid slurmd.log slurmd.pid)

clean_ours() {
  rm -rf "${dir:?}/state" "${dir:?}/spool"
  rm -f "${created[@]/#/$dir/}" "$dir"/fake-gpu*
}

remove_dir() {
  [[ -f "$dir/$stamp" ]] || return 0  # not made by start (or gone already): not ours to remove
  local name
  for name in slurmd slurmctld munged; do
    live_pid "$dir/$name.pid" "$name" >/dev/null && die "$name still runs; $dir is left as it is"
  done
  clean_ours
  # The stamp goes last, and only with the directory: a kept one stays ours, so start reuses it.
  if [[ -z "$(ls -A "$dir" | grep -vx "$stamp")" ]]; then
    rm -f "$dir/$stamp" && rmdir "$dir" && echo "local_cluster.sh: removed $dir"
  else
    echo "local_cluster.sh: removed the cluster's files from $dir; kept the directory, which holds others:" \
      "$(ls -A "$dir" | grep -vx "$stamp" | paste -sd ' ' -)"
  fi
}

stop() {
  local keep=""
  while (($#)); do
    case "$1" in
      --keep) keep=1; shift ;;
      *) die "unknown option '$1' for stop (known: --keep)" ;;
    esac
  done
  local name pid stopped=()
  # Jobs first: their processes would outlive the daemons and keep the cores busy.
  if live_pid "$dir/slurmctld.pid" slurmctld >/dev/null; then
    export SLURM_CONF="$conf"
    local jobs
    jobs="$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')"
    if [[ -n "${jobs// /}" ]]; then
      # shellcheck disable=SC2086
      scancel --full --signal=KILL $jobs 2>/dev/null
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null
      for _ in $(seq 100); do [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break; sleep 0.2; done
      echo "local_cluster.sh: cancelled job(s) $jobs"
    fi
  fi
  for name in slurmd slurmctld munged; do
    if pid="$(live_pid "$dir/$name.pid" "$name")"; then
      kill -TERM "$pid"
      for _ in $(seq 100); do [[ -d "/proc/$pid" ]] || break; sleep 0.1; done
      [[ -d "/proc/$pid" ]] && kill -KILL "$pid"
      stopped+=("$name")
    fi
  done
  echo "local_cluster.sh: stopped ${stopped[*]:-nothing (no daemon of ours was running)}"
  if [[ -n "$keep" ]]; then echo "local_cluster.sh: kept $dir (--keep)"; else remove_dir; fi
}

status() {
  local name pid running=1
  for name in munged slurmctld slurmd; do
    if pid="$(live_pid "$dir/$name.pid" "$name")"; then echo "$name: running (pid $pid)"
    else echo "$name: not running"; running=""; fi
  done
  if [[ -n "$running" ]]; then
    SLURM_CONF="$conf" sinfo -N -o '%N %T %c %G'
    echo "export SLURM_CONF=$conf"
  fi
  [[ -n "$running" ]]
}

case "${1:-}" in
  install) if have_slurm; then echo "local_cluster.sh: SLURM and munge are installed"; else install_slurm; fi ;;
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  status) status ;;
  env) [[ -f "$conf" ]] || die "no local cluster in $dir: start one first"; echo "export SLURM_CONF=$conf" ;;
  *) die "usage: local_cluster.sh install | start [--gpus N] [--cpus N] [--no-install] | stop [--keep] | status | env" ;;
esac
