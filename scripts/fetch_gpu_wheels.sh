#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh needs on a GPU machine that has Python 3.12 with torch 2.11 and an
# older transformers, and no package registry: downloaded here into .gpu-wheels/ (ignored by git),
# to travel with the working tree (keep both under 64 MiB). gpu_check.sh installs them into
# .gpu-site/ (not into the machine's Python) and puts that first on PYTHONPATH.
#
#     scripts/fetch_gpu_wheels.sh           # then carry .gpu-wheels with the tree
#
# Not bitsandbytes (QUANTIZATION nf4/int8): its wheel (~125 MB, every CUDA/ROCm/XPU library) is over
# the limit. Without it the check's quantized rows each say they were skipped and why; to measure
# them, install bitsandbytes==0.50.2 on the GPU machine (or copy its wheel there separately).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu-wheels
PYTHON=${PYTHON:-.venv/bin/python}
rm -rf "$DEST" && mkdir -p "$DEST"
# The runtime the engine imports (requirements_multimodal.txt's pins where it has them), its
# dependencies that an older transformers stack may lack, and torchvision built for torch 2.11.
# No av or librosa: the check makes its media in numpy/PIL and stands in for those two imports.
WHEELS=(
  transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 huggingface_hub==2.4.0 hf-xet==1.8.0
  httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 h11==0.16.0 anyio==4.16.0 idna==3.20
  regex==2026.11.19 filelock==4.3.1 fsspec==2026.9.0 pyyaml==6.0.4 tqdm==4.70.1 packaging==26.4
  click==8.5.1 typer==0.29.2 accelerate==1.15.0 psutil==7.2.2 qwen-omni-utils==0.0.9 pillow==13.0.0
  torchvision==0.26.0 requests==2.34.2 urllib3==2.8.0 certifi==2026.10.19.post1 charset-normalizer==3.5.3
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
)
"$PYTHON" -m pip download --quiet --dest "$DEST" --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform linux_x86_64 --platform any "${WHEELS[@]}"
du -sh "$DEST"
ls "$DEST"
