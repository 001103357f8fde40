"""The operational routes: `GET /` (what serves, its limits and endpoints), `GET /health` (readiness; the
one route open without the API key, which then tells the status alone) and `GET /metrics` (Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from qwen_omni_server import __version__
from qwen_omni_server.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from qwen_omni_server.api.middleware import carries_key
from qwen_omni_server.api.protocol import FORM_FIELDS
from qwen_omni_server.api.state import ModelState, SettingsDep
from qwen_omni_server.core.engine import Engine
from qwen_omni_server.core.settings import Settings

router = APIRouter()
ENDPOINTS = {
    "POST /multimodal": "multipart form: " + ", ".join(sorted(FORM_FIELDS)),
    "POST /v1/chat/completions": "OpenAI-compatible chat (streaming too)",
    "GET /v1/models": "the served model",
    "GET /health": "readiness",
    "GET /metrics": "Prometheus metrics",
    "GET /": "this page",
    "GET /docs": "OpenAPI UI",
}


@router.get("/")
async def about(request: Request, settings: SettingsDep) -> dict[str, Any]:
    engine = request.app.state.model.engine
    return {
        "name": "Qwen2.5-Omni multimodal API",
        "version": __version__,
        "model": engine.describe() if engine else {"model": settings.model_path, "status": "loading"},
        "memory": engine.memory() if engine else None,
        "endpoints": ENDPOINTS,
        "decoding": decoding(engine),
        "defaults": {
            "system_prompt": settings.default_system_prompt,
            "max_new_tokens": settings.default_max_new_tokens,
        },
        "limits": limits(settings),
    }


def limits(settings: Settings) -> dict[str, Any]:
    return {
        "max_file_bytes": settings.max_file_bytes,
        "max_request_bytes": settings.max_request_bytes,
        "max_files_per_field": settings.max_files_per_field,
        "max_image_pixels": settings.max_image_pixels,
        "max_audio_seconds": settings.max_audio_seconds,
        "max_video_seconds": settings.max_video_seconds,
        "max_new_tokens_limit": settings.max_new_tokens_limit,
    }


def decoding(engine: Engine | None) -> dict[str, Any]:
    """How each route decodes when a request leaves sampling unset: the checkpoint's generation_config values."""
    return {
        "checkpoint_sampling": engine.sampling_defaults if engine is not None else None,
        "/v1/chat/completions": "temperature, top_p and top_k a request leaves unset take the checkpoint's "
        "generation_config values (as vLLM does); temperature 1, top_p 1 and no top_k where it sets none",
        "/multimodal": "greedy unless `temperature` > 0; then top_p (unset: the checkpoint's) and the "
        "checkpoint's top_k; `seed` makes sampled answers reproducible",
    }


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text: requests, queue, decode and generation times, tokens, GPU memory."""
    return Response(request.app.state.metrics.render(), media_type=METRICS_CONTENT_TYPE)


@router.get("/health")
async def health(request: Request, settings: SettingsDep) -> JSONResponse:
    """Readiness. With API_KEY set, a request without the key gets the status alone: the model, its paths,
    placement, memory and the upstreams' URLs and errors are for those who hold the key."""
    state: ModelState = request.app.state.model
    detailed = not settings.api_key or carries_key(request.scope, settings.api_key.encode())
    if state.engine is None or state.worker is None:
        if state.error:  # the reason is in the log; no server paths in answers
            detail = "the model could not be loaded: check MODEL_PATH and the server log"
            return JSONResponse({"status": "error", "detail": detail} if detailed else {"status": "error"}, 503)
        return JSONResponse({"status": "loading", "detail": None} if detailed else {"status": "loading"}, 503)
    ready, report = state.engine.health()
    status = "ok" if ready else "unavailable"
    if not detailed:
        return JSONResponse({"status": status}, 200 if ready else 503)
    description = state.engine.describe()
    body = {
        "status": status,
        "model": description["model"],
        "placement": description["placement"],
        "quantization": description.get("quantization", {"scheme": "none"}),
        "memory": state.engine.memory(),
        "generations": state.worker.stats(),
        **report,
    }
    return JSONResponse(body, 200 if ready else 503)
