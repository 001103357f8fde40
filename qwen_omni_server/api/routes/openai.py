"""OpenAI-compatible routes: POST /v1/chat/completions (streaming too) and GET /v1/models.

The request shape is the one vLLM accepts for Qwen2.5-Omni (`api.protocol`): `messages` whose content is
a string or a list of `text`, `image_url`, `input_audio`, `audio_url` and `video_url` parts, with media as
data URLs (remote URLs only for hosts listed in MEDIA_URL_HOSTS). All media decodes as uploads do, with the
same limits as /multimodal. Errors use OpenAI's shape (`api.errors`).
"""

from __future__ import annotations

import io
import time
import uuid
from dataclasses import replace
from typing import Any

import pybase64
from fastapi import APIRouter, Request

from qwen_omni_server.api import media_urls
from qwen_omni_server.api.admission import (
    Place,
    admit,
    check_pictures_first,
    check_room,
    decode_off_loop,
    run_generation_checking,
)
from qwen_omni_server.api.errors import ApiError, api_error
from qwen_omni_server.api.json_body import ChatBody, parse_chat, read_body
from qwen_omni_server.api.limits import check_limits
from qwen_omni_server.api.protocol import CHAT_OPENAPI, ChatCompletionRequest, ContentPart, Message, ProcessorOptions
from qwen_omni_server.api.sse import AUDIO_LIFETIME_SECONDS, EventStream, Stream, streamed, usage_of
from qwen_omni_server.api.state import EngineDep, SettingsDep, WorkerDep, request_started
from qwen_omni_server.api.uploads import DecodeOptions, decode_parts
from qwen_omni_server.core import media
from qwen_omni_server.core.audio import pcm16, wav_bytes
from qwen_omni_server.core.engine import Engine, Worker
from qwen_omni_server.core.errors import SpeechError
from qwen_omni_server.core.settings import Settings
from qwen_omni_server.core.types import ChatTurn, GenerationRequest, GenerationResult, VideoInput

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
KINDS = {"image_url": "image", "input_audio": "audio", "audio_url": "audio", "video_url": "video"}
Pictures = list[tuple[str, media.PictureFile]]


# ---------------------------------------------------------------- messages to turns


def count_parts(messages: list[Message], settings: Settings) -> None:
    """MAX_FILES_PER_FIELD applies to each kind of media part (images, audios, videos), before any is read."""
    counts = {"image": 0, "audio": 0, "video": 0}
    for message in messages:
        for part in message.content if isinstance(message.content, list) else []:
            if part.type in KINDS:
                counts[KINDS[part.type]] += 1
    for kind, count in counts.items():
        if count > settings.max_files_per_field:
            raise ApiError(
                413,
                f"messages: {count} {kind} parts, at most {settings.max_files_per_field} are accepted "
                "(MAX_FILES_PER_FIELD)",
                param="messages",
            )


def part_url(part: ContentPart, what: str) -> str:
    """Where a media part's bytes are: its URL, or its input_audio's base64 as a data URL."""
    if part.type == "input_audio":
        if part.input_audio is None:
            raise ApiError(400, f"{what}: input_audio is missing", param=what)
        return f"data:;base64,{part.input_audio.data}"
    reference = getattr(part, part.type)
    if reference is None:
        raise ApiError(400, f"{what}: {part.type} is missing", param=what)
    return reference if isinstance(reference, str) else reference.url


def decode_part(
    kind: str, data: bytes, what: str, settings: Settings, options: DecodeOptions
) -> tuple[list[Any], list[str]]:
    """Bytes of one media part to what the engine gets (a video with the video options: its frame and/or its
    sound) and its decoding warnings (runs in the decoding pool)."""
    try:
        return decode_parts(kind, io.BytesIO(data), settings, options)
    except media.MediaError as error:
        raise api_error(error, prefix=what, param=what) from None


