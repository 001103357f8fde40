"""OpenAI-compatible routes: POST /v1/chat/completions (streaming too) and GET /v1/models.

The request shape is the one vLLM accepts for Qwen2.5-Omni: `messages` whose content is a string
or a list of `text`, `image_url`, `input_audio`, `audio_url` and `video_url` parts, with media as
data URLs (remote URLs only for hosts listed in MEDIA_URL_HOSTS). All media goes through
`media.py` with the same limits as /multimodal. Errors use OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import binascii
import io
import json
import logging
import time
import urllib.parse
import uuid
from dataclasses import replace
from typing import Any, AsyncIterator, Literal

import numpy as np
import pybase64
from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

import media
import remote_media
from engine import EngineUnavailable
from deps import (
    EngineDep,
    Job,
    Place,
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
from generation import (
    SPEECH_SAMPLE_RATE,
    SEED_MAX,
    SEED_MIN,
    Cancelled,
    ChatTurn,
    GenerationRequest,
    GenerationResult,
    InputRejected,
    OutOfMemory,
    PromptTooLong,
    SpeechError,
    VideoInput,
)
from model_worker import ModelWorker
from settings import Settings
from uploads import MEDIA_STATUS, decode_media

logger = logging.getLogger("multimodal_api")
router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
AUDIO_LIFETIME_SECONDS = 3600


class OpenAIError(Exception):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def payload(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.payload()}, self.status, headers=self.headers)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Any HTTP error on a /v1 route, in OpenAI's shape."""
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    return OpenAIError(status, message, kind=kind, headers=headers).response()


# ---------------------------------------------------------------- the request


class MediaURL(BaseModel):
    url: str


class InputAudio(BaseModel):
    data: str = Field(description="base64 audio")
    format: str = Field("wav", description="wav, mp3, flac… (informative: the bytes decide)")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "image_url", "input_audio", "audio_url", "video_url"]
    text: str | None = None
    image_url: MediaURL | str | None = None
    input_audio: InputAudio | None = None
    audio_url: MediaURL | str | None = None
    video_url: MediaURL | str | None = None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class AudioOptions(BaseModel):
    voice: str | None = None
    format: Literal["wav", "pcm16"] | None = Field(
        None, description="wav (the default), or pcm16 (raw 24 kHz mono); streamed speech is always pcm16"
    )


class ProcessorOptions(BaseModel):
    """vLLM's `mm_processor_kwargs` for Qwen2.5-Omni, the ones this server acts on."""

    model_config = ConfigDict(extra="forbid")
    use_audio_in_video: bool | None = Field(None, description="false: leave out each video's own audio track")
    max_pixels: int | None = Field(None, ge=28 * 28, description="pixel budget for each image and video frame")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="unset: the checkpoint's generation_config")
    top_p: float | None = Field(None, gt=0, le=1, description="unset: the checkpoint's generation_config")
    top_k: int | None = Field(None, ge=-1, description="as vLLM: -1 or 0 is off; unset: the checkpoint's")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="a 64-bit signed integer")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    modalities: list[Literal["text", "audio"]] = ["text"]
    audio: AudioOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    mm_processor_kwargs: ProcessorOptions | None = None
    user: str | None = None
    frequency_penalty: float = Field(0, ge=0, le=0, description="not supported: 0 only")
    presence_penalty: float = Field(0, ge=0, le=0, description="not supported: 0 only")


# ---------------------------------------------------------------- media parts


KINDS = {"image_url": "image", "input_audio": "audio", "audio_url": "audio", "video_url": "video"}


def base64_bytes(payload: str, what: str, limit: int) -> bytes:
    """A base64 payload's bytes; its size is judged from its length before anything is decoded."""
    payload = payload.strip()
    size = len(payload) * 3 // 4 - payload[-2:].count("=")
    if size > limit:
        raise OpenAIError(413, f"{what}: {size:,} bytes, over the limit of {limit:,} (MAX_FILE_MB)", param=what)
    try:
        return pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise OpenAIError(400, f"{what}: the data URL is not valid base64", param=what) from None


