#!/usr/bin/env bash
# Install what the server needs, then start it.
# With MODEL_PATH set (environment or .env) it serves that checkpoint; without, it builds the tiny
# random test model and serves that, so a fresh machine with no network still gets a working server.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh requirements_multimodal.txt
model_path="${MODEL_PATH:-}"
if [ -z "$model_path" ] && [ -f .env ]; then
  model_path="$(sed -n 's/^[[:space:]]*MODEL_PATH[[:space:]]*=[[:space:]]*//p' .env | tail -n 1 | tr -d "\"'")"
fi
if [ -z "$model_path" ]; then
  tiny=".cache/tiny-qwen2.5-omni"
  if [ ! -f "$tiny/config.json" ]; then
    .venv/bin/python tests/tiny_model.py "$tiny" >/dev/null 2>&1
  fi
  echo "No MODEL_PATH set: serving the TINY RANDOM test model from $tiny. Its answers are random." >&2
  echo "Set MODEL_PATH (e.g. Qwen/Qwen2.5-Omni-3B or a local folder) in .env to serve the real model." >&2
  export MODEL_PATH="$tiny"
fi
exec .venv/bin/python multimodal_api.py
