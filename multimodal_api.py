"""The HTTP layer: FastAPI routes over the media decoders and the Qwen2.5-Omni engine.

    python multimodal_api.py        # serves MODEL_PATH on HOST:PORT (see .env.example)

The model loads once, in the background, when the server starts: `/health` answers 503 until it
is ready. Generation runs on the model's single owner thread (`ModelWorker`); media decoding runs
in the thread pool; the event loop never waits on either.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Callable, Literal

import pybase64
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import openai_api
from deps import (
    EngineDep,
    ModelState,
    SettingsDep,
    WorkerDep,
    admit,
    check_pictures_first,
    decode_off_loop,
    out_of_memory_error,
    request_started,
    run_generation_checking,
    wav_bytes,
)
from metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from metrics import Metrics
from middleware import AccessLog, ApiKey, BodySizeLimit, JsonFormatter, RequestId, RequestIdFilter
from generation import (
    SPEECH_SAMPLE_RATE,
    SEED_MAX,
    SEED_MIN,
    GenerationRequest,
    GenerationResult,
    InputRejected,
    OutOfMemory,
    PromptTooLong,
    SpeechError,
)
from settings import Settings, load_settings
from uploads import check_uploads, close_form, decode_uploads, read_form

__version__ = "0.1.0"
logger = logging.getLogger("multimodal_api")

FORM_FIELDS = {
    "text",
    "system_prompt",
    "max_new_tokens",
    "extract_video_audio",
    "extract_video_frame",
    "return_audio",
    "speaker",
    "response_format",
    "max_pixels",
    "stream",
    "temperature",
    "top_p",
    "seed",
    "images",
    "audios",
    "videos",
}


def create_app(
    settings: Settings | None = None, engine: Any | None = None, on_load_failure: Callable[[], None] | None = None
) -> FastAPI:
    """The FastAPI app. Pass `engine` to serve it as is (tests); otherwise MODEL_PATH loads at start-up."""
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine is None:
            app.state.model.load_in_background(settings, on_load_failure or (lambda: None))
        app.state.worker = app.state.model.new_worker(settings)  # fresh ones for each start
        app.state.decoders = decoding_pool(settings)
        try:
            yield
        finally:  # the running generation finishes; waiting ones are cancelled
            await asyncio.to_thread(app.state.worker.shutdown)
            app.state.decoders.shutdown(wait=False, cancel_futures=True)
            await asyncio.to_thread(app.state.model.close)

    app = FastAPI(title="Qwen2.5-Omni multimodal API", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.model = ModelState(engine)
    app.state.worker = app.state.model.new_worker(settings)  # for callers that skip the lifespan
    app.state.decoders = decoding_pool(settings)
    app.state.metrics = Metrics(lambda: app.state.worker)
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.max_request_bytes, timeout=settings.body_timeout_seconds
    )  # innermost
    if settings.api_key:
        open_paths = {"/health", "/metrics"} if settings.metrics_public else {"/health"}
        app.add_middleware(ApiKey, key=settings.api_key, open_paths=frozenset(open_paths))
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "X-Text"],
        )
    app.add_middleware(AccessLog, metrics=app.state.metrics)
    app.add_middleware(RequestId)  # outermost: every answer, errors included, carries the id
    app.include_router(openai_api.router)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems, param = describe_validation_errors(error.errors())
        if request.url.path.startswith("/v1/"):
            return openai_api.OpenAIError(400, problems, param=param).response()
        return JSONResponse({"detail": problems}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if request.url.path.startswith("/v1/"):
            return openai_api.error_response(error.status_code, str(error.detail), error.headers)
        return JSONResponse({"detail": error.detail}, error.status_code, headers=error.headers)

    @app.exception_handler(OutOfMemory)
    async def out_of_memory(request: Request, error: OutOfMemory) -> JSONResponse:
        return await http_error(request, out_of_memory_error(error))

    @app.exception_handler(openai_api.OpenAIError)
    async def openai_error(request: Request, error: openai_api.OpenAIError) -> JSONResponse:
        return error.response()

    @app.get("/")
    async def about(request: Request, settings: SettingsDep) -> dict[str, Any]:
        state: ModelState = request.app.state.model
        return {
            "name": "Qwen2.5-Omni multimodal API",
            "version": __version__,
            "model": state.engine.describe() if state.engine else {"model": settings.model_path, "status": "loading"},
            "memory": state.engine.memory() if state.engine else None,
            "endpoints": {
                "POST /multimodal": "multipart form: " + ", ".join(sorted(FORM_FIELDS)),
                "POST /v1/chat/completions": "OpenAI-compatible chat (streaming too)",
                "GET /v1/models": "the served model",
                "GET /health": "readiness",
                "GET /metrics": "Prometheus metrics",
                "GET /": "this page",
                "GET /docs": "OpenAPI UI",
            },
            "decoding": decoding(state.engine),
            "limits": {
                "max_file_bytes": settings.max_file_bytes,
                "max_request_bytes": settings.max_request_bytes,
                "max_files_per_field": settings.max_files_per_field,
                "max_image_pixels": settings.max_image_pixels,
                "max_audio_seconds": settings.max_audio_seconds,
                "max_video_seconds": settings.max_video_seconds,
                "max_new_tokens_limit": settings.max_new_tokens_limit,
            },
        }

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        """Prometheus text: requests, queue, decode and generation times, tokens, GPU memory."""
        return Response(request.app.state.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        state: ModelState = request.app.state.model
        if state.engine is None:
            if state.error:  # the reason is in the log; no server paths in answers
                return JSONResponse(
                    {"status": "error", "detail": "the model could not be loaded: check MODEL_PATH and the server log"},
                    503,
                )
            return JSONResponse({"status": "loading", "detail": None}, 503)
        description = state.engine.describe()
        body = {
            "status": "ok",
            "model": description["model"],
            "placement": description["placement"],
            "quantization": description.get("quantization", {"scheme": "none"}),
            "memory": state.engine.memory(),
            "generations": request.app.state.worker.stats(),
        }
        upstreams = state.upstream_report()
        if upstreams is None:
            return JSONResponse(body)
        reachable = any(upstream["state"] == "up" for upstream in upstreams)
        body.update(status="ok" if reachable else "unavailable", upstreams=upstreams)
        return JSONResponse(body, 200 if reachable else 503)

    @app.post("/multimodal", openapi_extra=FORM_OPENAPI)
    async def multimodal(request: Request, settings: SettingsDep, engine: EngineDep, worker: WorkerDep):
        """Text, images, audio and video in one multipart form; the answer as JSON, WAV or Server-Sent Events."""
        started = request_started(request)
        place = admit(request)  # a full queue answers 503 now, before the body is read or decoded
        form = None
        try:
            form = await read_form(request, settings, FORM_FIELDS, FILE_FIELDS)
            return await answer_form(request, settings, engine, worker, form, place, started)
        except BaseException:
            place.release()
            raise
        finally:
            await close_form(form)

    return app


async def answer_form(request: Request, settings: Settings, engine, worker, form, place, started: float):
    """The /multimodal answer for a form read within the limits."""
    values = {name: form.getlist(name)[-1] for name in FORM_FIELDS - FILE_FIELDS if form.getlist(name)}
    try:
        fields = MultimodalForm.model_validate(values)
    except ValidationError as error:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in error.errors()]) from None
    check_form(
        settings,
        set(form.keys()),
        text=fields.text,
        system_prompt=fields.system_prompt,
        max_new_tokens=fields.max_new_tokens,
        max_pixels=fields.max_pixels,
        stream=fields.stream,
        response_format=fields.response_format,
        return_audio=fields.return_audio,
    )
    speaker = fields.speaker
    if fields.return_audio:
        try:
            speaker = engine.check_speech(speaker)
        except SpeechError as error:
            raise HTTPException(400, f"{'speaker' if engine.voices and speaker else 'return_audio'}: {error}")
    uploads = check_uploads(settings, {name: form.getlist(name) for name in sorted(FILE_FIELDS)})
    text = fields.text
    if not (text and text.strip()) and not any(uploads.values()):
        raise HTTPException(422, "send `text`, or at least one file in `images`, `audios` or `videos`")
    inputs = await decode_off_loop(
        request, decode_uploads, settings, uploads, fields.extract_video_audio, fields.extract_video_frame
    )
    await close_form(form)  # the decoded inputs are all that is kept from here on
    decoded = time.perf_counter()
    generation = GenerationRequest(
        text=text if text and text.strip() else None,
        system_prompt=fields.system_prompt,
        images=inputs.images,
        audios=inputs.audios,
        videos=inputs.videos,
        max_new_tokens=fields.max_new_tokens or settings.default_max_new_tokens,
        return_audio=fields.return_audio,
        speaker=speaker,
        max_pixels=fields.max_pixels,
        temperature=0.0 if fields.temperature is None else fields.temperature,  # /multimodal is greedy unless asked
        top_p=fields.top_p,
        seed=fields.seed,
    )
    timeout = settings.request_timeout_seconds
    model = engine.describe()["model"]
    warnings, pictures = inputs.warnings, inputs.pictures
    del inputs  # the generation request holds the media; the job lets go of it when it starts or is given up
    if fields.stream:
        generation = await check_pictures_first(request, settings, generation, pictures, warnings)
        events = openai_api.stream_events(generation, worker, engine, model, True, timeout, started, warnings, place)
        return openai_api.sse(events, place)
    try:
        result = await run_generation_checking(
            request, settings, worker, engine, generation, pictures, timeout, started, place
        )
    except PromptTooLong as error:
        raise HTTPException(413, str(error)) from None
    except InputRejected as error:
        raise HTTPException(422, str(error)) from None
    if result.audio is not None and fields.response_format == "wav":
        return Response(
            wav_bytes(result.audio, SPEECH_SAMPLE_RATE),
            media_type="audio/wav",
            headers={"X-Text": urllib.parse.quote(result.text)},
        )
    return json_answer(
        result,
        warnings,
        model,
        decode_ms=(decoded - started) * 1000,
        total_ms=(time.perf_counter() - started) * 1000,
    )


class MultimodalForm(BaseModel):
    """The /multimodal form's value fields (the files are `images`, `audios` and `videos`)."""

    model_config = ConfigDict(extra="ignore")
    text: str | None = Field(None, description="The question or instruction.")
    system_prompt: str | None = Field(None, description="Defaults to DEFAULT_SYSTEM_PROMPT.")
    max_new_tokens: int | None = Field(None, ge=1, description="Answer length bound.")
    extract_video_audio: bool = Field(False, description="Send each video's audio track as audio.")
    extract_video_frame: bool = Field(False, description="Send each video's last frame as an image.")
    return_audio: bool = Field(False, description="Also speak the answer (needs ENABLE_AUDIO_OUTPUT).")
    speaker: str | None = Field(None, description="Voice for the spoken answer; default the first.")
    max_pixels: int | None = Field(
        None,
        ge=28 * 28,
        description=(
            "Pixel budget for each image and video frame (one token per 28x28 pixels); defaults to "
            "IMAGE_MAX_PIXELS / VIDEO_MAX_PIXELS, at most MAX_PIXELS_CEILING."
        ),
    )
    stream: bool = Field(False, description="Stream the answer as Server-Sent Events (chat.completion.chunk).")
    temperature: float | None = Field(
        None, ge=0, le=2, description="Unset or 0: greedy decoding; above 0: sampling at this temperature."
    )
    top_p: float | None = Field(
        None, gt=0, le=1, description="Nucleus sampling when temperature > 0; unset: the checkpoint's value."
    )
    seed: int | None = Field(
        None,
        ge=SEED_MIN,
        le=SEED_MAX,
        description="Seed for sampling (a 64-bit signed integer), for reproducible answers.",
    )
    response_format: Literal["json", "wav"] = Field(
        "json", description="json (default), or wav: the spoken answer as audio/wav, its text in X-Text."
    )


