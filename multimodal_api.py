"""Serve Qwen2.5-Omni: `python multimodal_api.py` (MODEL_PATH on HOST:PORT; see .env.example).

The entry point people already use; the server is the `qwen_omni_server` package (`server.main`).
"""

from qwen_omni_server.server import create_app, main

__all__ = ["create_app", "main"]

if __name__ == "__main__":
    main()
