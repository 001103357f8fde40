#!/usr/bin/env bash
# Install the web UI's own environment, then start it (a client of the API at MULTIMODAL_API_URL).
# It listens on 127.0.0.1; beyond it, with an API key, it needs UI_USERNAME and UI_PASSWORD (qwen_omni_server/ui/app.py).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh requirements-ui.txt .venv-ui
export GRADIO_ANALYTICS_ENABLED="${GRADIO_ANALYTICS_ENABLED:-False}"
exec .venv-ui/bin/python -m qwen_omni_server.ui
