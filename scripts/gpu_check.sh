#!/usr/bin/env bash
# The GPU check at real size (see scripts/gpu_check.py): one command, a JSON report and a table.
#
#     scripts/gpu_check.sh                 # on a CUDA machine (bf16 rows sized for 8 min on one H100; nf4/int8 add 6 loads; not yet run)
#     scripts/gpu_check.sh --dry-run       # anywhere: every budget's plan and prediction (runs in CI)
#     scripts/gpu_check.sh --quantization none   # bf16 rows only (default none,nf4,int8; nf4/int8 need bitsandbytes)
#
# Where the Python at hand lacks transformers 5.24, the wheels that scripts/fetch_gpu_wheels.sh put in
# .gpu-wheels/ are installed into .gpu-site/ (never into that Python) and put first on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
has_runtime() { "$PYTHON" -c "import transformers, accelerate, pydantic_settings, qwen_omni_utils, torchvision, sys; sys.exit(transformers.__version__ != '5.24.0')" 2>/dev/null; }
if ! has_runtime && [ -d .gpu-wheels ]; then
  if [ ! -d .gpu-site ]; then
    wheels=()
    for wheel in .gpu-wheels/*.whl; do
      # The machine's own torchvision matches its torch; ours is built for torch 2.11.
      if [[ "$(basename "$wheel")" == torchvision-* ]] && "$PYTHON" -c "import torchvision" 2>/dev/null; then continue; fi
      wheels+=("$wheel")
    done
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target .gpu-site "${wheels[@]}"
  fi
  export PYTHONPATH="$PWD/.gpu-site${PYTHONPATH:+:$PYTHONPATH}"
fi
OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" exec "$PYTHON" scripts/gpu_check.py "$@"