def _form_schema() -> dict[str, Any]:
    """The form's OpenAPI schema: its value fields, and one array of files for each kind."""
    schema = MultimodalForm.model_json_schema()
    schema.pop("description", None)
    files = {"images": "Images.", "audios": "Audio files.", "videos": "Videos."}
    for name, description in files.items():
        schema["properties"][name] = {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": description,
        }
    return schema


FILE_FIELDS = {"images", "audios", "videos"}
FORM_OPENAPI = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _form_schema()}}}}


def decoding_pool(settings: Settings) -> ThreadPoolExecutor:
    """The threads uploads decode on: DECODE_WORKERS at once, the rest wait their turn."""
    return ThreadPoolExecutor(max_workers=settings.decode_workers, thread_name_prefix="decode")


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """FastAPI's validation errors as one message, and the first one's field (None for the body as a whole)."""
    if any(e["type"] == "json_invalid" for e in errors):
        reason = next(e for e in errors if e["type"] == "json_invalid").get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON ({reason}); send a JSON object", None
    where = [".".join(str(p) for p in e["loc"] if p not in ("body", "query")) for e in errors]
    problems = "; ".join(f"{field}: {e['msg']}" if field else e["msg"] for field, e in zip(where, errors))
    return problems or "invalid request", (where[0] if where else None) or None


