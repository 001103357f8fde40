#!/usr/bin/env bash
# Install the web UI's own environment, then start it (a client of the API at MULTIMODAL_API_URL).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh requirements-ui.txt .venv-ui
export GRADIO_ANALYTICS_ENABLED="${GRADIO_ANALYTICS_ENABLED:-False}"
exec .venv-ui/bin/python -m qwen_omni_server.ui
