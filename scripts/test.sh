#!/usr/bin/env bash
# Install what the tests need, then run them all (the tiny model is built by the tests themselves):
# the server's environment with the test tools (.venv), the web UI's (.venv-ui), vLLM's CPU build for
# tests/test_vllm.py (.venv-vllm), and Debian's Chromium for the browser test (installed with apt-get
# when missing and running as root).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh requirements-dev.txt .venv
scripts/setup_env.sh requirements-ui.txt .venv-ui
scripts/setup_vllm.sh .venv-vllm
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
fi
export OMP_NUM_THREADS=1      # torch's thread pool busy-waits on small machines
export REQUIRE_BROWSER_TEST=1  # here the browser test must run, not skip
export REQUIRE_CONTAINER_CHECK=1  # and the container image's (scripts/container_check.sh; podman installed if missing)
export REQUIRE_VLLM_TEST=1  # and real vLLM's (tests/test_vllm.py)
exec .venv/bin/python -m pytest "$@"