def check_form(
    settings: Settings,
    fields: set[str],
    *,
    text: str | None,
    system_prompt: str | None,
    max_new_tokens: int | None,
    max_pixels: int | None,
    stream: bool,
    response_format: str,
    return_audio: bool,
) -> None:
    """The /multimodal checks FastAPI's types cannot express: unknown fields, setting-bound limits, combinations."""
    unknown = sorted(fields - FORM_FIELDS)
    if unknown:
        raise HTTPException(422, f"unknown form field(s) {unknown}; accepted: {', '.join(sorted(FORM_FIELDS))}")
    if max_new_tokens is not None and max_new_tokens > settings.max_new_tokens_limit:
        raise HTTPException(422, f"max_new_tokens: at most {settings.max_new_tokens_limit} (MAX_NEW_TOKENS_LIMIT)")
    for name, value in (("text", text), ("system_prompt", system_prompt)):
        if value is not None and len(value) > settings.max_text_chars:
            raise HTTPException(
                413, f"{name}: {len(value):,} characters, at most {settings.max_text_chars:,} (MAX_TEXT_CHARS)"
            )
    if max_pixels is not None and max_pixels > settings.max_pixels_ceiling:
        raise HTTPException(422, f"max_pixels: at most {settings.max_pixels_ceiling:,} (MAX_PIXELS_CEILING)")
    if stream and response_format == "wav":
        raise HTTPException(422, "response_format=wav cannot be streamed: send stream=false")
    if response_format == "wav" and not return_audio:
        raise HTTPException(422, "response_format=wav returns the spoken answer: also send return_audio=true")


