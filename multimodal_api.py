"""The HTTP layer: FastAPI routes over the media decoders and the Qwen2.5-Omni engine.

    python multimodal_api.py        # serves MODEL_PATH on HOST:PORT (see .env.example)

The model loads once, in the background, when the server starts: `/health` answers 503 until it
is ready. Generation runs on the model's single owner thread (`ModelWorker`); media decoding runs
in the thread pool; the event loop never waits on either.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
import time
import urllib.parse
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

import numpy as np
import soundfile

import media
from modeling_low_vram import (
    ConfigError,
    GenerationRequest,
    ModelLoadError,
    SPEECH_SAMPLE_RATE,
    InputRejected,
    ModelWorker,
    PromptTooLong,
    OmniEngine,
    SpeechError,
    VideoInput,
    check_placement_settings,
    load_config,
)
from settings import Settings, load_settings

__version__ = "0.1.0"
logger = logging.getLogger("multimodal_api")

FORM_FIELDS = {
    "text", "system_prompt", "max_new_tokens", "extract_video_audio", "extract_video_frame",
    "return_audio", "speaker", "response_format", "max_pixels", "images", "audios", "videos",
}
MEDIA_STATUS = {media.UnsupportedMedia: 415, media.UndecodableMedia: 400, media.MediaTooLarge: 413}


# ---------------------------------------------------------------- app state and dependencies


class ModelState:
    """The engine once loaded, or why it is not (yet)."""

    def __init__(self, engine: Any | None = None) -> None:
        self.engine = engine
        self.error: str | None = None

    def load_in_background(self, settings: Settings, on_failure: Callable[[], None]) -> None:
        def load() -> None:
            try:
                self.engine = OmniEngine.load(settings)
                logger.info("model ready: %s", self.engine.describe())
            except (ModelLoadError, ConfigError) as error:
                self.error = str(error)
                logger.error("%s", error)
                on_failure()
            except Exception as error:  # noqa: BLE001 - anything else is still fatal, with its traceback
                self.error = f"model failed to load: {error}"
                logger.exception("model failed to load")
                on_failure()

        threading.Thread(target=load, name="model-loader", daemon=True).start()


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> OmniEngine:
    state: ModelState = request.app.state.model
    if state.engine is None:
        raise HTTPException(503, state.error or "the model is still loading; retry shortly",
                            headers={"Retry-After": "5"})
    return state.engine


def get_worker(request: Request) -> ModelWorker:
    return request.app.state.worker


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[OmniEngine, Depends(get_engine)]
WorkerDep = Annotated[ModelWorker, Depends(get_worker)]


# ---------------------------------------------------------------- request body limit


class BodySizeLimit:
    """Refuses a request body over `max_bytes`, counted as it arrives (Content-Length is not trusted)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body is over {self.max_bytes:,} bytes (MAX_REQUEST_MB)"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            return await JSONResponse({"detail": message}, 413)(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, message)
            return event

        await self.app(scope, counting_receive, send)


# ---------------------------------------------------------------- uploads -> model inputs


@dataclass
class MediaInputs:
    images: list = field(default_factory=list)
    audios: list = field(default_factory=list)
    videos: list[VideoInput] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _label(field_name: str, index: int, upload: UploadFile) -> str:
    name = "".join(ch for ch in (upload.filename or "") if ch.isprintable())[:100]
    return f"{field_name}[{index}]" + (f" '{name}'" if name else "")


def decode_uploads(
    settings: Settings,
    uploads: dict[str, list[UploadFile]],
    extract_video_audio: bool,
    extract_video_frame: bool,
) -> MediaInputs:
    """Decode every upload (runs in a worker thread). Raises HTTPException naming the bad file."""
    s = settings
    out = MediaInputs()
    for field_name, files in uploads.items():
        for index, upload in enumerate(files):
            label = _label(field_name, index, upload)
            try:
                _decode_one(s, field_name, upload.file, out, label, extract_video_audio, extract_video_frame)
            except media.MediaError as error:
                raise HTTPException(MEDIA_STATUS[type(error)], f"{label}: {error}") from None
            except Exception:  # noqa: BLE001 - a decoder failure we did not foresee is still the file's fault
                logger.exception("unexpected error decoding %s", label)
                raise HTTPException(400, f"{label}: could not be decoded") from None
    return out


