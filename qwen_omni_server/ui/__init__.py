"""The web UI: a Gradio chat over the server's /v1 API (its own environment: requirements-ui.txt)."""
