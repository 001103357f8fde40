#!/usr/bin/env bash
# On a CUDA machine: the tiny model in low-VRAM float16 against all-CPU float32 (see gpu_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh requirements-dev.txt
OMP_NUM_THREADS=1 exec .venv/bin/python scripts/gpu_check.py