def _decode_one(s: Settings, field_name: str, source, out: MediaInputs, label: str,
                extract_audio: bool, extract_frame: bool) -> None:
    timeout = s.decode_timeout_seconds
    if field_name == "images":
        image = media.load_image(source, max_pixels=s.max_image_pixels)
        out.images.append(image.image)
        out.warnings += [f"{label}: {w}" for w in image.warnings]
        return
    if field_name == "audios":
        audio = media.load_audio(source, max_seconds=s.max_audio_seconds, timeout=timeout)
        out.audios.append(audio.samples)
        out.warnings += [f"{label}: {w}" for w in audio.warnings]
        return
    converted = False
    if extract_frame:
        out.images.append(media.extract_last_frame(source, max_seconds=s.max_video_seconds, timeout=timeout))
        converted = True
    if extract_audio:
        track = media.extract_audio_track(source, max_seconds=s.max_audio_seconds, timeout=timeout)
        if track is None:
            out.warnings.append(f"{label}: has no audio track, so no audio was extracted")
        else:
            out.audios.append(track.samples)
            out.warnings += [f"{label}: {w}" for w in track.warnings]
            converted = True
    if converted:
        return
    if extract_audio:
        out.warnings.append(f"{label}: sent whole as a video instead")
    video = media.load_video(
        source, fps=s.video_fps, max_frames=s.video_max_frames, max_seconds=s.max_video_seconds,
        frame_max_pixels=s.video_max_pixels, max_audio_seconds=s.max_audio_seconds, timeout=timeout,
    )
    out.videos.append(VideoInput(video.frames, video.fps, video.audio.samples if video.audio else None))
    out.warnings += [f"{label}: {w}" for w in video.warnings]


