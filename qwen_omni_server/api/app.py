"""The FastAPI app: settings, middleware, the error table, the routers, and the engine's lifetime.

`create_app(settings, engine)` serves an engine as it is (tests); with `load_engine` instead, the engine is
made in the background when the server starts and `/health` answers 503 until it is ready. Generation runs
on the engine's worker; media decoding in the decoding pool; the event loop never waits on either.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen_omni_server import __version__
from qwen_omni_server.api.admission import decoding_pool
from qwen_omni_server.api.errors import HANDLED, ApiError, api_error, is_openai
from qwen_omni_server.api.metrics import Metrics
from qwen_omni_server.api.middleware import (
    AccessLog,
    ApiKey,
    BodyLimits,
    Intake,
    JsonFormatter,
    RequestId,
    RequestIdFilter,
)
from qwen_omni_server.api.routes import multimodal, openai, ops
from qwen_omni_server.api.state import EngineLoader, ModelState
from qwen_omni_server.core.engine import Engine
from qwen_omni_server.core.settings import Settings, load_settings

logger = logging.getLogger("multimodal_api")


def create_app(
    settings: Settings | None = None,
    engine: Engine | None = None,
    *,
    load_engine: EngineLoader | None = None,
    on_load_failure: Callable[[], None] | None = None,
) -> FastAPI:
    """The FastAPI app serving `engine`, or the one `load_engine(settings)` makes when the server starts."""
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.model.start(settings, load_engine, on_load_failure or (lambda: None))
        app.state.decoders = decoding_pool(settings)  # fresh ones for each start
        try:
            yield
        finally:
            await asyncio.to_thread(app.state.model.stop)
            app.state.decoders.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="Qwen2.5-Omni multimodal API", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.model = ModelState(engine, settings.max_waiting_requests)
    app.state.decoders = decoding_pool(settings)
    app.state.intake = Intake(settings.max_uploads_in_flight, settings.max_upload_bytes_in_flight)
    app.state.metrics = Metrics(lambda: app.state.model.worker, app.state.intake)
    add_middleware(app, settings)
    add_error_handlers(app)
    for router in (ops.router, multimodal.router, openai.router):
        app.include_router(router)
    return app


def add_middleware(app: FastAPI, settings: Settings) -> None:
    """The body's limits innermost (a request without the API key takes no upload's place), then the API key,
    CORS, the access log, and request ids outermost (so every answer, errors included, carries its id)."""
    app.add_middleware(
        BodyLimits, max_bytes=settings.max_request_bytes, intake=app.state.intake, timeout=settings.body_timeout_seconds
    )
    if settings.api_key:
        open_paths = {"/health", "/metrics"} if settings.metrics_public else {"/health"}
        app.add_middleware(ApiKey, key=settings.api_key, open_paths=frozenset(open_paths))
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "X-Text", "X-Text-Truncated", "X-Text-Note"],
        )
    app.add_middleware(AccessLog, metrics=app.state.metrics)
    app.add_middleware(RequestId)


def add_error_handlers(app: FastAPI) -> None:
    """Every error is answered through `api.errors`, in the shape of the API it was asked on."""

    async def answer(request: Request, error: Exception) -> JSONResponse:
        return api_error(error).response(is_openai(request.scope))

    async def http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        return ApiError(error.status_code, str(error.detail), headers=error.headers).response(is_openai(request.scope))

    async def validation_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        problems, param = describe_validation_errors(error.errors())
        return ApiError(422, problems, param=param).response(is_openai(request.scope))

    for kind in HANDLED:
        app.add_exception_handler(kind, answer)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)


def describe_validation_errors(errors: Any) -> tuple[str, str | None]:
    """FastAPI's validation errors as one message, and the first one's field (None for the body as a whole)."""
    if any(e["type"] == "json_invalid" for e in errors):
        reason = next(e for e in errors if e["type"] == "json_invalid").get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON ({reason}); send a JSON object", None
    where = [".".join(str(p) for p in e["loc"] if p not in ("body", "query")) for e in errors]
    problems = "; ".join(f"{field}: {e['msg']}" if field else e["msg"] for field, e in zip(where, errors))
    return problems or "invalid request", (where[0] if where else None) or None


def configure_logging(settings: Settings) -> None:
    """LOG_LEVEL, and LOG_FORMAT: text lines, or one JSON object per line; every line carries the request id."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
        if settings.log_format == "json":
            handler.setFormatter(JsonFormatter())
    if settings.log_format == "json":  # progress bars (loading weights) would break the lines into pieces
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def serve(settings: Settings, load_engine: EngineLoader) -> None:
    """Serve on HOST:PORT until stopped; exit with the engine's one-line reason if it could not be made."""
    import uvicorn

    # The event loop shares the GIL with the engine's and the decoders' threads: a short switch interval
    # lets it answer (/health, new requests, streamed tokens) without waiting out their 5 ms slices.
    sys.setswitchinterval(0.0005)
    server: uvicorn.Server | None = None
    failed = threading.Event()

    def stop() -> None:
        failed.set()
        if server is not None:
            server.should_exit = True

    app = create_app(settings, load_engine=load_engine, on_load_failure=stop)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            log_config=None,  # uvicorn's lines go through our handlers (and format) too
            access_log=False,  # AccessLog writes one line per request, with more in it
            timeout_graceful_shutdown=30,
        )
    )
    server.run()
    if failed.is_set():
        raise SystemExit(f"error: {app.state.model.error}")