async def media_part(
    request: Request, body: ChatBody, part: ContentPart, what: str, settings: Settings, engine: Engine
) -> tuple[list[Any], list[str]]:
    """One media part read (data URL, lifted out of the body or not, or allowed remote URL) and decoded; what it
    became and its warnings."""
    url = part_url(part, what)
    try:
        if (payload := body.payload(url)) is not None:
            data = await decode_off_loop(request, media_urls.base64_bytes, payload, settings.max_file_bytes)
        else:
            data = await media_urls.read_url(url, settings)
    except media_urls.FetchRefused as error:
        raise api_error(error, prefix=what, param=what) from None
    options = DecodeOptions(body.request.extract_video_audio, body.request.extract_video_frame, engine.passes_files)
    return await decode_off_loop(request, decode_part, KINDS[part.type], data, what, settings, options)


async def to_turns(
    request: Request, body: ChatBody, settings: Settings, engine: Engine
) -> tuple[list[ChatTurn], list[str], Pictures]:
    """The body's messages as the engine's turns, media decoded in order (in the bounded decoding pool), what
    decoding warned of, and the pictures still to be checked (`uploads.check_pictures`)."""
    messages = body.request.messages
    count_parts(messages, settings)
    turns, warnings, pictures = [], [], []
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
                    raise ApiError(400, f"{what}: text is missing", param=what)
                parts.append(part.text)
                continue
            if role != "user":
                raise ApiError(400, f"{what}: media is only accepted in user messages", param=what)
            values, notes = await media_part(request, body, part, what, settings, engine)
            parts += values
            warnings += [f"{what}: {note}" for note in notes]
            pictures += [(what, value) for value in values if isinstance(value, media.PictureFile)]
        turns.append(ChatTurn(role, parts))
    for m_index, turn in enumerate(turns):
        if turn.role == "user" and not any(not isinstance(part, str) or part.strip() for part in turn.parts):
            what = f"messages[{m_index}].content"
            raise ApiError(400, f"{what}: a user message needs text or media; this one is empty", param=what)
    return turns, warnings, pictures


def without_video_audio(turns: list[ChatTurn]) -> list[ChatTurn]:
    """The turns with each video's own audio track left out (`use_audio_in_video: false`)."""
    return [
        ChatTurn(turn.role, [replace(p, audio=None) if isinstance(p, VideoInput) else p for p in turn.parts])
        for turn in turns
    ]


# ---------------------------------------------------------------- the request's checks and the answer


def check_request(body: ChatCompletionRequest, settings: Settings, engine: Engine) -> str | None:
    """The checks that need no media: limits, and speech (the voice to speak with, when it is asked for)."""
    options = body.mm_processor_kwargs or ProcessorOptions()
    check_limits(settings, max_new_tokens=("max_tokens", max_tokens(body, settings)), texts=texts_of(body.messages))
    voice = check_voice(body, engine)
    check_limits(settings, max_pixels=("mm_processor_kwargs.max_pixels", options.max_pixels))
    return voice


def texts_of(messages: list[Message]) -> dict[str, str | None]:
    """Every text of the messages, by where it is (each held to MAX_TEXT_CHARS)."""
    texts: dict[str, str | None] = {}
    for m_index, message in enumerate(messages):
        if isinstance(message.content, str):
            texts[f"messages[{m_index}].content"] = message.content
        for p_index, part in enumerate(message.content if isinstance(message.content, list) else []):
            texts[f"messages[{m_index}].content[{p_index}].text"] = part.text
    return texts


def max_tokens(body: ChatCompletionRequest, settings: Settings) -> int:
    """The answer's bound: the request's, else DEFAULT_MAX_NEW_TOKENS."""
    return body.max_completion_tokens or body.max_tokens or settings.default_max_new_tokens