def check_uploads(settings: Settings, uploads: dict[str, list[UploadFile]]) -> dict[str, list[UploadFile]]:
    """Drop the empty parts browsers send for an untouched file input; enforce count and size limits."""
    checked = {}
    for field_name, files in uploads.items():
        files = [f for f in files if f.filename or (f.size or 0) > 0]
        if len(files) > settings.max_files_per_field:
            raise HTTPException(413, f"{field_name}: {len(files)} files, at most {settings.max_files_per_field} "
                                     "are accepted (MAX_FILES_PER_FIELD)")
        for index, upload in enumerate(files):
            if (upload.size or 0) > settings.max_file_bytes:
                raise HTTPException(413, f"{_label(field_name, index, upload)}: {upload.size:,} bytes, over the "
                                         f"limit of {settings.max_file_bytes:,} (MAX_FILE_MB)")
            if upload.size == 0:
                raise HTTPException(400, f"{_label(field_name, index, upload)}: the file is empty")
        checked[field_name] = files
    return checked


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """A mono float waveform as a 16-bit PCM WAV file."""
    out = io.BytesIO()
    soundfile.write(out, np.clip(samples, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


# ---------------------------------------------------------------- the app


def create_app(settings: Settings | None = None, engine: Any | None = None,
               on_load_failure: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app. Pass `engine` to serve it as is (tests); otherwise MODEL_PATH loads at start-up."""
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.settings = settings
        app.state.worker = ModelWorker()
        app.state.model = ModelState(engine)
        if engine is None:
            app.state.model.load_in_background(settings, on_load_failure or (lambda: None))
        try:
            yield
        finally:  # the running generation finishes; waiting ones are cancelled
            await asyncio.to_thread(app.state.worker.shutdown)

    app = FastAPI(title="Qwen2.5-Omni multimodal API", version=__version__, lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p not in ('body', 'query'))}: {e['msg']}" for e in error.errors()
        )
        return JSONResponse({"detail": problems or "invalid request"}, 422)

    @app.get("/")
    async def about(request: Request, settings: SettingsDep) -> dict[str, Any]:
        state: ModelState = request.app.state.model
        return {
            "name": "Qwen2.5-Omni multimodal API",
            "version": __version__,
            "model": state.engine.describe() if state.engine else {"model": settings.model_path, "status": "loading"},
            "memory": state.engine.memory() if state.engine else None,
            "endpoints": {"POST /multimodal": "multipart form: " + ", ".join(sorted(FORM_FIELDS)),
                          "GET /health": "readiness", "GET /": "this page", "GET /docs": "OpenAPI UI"},
            "limits": {
                "max_file_bytes": settings.max_file_bytes, "max_request_bytes": settings.max_request_bytes,
                "max_files_per_field": settings.max_files_per_field, "max_image_pixels": settings.max_image_pixels,
                "max_audio_seconds": settings.max_audio_seconds, "max_video_seconds": settings.max_video_seconds,
                "max_new_tokens_limit": settings.max_new_tokens_limit,
            },
        }

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        state: ModelState = request.app.state.model
        if state.engine is None:
            status = "error" if state.error else "loading"
            return JSONResponse({"status": status, "detail": state.error}, 503)
        description = state.engine.describe()
        return JSONResponse({"status": "ok", "model": description["model"], "placement": description["placement"],
                             "memory": state.engine.memory()})

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
        max_pixels: Annotated[int | None, Form(ge=28 * 28, description=(
            "Pixel budget for each image and video frame (one token per 28x28 pixels); defaults to "
            "IMAGE_MAX_PIXELS / VIDEO_MAX_PIXELS, at most MAX_PIXELS_CEILING."))] = None,
        response_format: Annotated[Literal["json", "wav"], Form(
            description="json (default), or wav: the spoken answer as audio/wav, its text in X-Text.")] = "json",
        images: Annotated[list[UploadFile], File(description="Images.")] = [],  # noqa: B006 - FastAPI copies it
        audios: Annotated[list[UploadFile], File(description="Audio files.")] = [],  # noqa: B006
        videos: Annotated[list[UploadFile], File(description="Videos.")] = [],  # noqa: B006
    ) -> dict[str, Any]:
        started = time.perf_counter()
        form = await request.form()
        unknown = sorted(set(form.keys()) - FORM_FIELDS)
        if unknown:
            raise HTTPException(422, f"unknown form field(s) {unknown}; accepted: {', '.join(sorted(FORM_FIELDS))}")
        if max_new_tokens is not None and max_new_tokens > settings.max_new_tokens_limit:
            raise HTTPException(422, f"max_new_tokens: at most {settings.max_new_tokens_limit} (MAX_NEW_TOKENS_LIMIT)")
        for name, value in (("text", text), ("system_prompt", system_prompt)):
            if value is not None and len(value) > settings.max_text_chars:
                raise HTTPException(413, f"{name}: {len(value):,} characters, at most {settings.max_text_chars:,} "
                                         "(MAX_TEXT_CHARS)")
        if max_pixels is not None and max_pixels > settings.max_pixels_ceiling:
            raise HTTPException(422, f"max_pixels: at most {settings.max_pixels_ceiling:,} (MAX_PIXELS_CEILING)")
        if response_format == "wav" and not return_audio:
            raise HTTPException(422, "response_format=wav returns the spoken answer: also send return_audio=true")
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
            images=inputs.images, audios=inputs.audios, videos=inputs.videos,
            max_new_tokens=max_new_tokens or settings.default_max_new_tokens,
            return_audio=return_audio, speaker=speaker, max_pixels=max_pixels,
        )
        try:
            result = await worker.run(engine.generate, generation)
        except PromptTooLong as error:
            raise HTTPException(413, str(error)) from None
        except InputRejected as error:
            raise HTTPException(422, str(error)) from None
        if result.audio is not None and response_format == "wav":
            return Response(wav_bytes(result.audio, SPEECH_SAMPLE_RATE), media_type="audio/wav",
                            headers={"X-Text": urllib.parse.quote(result.text)})
        decode_ms = (decoded - started) * 1000
        body = {
            "text": result.text,
            "model": engine.describe()["model"],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "total_tokens": result.prompt_tokens + result.completion_tokens,
                      "prompt_tokens_by_modality": result.prompt_tokens_by_modality},
            "inputs": {"images": len(inputs.images), "audios": len(inputs.audios), "videos": len(inputs.videos)},
            "warnings": inputs.warnings + result.warnings,
            "timings_ms": {
                "preprocess": round(decode_ms + result.timings_ms.get("prepare", 0.0), 1),
                "generate": round(result.timings_ms.get("generate", 0.0), 1),
                "total": round((time.perf_counter() - started) * 1000, 1),
            },
        }
        if result.audio is not None:
            body["audio"] = {
                "format": "wav", "sample_rate": SPEECH_SAMPLE_RATE,
                "data": base64.b64encode(wav_bytes(result.audio, SPEECH_SAMPLE_RATE)).decode("ascii"),
                "seconds": round(len(result.audio) / SPEECH_SAMPLE_RATE, 3),
            }
        return body

    return app


def main() -> None:
    """Start the server; exit with one clear message if the model cannot be loaded."""
    import uvicorn

    settings = load_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_placement_settings(settings)
        load_config(settings.model_path)  # fail fast on a wrong MODEL_PATH, before the server starts
    except ConfigError as error:
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
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           log_level=settings.log_level, timeout_graceful_shutdown=30))
    server.run()
    if failed.is_set():
        raise SystemExit(f"error: {app.state.model.error}")


if __name__ == "__main__":
    main()