def decoding(engine: Any | None) -> dict[str, Any]:
    """How each route decodes when a request leaves sampling unset: the checkpoint's generation_config values."""
    defaults = getattr(engine, "sampling_defaults", None) or {}
    return {
        "checkpoint_sampling": defaults if engine is not None else None,
        "/v1/chat/completions": "temperature, top_p and top_k a request leaves unset take the checkpoint's "
        "generation_config values (as vLLM does); temperature 1, top_p 1 and no top_k where it sets none",
        "/multimodal": "greedy unless `temperature` > 0; then top_p (unset: the checkpoint's) and the "
        "checkpoint's top_k; `seed` makes sampled answers reproducible",
    }


def json_answer(
    result: GenerationResult, warnings: list[str], model: str, decode_ms: float, total_ms: float
) -> dict[str, Any]:
    """The /multimodal JSON answer: text, usage, what reached the model, warnings, timings, speech."""
    body: dict[str, Any] = {
        "text": result.text,
        "model": model,
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "prompt_tokens_by_modality": result.prompt_tokens_by_modality,
        },
        "inputs": result.inputs,
        "warnings": warnings + result.warnings,
        "timings_ms": {
            "preprocess": round(decode_ms + result.timings_ms.get("prepare", 0.0), 1),
            "generate": round(result.timings_ms.get("generate", 0.0), 1),
            "total": round(total_ms, 1),
        },
    }
    if result.audio is not None:
        body["audio"] = {
            "format": "wav",
            "sample_rate": SPEECH_SAMPLE_RATE,
            "data": pybase64.b64encode_as_string(wav_bytes(result.audio, SPEECH_SAMPLE_RATE)),
            "seconds": round(len(result.audio) / SPEECH_SAMPLE_RATE, 3),
        }
    return body


def configure_logging(settings: Settings) -> None:
    """LOG_LEVEL, and LOG_FORMAT: text lines, or one JSON object per line; every line carries the request id."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
        if settings.log_format == "json":
            handler.setFormatter(JsonFormatter())


def check_local_model(settings: Settings) -> None:
    """Exit with one line, before serving, on a wrong placement, MODEL_PATH or quantized checkpoint. (torch and
    Transformers are imported here and by the engine, not by the HTTP modules.)"""
    from modeling_low_vram import ConfigError, ModelLoadError, check_placement_settings, load_config
    from quantization import QuantizationError, check_prequantized

    try:
        check_placement_settings(settings)
        config = load_config(settings.model_path)
        check_prequantized(config, settings.quantization)
    except (ConfigError, QuantizationError) as error:
        raise SystemExit(f"invalid configuration: {error}") from None
    except ModelLoadError as error:
        raise SystemExit(f"error: {error}") from None


def main() -> None:
    """Start the server; exit with one clear message if the model cannot be loaded."""
    import uvicorn

    settings = load_settings()
    configure_logging(settings)
    # The event loop shares the GIL with the model's and the decoders' threads: a short switch interval
    # lets it answer (/health, new requests, streamed tokens) without waiting out their 5 ms slices.
    sys.setswitchinterval(0.0005)
    if settings.engine == "local":
        check_local_model(settings)
    server: uvicorn.Server | None = None
    failed = threading.Event()

    def stop() -> None:
        failed.set()
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failure=stop)
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


if __name__ == "__main__":
    main()