def check_voice(body: ChatCompletionRequest, engine: Engine) -> str | None:
    """The voice to speak with, when speech is asked for (a 400 when it cannot be given)."""
    if "audio" not in body.modalities:
        return None
    try:
        voice = engine.check_speech(body.audio.voice if body.audio else None)
    except SpeechError as error:
        raise ApiError(
            400, str(error), param="audio.voice" if body.audio and body.audio.voice else "modalities"
        ) from None
    if body.stream and body.audio and body.audio.format == "wav":
        raise ApiError(
            400,
            "audio.format: streamed speech arrives as pcm16 chunks (raw 24 kHz mono, 16-bit); "
            "send format pcm16, or stream=false for one WAV",
            param="audio.format",
        )
    return voice


def generation_of(
    body: ChatCompletionRequest, settings: Settings, turns: list[ChatTurn], voice: str | None
) -> GenerationRequest:
    """The engine's request for this body's decoded turns."""
    options = body.mm_processor_kwargs or ProcessorOptions()
    return GenerationRequest(
        text=None,
        system_prompt=None,
        turns=without_video_audio(turns) if options.use_audio_in_video is False else turns,
        max_new_tokens=max_tokens(body, settings),
        return_audio="audio" in body.modalities,
        speaker=voice,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=None if body.top_k is None else max(0, body.top_k),
        seed=body.seed,
        stop_strings=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        max_pixels=options.max_pixels,
    )


def audio_of(result: GenerationResult, audio_format: str = "wav") -> dict[str, Any] | None:
    if result.audio is None:
        return None
    data = wav_bytes(result.audio) if audio_format == "wav" else pcm16(result.audio)
    return {
        "id": f"audio_{uuid.uuid4().hex[:24]}",
        "data": pybase64.b64encode_as_string(data),
        "expires_at": int(time.time()) + AUDIO_LIFETIME_SECONDS,
        "transcript": result.text,
    }


def completion(body: ChatCompletionRequest, result: GenerationResult, model: str, warnings: list[str]) -> dict:
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
        "inputs": result.inputs,  # not OpenAI's: what the model got of each file (as /multimodal says)
        "warnings": warnings + result.warnings,  # not OpenAI's: what decoding recovered, or a shortened bound
    }


# ---------------------------------------------------------------- routes


@router.get("/models")
async def list_models(engine: EngineDep) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": engine.describe()["model"], "object": "model", "created": 0, "owned_by": "qwen"}],
    }


@router.post("/chat/completions", openapi_extra=CHAT_OPENAPI)
async def chat_completions(request: Request, settings: SettingsDep, engine: EngineDep, worker: WorkerDep):
    """OpenAI's Chat Completions (see the module docstring): the body is read as it arrives, within MAX_REQUEST_MB
    and BODY_TIMEOUT_SECONDS, and parsed off the event loop (`api.json_body`) once it holds a place for work."""
    started = request_started(request)
    check_room(request)  # a full queue answers 503 now, before the body is read
    data = await read_body(request)
    place = admit(request)
    try:
        parsed = await decode_off_loop(request, parse_chat, data, settings.max_json_bytes)
        del data
        voice = check_request(parsed.request, settings, engine)
        return await answer(request, parsed, settings, engine, worker, voice, place, started)
    except BaseException:
        place.release()
        raise


async def answer(
    request: Request,
    parsed: ChatBody,
    settings: Settings,
    engine: Engine,
    worker: Worker,
    voice: str | None,
    place: Place,
    started: float,
) -> EventStream | dict[str, Any]:
    """The answer to a checked body, streamed or whole."""
    turns, warnings, pictures = await to_turns(request, parsed, settings, engine)
    parsed.media.clear()  # decoded: the body as it arrived (its memory map) goes now, not after the answer
    body = parsed.request
    generation = generation_of(body, settings, turns, voice)
    del turns
    model = engine.describe()["model"]
    timeout = settings.request_timeout_seconds
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        generation = await check_pictures_first(request, settings, generation, pictures, warnings)
        return streamed(generation, Stream(worker, engine, model, include_usage, timeout, started, warnings, place))
    result = await run_generation_checking(
        request, settings, worker, engine, generation, pictures, timeout, started, place
    )
    return completion(body, result, model, warnings)
