"""The server put together: the engine ENGINE names, served by the API.

    python multimodal_api.py        # or: qwen-omni-serve; serves MODEL_PATH on HOST:PORT (see .env.example)

This is the one place that knows both the API and the engines; the API is handed the engine (or how to
make it) and never asks which it has.
"""

from __future__ import annotations

import importlib
from typing import Any

from fastapi import FastAPI

from qwen_omni_server.api import app as api
from qwen_omni_server.core.engine import Engine
from qwen_omni_server.core.settings import Settings, load_settings

# ENGINE -> the package that makes it; each has `check(settings)` (before serving) and `load(settings)`.
ENGINES = {"local": "qwen_omni_server.local", "openai": "qwen_omni_server.upstream"}


def engine_package(settings: Settings) -> Any:
    return importlib.import_module(ENGINES[settings.engine])  # torch is imported only for a local model


def load_engine(settings: Settings) -> Engine:
    """The engine ENGINE names, ready to serve; EngineFailed with what to set when it cannot be made."""
    return engine_package(settings).load(settings)


def create_app(settings: Settings | None = None, engine: Engine | None = None, **options: Any) -> FastAPI:
    """The app serving `engine`, or (none given) the engine the settings name, made when the server starts."""
    settings = settings or load_settings()
    return api.create_app(settings, engine, load_engine=None if engine is not None else load_engine, **options)


def main() -> None:
    """Start the server; exit with one clear line if the settings or the model are wrong."""
    settings = load_settings()
    api.configure_logging(settings)
    engine_package(settings).check(settings)
    api.serve(settings, load_engine)


if __name__ == "__main__":
    main()
