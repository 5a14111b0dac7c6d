#!/usr/bin/env bash
# Run the test suite (sets up .venv first if needed).
#   bash launch/test.sh [pytest options]      e.g.  -m "not launch"  to skip multi-process launches
# Test files run in TEST_WORKERS processes (default 2; 0 runs everything in this process):
# one worker keeps a core busy while the other waits on a launcher or the SLURM scheduler.
# A file's tests stay in one worker, so its module fixtures (the SLURM cluster, the
# 2-process harness) are set up once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
workers=${TEST_WORKERS:-2}
if [ "$workers" = 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
# Each worker gets its share of the cores: torch's default (all of them, in each worker)
# starves the other worker's 2-rank gloo tests, which wait on each other at every collective
# (with two threads a worker, the DeepSpeed harness took 168 s in the suite; alone, 28 s).
OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / workers > 0 ? $(nproc) / workers : 1 ))}
export OMP_NUM_THREADS
exec .venv/bin/python -m pytest -n "$workers" --dist loadfile "$@"
