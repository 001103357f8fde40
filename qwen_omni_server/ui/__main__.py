"""`python -m qwen_omni_server.ui`: the web UI."""

from qwen_omni_server.ui.app import main

main()
