"""POST /multimodal: text, images, audio and video in one multipart form; the answer as JSON, WAV or
Server-Sent Events."""

from __future__ import annotations

import time
import urllib.parse
from typing import Any

import pybase64
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from qwen_omni_server.api.admission import (
    Place,
    admit,
    check_pictures_first,
    check_room,
    decode_off_loop,
    run_generation_checking,
)
from qwen_omni_server.api.errors import ApiError
from qwen_omni_server.api.limits import check_limits
from qwen_omni_server.api.protocol import FILE_FIELDS, FORM_FIELDS, FORM_OPENAPI, MultimodalForm
from qwen_omni_server.api.sse import Stream, streamed
from qwen_omni_server.api.state import EngineDep, SettingsDep, WorkerDep, request_started
from qwen_omni_server.api.uploads import DecodeOptions, check_uploads, close_form, decode_uploads, read_form
from qwen_omni_server.core.audio import SPEECH_SAMPLE_RATE, wav_bytes
from qwen_omni_server.core.engine import Engine, Worker
from qwen_omni_server.core.errors import SpeechError
from qwen_omni_server.core.settings import Settings
from qwen_omni_server.core.types import GenerationRequest, GenerationResult

router = APIRouter()


@router.post("/multimodal", openapi_extra=FORM_OPENAPI)
async def multimodal(request: Request, settings: SettingsDep, engine: EngineDep, worker: WorkerDep):
    """Text, images, audio and video in one multipart form; the answer as JSON, WAV or Server-Sent Events."""
    started = request_started(request)
    check_room(request)  # a full queue answers 503 now, before the body is read
    place, form = None, None
    try:
        form = await read_form(request, settings, FORM_FIELDS, FILE_FIELDS)
        place = admit(request)  # the body is in: a place for work, before its files are decoded
        return await answer_form(request, settings, engine, worker, form, place, started)
    except BaseException:
        if place is not None:
            place.release()
        raise
    finally:
        await close_form(form)


def files_of(form: FormData, name: str) -> list[UploadFile]:
    """The files of a file field (the form parser lets no plain value into one)."""
    return [value for value in form.getlist(name) if isinstance(value, UploadFile)]


def form_fields(settings: Settings, form: FormData, engine: Engine) -> tuple[MultimodalForm, str | None]:
    """The form's value fields, checked (types, limits, combinations), and the voice to speak with."""
    values = {name: form.getlist(name)[-1] for name in FORM_FIELDS - FILE_FIELDS if form.getlist(name)}
    try:
        fields = MultimodalForm.model_validate(values)
    except ValidationError as error:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in error.errors()]) from None
    unknown = sorted(set(form.keys()) - FORM_FIELDS)
    if unknown:
        raise ApiError(422, f"unknown form field(s) {unknown}; accepted: {', '.join(sorted(FORM_FIELDS))}")
    check_limits(
        settings,
        max_new_tokens=("max_new_tokens", fields.max_new_tokens),
        max_pixels=("max_pixels", fields.max_pixels),
        texts={"text": fields.text, "system_prompt": fields.system_prompt},
    )
    if fields.stream and fields.response_format == "wav":
        raise ApiError(422, "response_format=wav cannot be streamed: send stream=false")
    if fields.response_format == "wav" and not fields.return_audio:
        raise ApiError(422, "response_format=wav returns the spoken answer: also send return_audio=true")
    if not fields.return_audio:
        return fields, fields.speaker
    try:
        return fields, engine.check_speech(fields.speaker)
    except SpeechError as error:
        raise ApiError(400, f"{'speaker' if engine.voices and fields.speaker else 'return_audio'}: {error}") from None


async def answer_form(
    request: Request, settings: Settings, engine: Engine, worker: Worker, form: FormData, place: Place, started: float
):
    """The /multimodal answer for a form read within the limits."""
    fields, speaker = form_fields(settings, form, engine)
    uploads = check_uploads(settings, {name: files_of(form, name) for name in sorted(FILE_FIELDS)})
    text = fields.text if fields.text and fields.text.strip() else None
    if text is None and not any(uploads.values()):
        raise ApiError(422, "send `text`, or at least one file in `images`, `audios` or `videos`")
    options = DecodeOptions(fields.extract_video_audio, fields.extract_video_frame, engine.passes_files)
    inputs = await decode_off_loop(request, decode_uploads, settings, uploads, options)
    await close_form(form)  # the decoded inputs are all that is kept from here on
    decoded = time.perf_counter()
    generation = GenerationRequest(
        text=text,
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
        return streamed(generation, Stream(worker, engine, model, True, timeout, started, warnings, place))
    result = await run_generation_checking(
        request, settings, worker, engine, generation, pictures, timeout, started, place
    )
    if result.audio is not None and fields.response_format == "wav":
        return Response(wav_bytes(result.audio), media_type="audio/wav", headers=text_headers(result.text))
    return json_answer(result, warnings, model, (decoded - started) * 1000, (time.perf_counter() - started) * 1000)


TEXT_HEADER_BYTES = 4096
TEXT_NOTE = "X-Text holds the start of the text; response_format=json with return_audio=true has all of it"


def text_headers(text: str, limit: int = TEXT_HEADER_BYTES) -> dict[str, str]:
    """A WAV answer's text headers: X-Text, the text percent-encoded (UTF-8), at most `limit` bytes cut after a
    whole character; when cut, X-Text-Truncated and X-Text-Note (proxies and clients refuse long headers)."""
    encoded = urllib.parse.quote(text)
    if len(encoded) <= limit:
        return {"X-Text": encoded}
    pieces: list[str] = []
    size = 0
    for character in text:
        piece = urllib.parse.quote(character)
        if size + len(piece) > limit:
            break
        pieces.append(piece)
        size += len(piece)
    return {"X-Text": "".join(pieces), "X-Text-Truncated": "true", "X-Text-Note": TEXT_NOTE}


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
            "data": pybase64.b64encode_as_string(wav_bytes(result.audio)),
            "seconds": round(len(result.audio) / SPEECH_SAMPLE_RATE, 3),
        }
    return body