async def fetch_media(url: str, what: str, settings: Settings) -> bytes:
    """A data URL's bytes (decoded in a worker thread), or a remote URL's for the hosts MEDIA_URL_HOSTS lists
    (see remote_media). Either way at most MAX_FILE_MB."""
    limit = settings.max_file_bytes
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if header.endswith(";base64"):
            return await run_in_threadpool(base64_bytes, payload, what, limit)
        data = urllib.parse.unquote_to_bytes(payload)
        if len(data) > limit:
            raise OpenAIError(413, f"{what}: over {limit:,} bytes (MAX_FILE_MB)", param=what)
        return data
    try:
        return await remote_media.fetch(url, settings)
    except remote_media.FetchRefused as error:
        raise OpenAIError(error.status, f"{what}: {error}", param=what) from None


def decode_part(kind: str, data: bytes, what: str, settings: Settings) -> tuple[Any, list[str]]:
    """Bytes of one media part to the engine's input and its decoding warnings (runs in a worker thread)."""
    try:
        return decode_media(kind, io.BytesIO(data), settings)
    except media.MediaError as error:
        raise OpenAIError(MEDIA_STATUS[type(error)], f"{what}: {error}", param=what) from None


def count_parts(messages: list[Message], settings: Settings) -> None:
    """MAX_FILES_PER_FIELD applies to each kind of media part (images, audios, videos), before any is read."""
    counts = {"image": 0, "audio": 0, "video": 0}
    for message in messages:
        for part in message.content if isinstance(message.content, list) else []:
            if part.type in KINDS:
                counts[KINDS[part.type]] += 1
    for kind, count in counts.items():
        if count > settings.max_files_per_field:
            raise OpenAIError(
                413,
                f"messages: {count} {kind} parts, at most {settings.max_files_per_field} are accepted "
                "(MAX_FILES_PER_FIELD)",
                param="messages",
            )


async def to_turns(
    request: Request, messages: list[Message], settings: Settings
) -> tuple[list[ChatTurn], list[str], list[tuple[str, media.PictureFile]]]:
    """OpenAI messages as the engine's turns, media decoded in order (in the bounded decoding pool), what
    decoding warned of, and the pictures still to be checked (`uploads.check_pictures`)."""
    count_parts(messages, settings)
    turns = []
    warnings: list[str] = []
    pictures: list[tuple[str, media.PictureFile]] = []
    for m_index, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if message.content is None or isinstance(message.content, str):
            turns.append(ChatTurn(role, [message.content or ""]))
            continue
        parts: list = []
        for p_index, part in enumerate(message.content):
            what = f"messages[{m_index}].content[{p_index}]"
            if part.type == "text":
                if part.text is None:
                    raise OpenAIError(400, f"{what}: text is missing", param=what)
                parts.append(part.text)
                continue
            if role != "user":
                raise OpenAIError(400, f"{what}: media is only accepted in user messages", param=what)
            if part.type == "input_audio":
                if part.input_audio is None:
                    raise OpenAIError(400, f"{what}: input_audio is missing", param=what)
                data = await fetch_media(f"data:;base64,{part.input_audio.data}", what, settings)
            else:
                reference = getattr(part, part.type)
                if reference is None:
                    raise OpenAIError(400, f"{what}: {part.type} is missing", param=what)
                url = reference if isinstance(reference, str) else reference.url
                data = await fetch_media(url, what, settings)
            value, decoded_notes = await decode_off_loop(request, decode_part, KINDS[part.type], data, what, settings)
            del data
            parts.append(value)
            warnings += [f"{what}: {note}" for note in decoded_notes]
            if isinstance(value, media.PictureFile):
                pictures.append((what, value))
        turns.append(ChatTurn(role, parts))
    for m_index, turn in enumerate(turns):
        if turn.role == "user" and not any(not isinstance(part, str) or part.strip() for part in turn.parts):
            what = f"messages[{m_index}].content"
            raise OpenAIError(400, f"{what}: a user message needs text or media; this one is empty", param=what)
    return turns, warnings, pictures


def without_video_audio(turns: list[ChatTurn]) -> list[ChatTurn]:
    """The turns with each video's own audio track left out (`use_audio_in_video: false`)."""
    return [
        ChatTurn(turn.role, [replace(p, audio=None) if isinstance(p, VideoInput) else p for p in turn.parts])
        for turn in turns
    ]


# ---------------------------------------------------------------- responses


def chunk(
    completion_id: str,
    model: str,
    delta: dict | None,
    finish_reason: str | None = None,
    usage: dict | None = None,
    warnings: list[str] | None = None,
) -> str:
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["usage"] = usage
    if warnings:  # not OpenAI's: what decoding recovered, or a shortened bound
        body["warnings"] = warnings
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def usage_of(result: GenerationResult) -> dict[str, Any]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"by_modality": result.prompt_tokens_by_modality},
    }


