#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install a requirements file into it.
# Usage: scripts/setup_env.sh REQUIREMENTS [VENV_DIR]   (VENV_DIR defaults to .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
requirements="${1:-requirements_multimodal.txt}"
venv="${2:-.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
stamp="$venv/.installed-$(basename "$requirements")"
if [ ! -f "$stamp" ] || [ "$requirements" -nt "$stamp" ] || [ requirements_multimodal.txt -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  touch "$stamp"
fi
