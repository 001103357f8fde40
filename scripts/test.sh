#!/usr/bin/env bash
# Install what the tests need, then run them all (the tiny model is built by the tests themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh requirements-dev.txt
export OMP_NUM_THREADS=1  # torch's thread pool busy-waits on small machines
exec .venv/bin/python -m pytest "$@"