def audio_of(result: GenerationResult, audio_format: str = "wav") -> dict[str, Any] | None:
    if result.audio is None:
        return None
    data = wav_bytes(result.audio, SPEECH_SAMPLE_RATE) if audio_format == "wav" else pcm16(result.audio)
    return {
        "id": f"audio_{uuid.uuid4().hex[:24]}",
        "data": pybase64.b64encode_as_string(data),
        "expires_at": int(time.time()) + AUDIO_LIFETIME_SECONDS,
        "transcript": result.text,
    }


def pcm16(samples) -> bytes:
    """Float samples as raw 16-bit little-endian PCM, the format of streamed audio."""
    return (np.clip(samples, -1.0, 1.0) * 32767).round().astype("<i2").tobytes()


def stream_events(
    generation: GenerationRequest,
    worker: ModelWorker,
    engine,
    model: str,
    include_usage: bool,
    timeout: float,
    started: float,
    warnings: list[str] | None = None,
    place: Place | None = None,
) -> AsyncIterator[str]:
    """Server-Sent Events of chat.completion.chunk objects, text as it is generated, then [DONE].

    A spoken answer streams as OpenAI streams one: `delta.audio` objects carrying its `id`, the text as
    `transcript` deltas, then base64 PCM16 `data` (24 kHz mono) as token2wav makes it, and last its
    `expires_at`. The job is queued when the stream starts, not before: a client that leaves before the
    first byte leaves no job behind. A client that disconnects later cancels this generator: the thinker,
    talker or token2wav then stops at its next step; the request's deadline (`started + timeout`) stops
    it whoever listens.
    """
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    generation.on_text = lambda text: loop.call_soon_threadsafe(deltas.put_nowait, ("text", text))
    if generation.return_audio:
        generation.on_audio = lambda samples: loop.call_soon_threadsafe(deltas.put_nowait, ("audio", samples))
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    audio_id = f"audio_{uuid.uuid4().hex[:24]}"
    deadline = started + timeout

    def timed_out() -> OpenAIError:
        message = f"the request took longer than {timeout:g} s (REQUEST_TIMEOUT_SECONDS)"
        return OpenAIError(504, message, kind="server_error", code="timeout")

    def delta(kind: str, value: Any) -> dict[str, Any]:
        if not generation.return_audio:
            return {"content": value}
        if kind == "text":
            return {"audio": {"id": audio_id, "transcript": value}}
        return {"audio": {"id": audio_id, "data": pybase64.b64encode_as_string(pcm16(value))}}

    async def events() -> AsyncIterator[str]:
        job: Job | None = None
        first_token = True
        try:
            job = Job(worker, engine, generation, place, deadline)
            finished = asyncio.wrap_future(job.future)
            yield chunk(completion_id, model, {"role": "assistant", "content": ""}, warnings=warnings)
            while not finished.done() or not deltas.empty():
                getter = asyncio.ensure_future(deltas.get())
                done, _ = await asyncio.wait(
                    {getter, finished},
                    timeout=max(0.0, deadline - time.perf_counter()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if getter in done:
                    if first_token and place is not None and place.metrics is not None:
                        place.metrics.first_token_seconds.observe(time.perf_counter() - started)
                    first_token = False
                    yield chunk(completion_id, model, delta(*getter.result()))
                    continue
                getter.cancel()
                if not done or finished.cancelled() or job.timed_out:
                    raise timed_out()
            if job.timed_out:
                raise timed_out()
            result: GenerationResult = finished.result()
            if result.audio is not None:  # an engine that made its audio in one piece
                yield chunk(completion_id, model, delta("audio", result.audio))
            if generation.return_audio:
                expires = int(time.time()) + AUDIO_LIFETIME_SECONDS
                yield chunk(completion_id, model, {"audio": {"id": audio_id, "expires_at": expires}})
            yield chunk(completion_id, model, {}, finish_reason=result.finish_reason, warnings=result.warnings)
            if include_usage:
                yield chunk(completion_id, model, None, usage=usage_of(result))
        except (
            OpenAIError,
            InputRejected,
            SpeechError,
            HTTPException,
            Cancelled,
            OutOfMemory,
            EngineUnavailable,
        ) as error:
            if isinstance(error, OutOfMemory):  # the status is sent already: the event carries it
                http = out_of_memory_error(error)
                error = OpenAIError(http.status_code, http.detail, kind="server_error", code="out_of_memory")
            elif isinstance(error, EngineUnavailable):
                error = OpenAIError(error.status, str(error), kind="server_error")
            elif isinstance(error, HTTPException):
                error = OpenAIError(error.status_code, str(error.detail), kind="server_error")
            elif isinstance(error, Cancelled):
                error = timed_out()
            elif not isinstance(error, OpenAIError):
                error = OpenAIError(
                    400, str(error), code="context_length_exceeded" if isinstance(error, PromptTooLong) else None
                )
            yield f"data: {json.dumps({'error': error.payload()})}\n\n"
        finally:
            if job is not None:
                job.abandon()
            elif place is not None:
                place.release()
        yield "data: [DONE]\n\n"

    return events()


class EventStream(StreamingResponse):
    """Server-Sent Events that, however the response ends (a client gone before the first byte included),
    close their generator and give back the request's place in the queue if its job was never queued."""

    def __init__(self, events: AsyncIterator[str], place: Place | None = None) -> None:
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.place = place

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            if self.place is not None:
                self.place.release()


def sse(events: AsyncIterator[str], place: Place | None = None) -> StreamingResponse:
    return EventStream(events, place)


# ---------------------------------------------------------------- routes


@router.get("/models")
async def list_models(engine: EngineDep) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": engine.describe()["model"], "object": "model", "created": 0, "owned_by": "qwen"}],
    }


@router.post("/chat/completions")
async def chat_completions(
    request: Request, body: ChatCompletionRequest, settings: SettingsDep, engine: EngineDep, worker: WorkerDep
):
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.default_max_new_tokens
    if max_tokens > settings.max_new_tokens_limit:
        raise OpenAIError(
            400, f"max_tokens: at most {settings.max_new_tokens_limit} (MAX_NEW_TOKENS_LIMIT)", param="max_tokens"
        )
    speak = "audio" in body.modalities
    voice = None
    if speak:
        try:
            voice = engine.check_speech(body.audio.voice if body.audio else None)
        except SpeechError as error:
            raise OpenAIError(
                400, str(error), param="audio.voice" if body.audio and body.audio.voice else "modalities"
            ) from None
        if body.stream and body.audio and body.audio.format == "wav":
            raise OpenAIError(
                400,
                "audio.format: streamed speech arrives as pcm16 chunks (raw 24 kHz mono, 16-bit); "
                "send format pcm16, or stream=false for one WAV",
                param="audio.format",
            )
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    options = body.mm_processor_kwargs or ProcessorOptions()
    if options.max_pixels is not None and options.max_pixels > settings.max_pixels_ceiling:
        raise OpenAIError(
            400,
            f"mm_processor_kwargs.max_pixels: at most {settings.max_pixels_ceiling:,} (MAX_PIXELS_CEILING)",
            param="mm_processor_kwargs.max_pixels",
        )
    started = request_started(request)
    place = admit(request)  # a 503 now, before any media is decoded, when the queue is full
    try:
        turns, warnings, pictures = await to_turns(request, body.messages, settings)
        if options.use_audio_in_video is False:
            turns = without_video_audio(turns)
        generation = GenerationRequest(
            text=None,
            system_prompt=None,
            turns=turns,
            max_new_tokens=max_tokens,
            return_audio=speak,
            speaker=voice,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=None if body.top_k is None else max(0, body.top_k),
            seed=body.seed,
            stop_strings=stops,
            max_pixels=options.max_pixels,
        )
        del turns
        model = engine.describe()["model"]
        timeout = settings.request_timeout_seconds
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            generation = await check_pictures_first(request, settings, generation, pictures, warnings)
            events = stream_events(generation, worker, engine, model, include_usage, timeout, started, warnings, place)
            return sse(events, place)
        try:
            result = await run_generation_checking(
                request, settings, worker, engine, generation, pictures, timeout, started, place
            )
        except PromptTooLong as error:
            raise OpenAIError(400, str(error), code="context_length_exceeded") from None
        except InputRejected as error:
            raise OpenAIError(400, str(error)) from None
    except BaseException:
        place.release()
        raise
    message: dict[str, Any] = {"role": "assistant", "content": result.text}
    if (audio := audio_of(result, (body.audio.format if body.audio else None) or "wav")) is not None:
        message["audio"] = audio
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason}],
        "usage": usage_of(result),
        "warnings": warnings + result.warnings,  # not OpenAI's: what decoding recovered, or a shortened bound
    }
