#!/usr/bin/env bash
# Run the test suite (sets up .venv first if needed).
#   bash launch/test.sh [pytest options]      e.g.  -m "not launch"  to skip multi-process launches
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/python -m pytest "$@"
