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
exec .venv/bin/python -m pytest -n "$workers" --dist loadfile "$@"
