"""The HTTP layer: FastAPI routes over the media decoders and the Qwen2.5-Omni engine.

    python multimodal_api.py        # serves MODEL_PATH on HOST:PORT (see .env.example)

The model loads once, in the background, when the server starts: `/health` answers 503 until it
is ready. Generation runs on the model's single owner thread (`ModelWorker`); media decoding runs
in the thread pool; the event loop never waits on either.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
import urllib.parse
from contextlib import asynccontextmanager
from typing import Annotated, Any, Callable, Literal

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from starlette.exceptions import HTTPException as StarletteHTTPException

import openai_api
from deps import EngineDep, ModelState, SettingsDep, WorkerDep, out_of_memory_error, run_generation, wav_bytes
from middleware import ApiKey, BodySizeLimit, RequestId, RequestIdFilter
from generation import GenerationRequest, GenerationResult, InputRejected, OutOfMemory, PromptTooLong, SpeechError
from model_worker import ModelWorker
from modeling_low_vram import (
    SPEECH_SAMPLE_RATE,
    ConfigError,
    ModelLoadError,
    check_placement_settings,
    load_config,
)
from quantization import QuantizationError, check_prequantized
from settings import Settings, load_settings
from uploads import MediaInputs, check_uploads, decode_uploads

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
        app.state.worker = ModelWorker(settings.max_waiting_requests)  # a fresh one for each start
        if engine is None:
            app.state.model.load_in_background(settings, on_load_failure or (lambda: None))
        try:
            yield
        finally:  # the running generation finishes; waiting ones are cancelled
            await asyncio.to_thread(app.state.worker.shutdown)

    app = FastAPI(title="Qwen2.5-Omni multimodal API", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.worker = ModelWorker(settings.max_waiting_requests)  # for callers that skip the lifespan
    app.state.model = ModelState(engine)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)  # innermost
    if settings.api_key:
        app.add_middleware(ApiKey, key=settings.api_key)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "X-Text"],
        )
    app.add_middleware(RequestId)  # outermost: every answer, errors included, carries the id
    app.include_router(openai_api.router)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p not in ('body', 'query'))}: {e['msg']}" for e in error.errors()
        )
        if request.url.path.startswith("/v1/"):
            first = error.errors()[0]["loc"] if error.errors() else ()
            return openai_api.OpenAIError(
                400, problems or "invalid request", param=".".join(str(p) for p in first if p != "body") or None
            ).response()
        return JSONResponse({"detail": problems or "invalid request"}, 422)

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
        return JSONResponse(
            {
                "status": "ok",
                "model": description["model"],
                "placement": description["placement"],
                "quantization": description.get("quantization", {"scheme": "none"}),
                "memory": state.engine.memory(),
                "generations": request.app.state.worker.stats(),
            }
        )

    @app.post("/multimodal")
    async def multimodal(  # noqa: PLR0913 - one parameter per form field
        request: Request,
        settings: SettingsDep,
        engine: EngineDep,
        worker: WorkerDep,
        text: Annotated[str | None, Form(description="The question or instruction.")] = None,
        system_prompt: Annotated[str | None, Form(description="Defaults to DEFAULT_SYSTEM_PROMPT.")] = None,
        max_new_tokens: Annotated[int | None, Form(ge=1, description="Answer length bound.")] = None,
        extract_video_audio: Annotated[bool, Form(description="Send each video's audio track as audio.")] = False,
        extract_video_frame: Annotated[bool, Form(description="Send each video's last frame as an image.")] = False,
        return_audio: Annotated[bool, Form(description="Also speak the answer (needs ENABLE_AUDIO_OUTPUT).")] = False,
        speaker: Annotated[str | None, Form(description="Voice for the spoken answer; default the first.")] = None,
        max_pixels: Annotated[
            int | None,
            Form(
                ge=28 * 28,
                description=(
                    "Pixel budget for each image and video frame (one token per 28x28 pixels); defaults to "
                    "IMAGE_MAX_PIXELS / VIDEO_MAX_PIXELS, at most MAX_PIXELS_CEILING."
                ),
            ),
        ] = None,
        stream: Annotated[
            bool, Form(description="Stream the answer as Server-Sent Events (chat.completion.chunk).")
        ] = False,
        temperature: Annotated[
            float | None,
            Form(ge=0, le=2, description="Unset or 0: greedy decoding; above 0: sampling at this temperature."),
        ] = None,
        top_p: Annotated[
            float | None,
            Form(gt=0, le=1, description="Nucleus sampling when temperature > 0; unset: the checkpoint's value."),
        ] = None,
        seed: Annotated[int | None, Form(description="Seed for sampling, for reproducible sampled answers.")] = None,
        response_format: Annotated[
            Literal["json", "wav"],
            Form(description="json (default), or wav: the spoken answer as audio/wav, its text in X-Text."),
        ] = "json",
        images: Annotated[list[UploadFile], File(description="Images.")] = [],  # noqa: B006 - FastAPI copies it
        audios: Annotated[list[UploadFile], File(description="Audio files.")] = [],  # noqa: B006
        videos: Annotated[list[UploadFile], File(description="Videos.")] = [],  # noqa: B006
    ) -> dict[str, Any]:
        started = time.perf_counter()
        check_form(
            settings,
            set((await request.form()).keys()),
            text=text,
            system_prompt=system_prompt,
            max_new_tokens=max_new_tokens,
            max_pixels=max_pixels,
            stream=stream,
            response_format=response_format,
            return_audio=return_audio,
        )
        if return_audio:
            try:
                speaker = engine.check_speech(speaker)
            except SpeechError as error:
                raise HTTPException(400, f"{'speaker' if engine.voices and speaker else 'return_audio'}: {error}")
        uploads = check_uploads(settings, {"images": images, "audios": audios, "videos": videos})
        if not (text and text.strip()) and not any(uploads.values()):
            raise HTTPException(422, "send `text`, or at least one file in `images`, `audios` or `videos`")
        inputs = await run_in_threadpool(decode_uploads, settings, uploads, extract_video_audio, extract_video_frame)
        decoded = time.perf_counter()
        generation = GenerationRequest(
            text=text if text and text.strip() else None,
            system_prompt=system_prompt,
            images=inputs.images,
            audios=inputs.audios,
            videos=inputs.videos,
            max_new_tokens=max_new_tokens or settings.default_max_new_tokens,
            return_audio=return_audio,
            speaker=speaker,
            max_pixels=max_pixels,
            temperature=0.0 if temperature is None else temperature,  # /multimodal is greedy unless asked
            top_p=top_p,
            seed=seed,
        )
        if stream:
            events = await openai_api.stream_events(
                generation,
                worker,
                engine,
                engine.describe()["model"],
                include_usage=True,
                timeout=settings.request_timeout_seconds,
                warnings=inputs.warnings,
            )
            return openai_api.sse(events)
        try:
            result = await run_generation(
                request, worker, engine, generation, settings.request_timeout_seconds, started
            )
        except PromptTooLong as error:
            raise HTTPException(413, str(error)) from None
        except InputRejected as error:
            raise HTTPException(422, str(error)) from None
        if result.audio is not None and response_format == "wav":
            return Response(
                wav_bytes(result.audio, SPEECH_SAMPLE_RATE),
                media_type="audio/wav",
                headers={"X-Text": urllib.parse.quote(result.text)},
            )
        return json_answer(
            result,
            inputs,
            engine.describe()["model"],
            decode_ms=(decoded - started) * 1000,
            total_ms=(time.perf_counter() - started) * 1000,
        )

    return app


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
    result: GenerationResult, inputs: MediaInputs, model: str, decode_ms: float, total_ms: float
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
        "warnings": inputs.warnings + result.warnings,
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
            "data": base64.b64encode(wav_bytes(result.audio, SPEECH_SAMPLE_RATE)).decode("ascii"),
            "seconds": round(len(result.audio) / SPEECH_SAMPLE_RATE, 3),
        }
    return body


def main() -> None:
    """Start the server; exit with one clear message if the model cannot be loaded."""
    import uvicorn

    settings = load_settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
    try:
        check_placement_settings(settings)
        config = load_config(settings.model_path)  # fail fast on a wrong MODEL_PATH, before the server starts
        check_prequantized(config, settings.quantization)  # and on a quantized checkpoint it cannot load
    except (ConfigError, QuantizationError) as error:
        raise SystemExit(f"invalid configuration: {error}") from None
    except ModelLoadError as error:
        raise SystemExit(f"error: {error}") from None
    server: uvicorn.Server | None = None
    failed = threading.Event()

    def stop() -> None:
        failed.set()
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failure=stop)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=30
        )
    )
    server.run()
    if failed.is_set():
        raise SystemExit(f"error: {app.state.model.error}")


if __name__ == "__main__":
    main()
