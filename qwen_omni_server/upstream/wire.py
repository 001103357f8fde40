"""The wire format of ENGINE=openai: a request as a Chat Completions body (the shape vLLM documents for
Qwen2.5-Omni), and the upstream's answer, whole or streamed, as a result.

Media goes upstream as data URLs: pictures as they came when they are whole, upright, plain RGB JPEG, PNG or
WebP (`media.PictureFile`: the routes decode them in full while the upstream works), else as lossless PNG
`image_url`s of the pixels decoded here (so any format the server reads works upstream), first resized to the
request's pixel budget as the local model's processor resizes them; audio as 16 kHz
float WAV `input_audio`; each video as its own file in a `video_url`, with
`mm_processor_kwargs: {"use_audio_in_video": true}` when they all carry sound (else each sounding video's track
follows it as audio: as the local model reads them). `mm_processor_kwargs` goes only when it changes something:
vLLM refuses it unless started with --trust-request-mm-kwargs, and reads no video's sound unless told to
(`use_audio_in_video: false` goes only to this server, which reads it unless told not to). vLLM 0.32 takes a
video's sound only when the request has no other audio: there each track goes as audio, with a warning. The
conversation is the one the local engine reads (`core.conversation`). Answers are always streamed from the
upstream (see `UpstreamEngine`), but speech, which asks for `modalities: ["text", "audio"]` (vLLM-Omni and this
server give it; plain vLLM does not).
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
import pybase64
from PIL import Image

from qwen_omni_server.core.audio import float_wav_bytes, read_wav
from qwen_omni_server.core.conversation import interleaves_video_audio, videos_of
from qwen_omni_server.core.errors import EngineUnavailable, InputRejected, PromptTooLong
from qwen_omni_server.core.media import PictureFile
from qwen_omni_server.core.settings import BudgetSettings
from qwen_omni_server.core.types import ChatTurn, GenerationRequest, GenerationResult, VideoInput


class Retry(Exception):
    """The upstream failed before any text reached the client: another may take the request."""


TRUST_FLAG = "--trust-request-mm-kwargs"
SPLIT_TRACKS = (
    "vLLM takes a video's own sound only in a request with no other audio: each video's sound went to the "
    "upstream as audio after its video, not interleaved with its frames"
)


# ---------------------------------------------------------------- the request


def chat_body(
    request: GenerationRequest, turns: list[ChatTurn], budgets: BudgetSettings, vllm: bool = True
) -> tuple[dict[str, Any], list[str]]:
    """`request`, whose conversation is `turns` (`core.conversation`, as the local engine reads it), as a Chat
    Completions body (without `model`) for a vLLM upstream (`vllm`) or this server: messages, decoding, media
    options, speech; and the warnings the answer gets for what had to change. Decoded pictures are sent within
    the pixel budget the local engine gives them: the request's max_pixels (at most MAX_PIXELS_CEILING), else
    IMAGE_MAX_PIXELS."""
    videos = videos_of(turns)
    # As the local model: every video's sound interleaved with its frames, or (some silent) each track after
    # its video as plain audio, the upstream then not taking the tracks from the files itself.
    interleave = interleaves_video_audio(videos)
    warnings = []
    if interleave and vllm and _has_other_audio(turns):  # vLLM 0.32 refuses it ("requires equal number")
        interleave, warnings = False, [SPLIT_TRACKS]
    max_pixels = min(request.max_pixels, budgets.max_pixels_ceiling) if request.max_pixels else budgets.image_max_pixels
    body: dict[str, Any] = {
        "messages": [{"role": turn.role, "content": _content(turn.parts, interleave, max_pixels)} for turn in turns],
        "max_tokens": request.max_new_tokens,
        # Streamed, so that an upstream that stops sending is noticed (UPSTREAM_IDLE_SECONDS); vLLM-Omni gives
        # speech in one piece.
        "stream": not request.return_audio,
        **_decoding(request),
    }
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    processor: dict[str, Any] = {}
    if interleave:
        processor["use_audio_in_video"] = True
    elif not vllm and any(video.audio is not None for video in videos):
        processor["use_audio_in_video"] = False  # this server reads a video's sound unless told not to
    if request.max_pixels is not None:
        processor["max_pixels"] = request.max_pixels
    if processor:
        body["mm_processor_kwargs"] = processor
    if request.return_audio:
        body["modalities"] = ["text", "audio"]
        body["audio"] = {"format": "wav", **({"voice": request.speaker} if request.speaker else {})}
    return body, warnings


def _has_other_audio(turns: list[ChatTurn]) -> bool:
    """Whether the conversation has audio besides its videos' own tracks."""
    return any(isinstance(part, np.ndarray) for turn in turns for part in turn.parts)


def _decoding(request: GenerationRequest) -> dict[str, Any]:
    """Sampling, seed and stop strings as the body's fields; what the request leaves unset, the upstream's."""
    sampling = {"temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k}
    if sampling["top_k"] == 0:
        sampling["top_k"] = -1  # off, in vLLM's terms
    fields: dict[str, Any] = {name: value for name, value in sampling.items() if value is not None}
    if request.seed is not None:
        fields["seed"] = request.seed
    if request.stop_strings:
        fields["stop"] = request.stop_strings
    return fields


def _content(parts: list, interleave: bool, max_pixels: int) -> list[dict[str, Any]]:
    content = []
    for part in parts:
        content.append(content_part(part, max_pixels))
        if isinstance(part, VideoInput) and part.audio is not None and not interleave:
            content.append(content_part(part.audio, max_pixels))
    return content


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def content_part(part: Any, max_pixels: int) -> dict[str, Any]:
    """One part of a turn as a Chat Completions content part; media as data URLs, decoded pictures within
    `max_pixels`."""
    if isinstance(part, str):
        return text_part(part)
    if isinstance(part, PictureFile):
        return {"type": "image_url", "image_url": {"url": data_url(part.mime, part.data)}}
    if isinstance(part, Image.Image):
        return {"type": "image_url", "image_url": {"url": data_url("image/png", picture_png(part, max_pixels))}}
    if isinstance(part, np.ndarray):  # exactly the decoded samples
        return {
            "type": "input_audio",
            "input_audio": {"data": pybase64.b64encode_as_string(float_wav_bytes(part)), "format": "wav"},
        }
    if isinstance(part, VideoInput):
        if part.source is None:
            raise InputRejected("a video can only be sent upstream as its file, and this one has none")
        return {"type": "video_url", "video_url": {"url": data_url("video/mp4", part.source)}}
    raise TypeError(f"unknown part {type(part).__name__}")


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{pybase64.b64encode_as_string(data)}"


PATCH_SIDE = 28  # the model's pictures are resized to multiples of this (14-pixel patches, merged 2 x 2)


def budget_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The size the model's processor (qwen-omni-utils' smart_resize) gives a picture over `max_pixels`: its
    aspect ratio kept, each side a multiple of 28, at most `max_pixels`; a picture within it keeps its size."""
    side = PATCH_SIDE
    if max(side, round(width / side) * side) * max(side, round(height / side) * side) <= max_pixels:
        return width, height
    scale = math.sqrt(width * height / max_pixels)
    return max(side, math.floor(width / scale / side) * side), max(side, math.floor(height / scale / side) * side)


def picture_png(picture: Image.Image, max_pixels: int) -> bytes:
    """Pixels decoded here as a PNG (lossless; a fast compression level), resized as the model's processor
    resizes them when over `max_pixels` (the same size and filter: the upstream then leaves them as they are)."""
    size = budget_size(picture.width, picture.height, max_pixels)
    if size != picture.size:
        picture = picture.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    picture.save(out, "PNG", compress_level=1)
    return out.getvalue()


# ---------------------------------------------------------------- the answer


def upstream_error(status: int, raw: bytes) -> Exception:
    """An upstream's error answer as the exception the routes map: a refusal of the input stays the client's."""
    try:
        payload = json.loads(raw)
        error = payload.get("error") if isinstance(payload.get("error"), dict) else {}
        message = str(error.get("message") or payload.get("detail") or payload.get("message") or raw[:300])
        code = error.get("code")
    except (ValueError, AttributeError):
        message, code = raw[:300].decode("utf-8", "replace"), None
    if status >= 500 or status == 429:
        return Retry(f"HTTP {status}: {message}")
    if TRUST_FLAG in message:
        return EngineUnavailable(  # the upstream's configuration, not the client's request
            f"the upstream refuses per-request processor options (mm_processor_kwargs, sent for a video's own "
            f"sound and for max_pixels): start vLLM with {TRUST_FLAG} (upstream said: {message})",
            502,
        )
    if status in (401, 403):
        return EngineUnavailable(f"the upstream refused this server's key (ENGINE_API_KEY): {message}", 502)
    if code == "context_length_exceeded" or "context length" in message.lower():
        return PromptTooLong(f"the upstream refused the prompt: {message}")
    return InputRejected(f"the upstream refused the request: {message}")


def _usage(usage: dict[str, Any] | None) -> tuple[int, int, dict[str, int]]:
    usage = usage or {}
    details = usage.get("prompt_tokens_details") or {}
    by_modality = details.get("by_modality") if isinstance(details, dict) else None
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), dict(by_modality or {})


def _speech(audio: dict[str, Any] | None) -> np.ndarray | None:
    """A base64 WAV from the upstream as float32 mono at the speech rate."""
    if not audio or not audio.get("data"):
        return None
    return read_wav(pybase64.b64decode(audio["data"]))


def _finished(finish: str) -> str:
    """`finish`, unless the upstream gave up the generation: vLLM stopping (SIGTERM) ends its requests with
    finish_reason "abort", a failure of its engine with "error"; the text is then cut short, not an answer."""
    if finish in ("abort", "error"):
        raise Retry(f"the upstream ended the generation with finish_reason {finish!r}")
    return finish


def _emit(request: GenerationRequest, delivered: list[str], text: str) -> None:
    """Pass `text` to a streaming client; once any has gone out, the request can no longer be retried elsewhere."""
    if text and request.on_text is not None:
        delivered.append(text)
        request.on_text(text)


def _with_speech_note(request: GenerationRequest, audio: np.ndarray | None, warnings: list[str]) -> list[str]:
    if request.return_audio and audio is None:
        warnings = [*warnings, "the upstream gave no speech (speech needs vLLM-Omni, or this server with audio)"]
    return warnings


def result_of_json(payload: dict[str, Any], request: GenerationRequest, delivered: list[str]) -> GenerationResult:
    """A non-streamed answer. vLLM-Omni may put the text and the speech in separate choices."""
    text, audio, finish = "", None, "stop"
    for choice in payload.get("choices") or []:
        message = choice.get("message") or {}
        text = text or message.get("content") or ""
        audio = audio if audio is not None else _speech(message.get("audio"))
        finish = _finished(choice.get("finish_reason") or finish)
    _emit(request, delivered, text)
    prompt, completion, by_modality = _usage(payload.get("usage"))
    return GenerationResult(
        text=text,
        prompt_tokens=prompt,
        completion_tokens=completion,
        timings_ms={},
        audio=audio,
        prompt_tokens_by_modality=by_modality,
        warnings=_with_speech_note(request, audio, list(payload.get("warnings") or [])),
        finish_reason=finish,
    )


async def result_of_stream(lines, request: GenerationRequest, delivered: list[str]) -> GenerationResult:
    """A streamed answer (Server-Sent Events of chat.completion.chunk), its text passed on as it comes to a
    client that streams, assembled for one that does not. Speech is never asked for streamed (see chat_body),
    so only text is read here."""
    finish, usage, ended = "stop", None, False
    warnings: list[str] = []
    text: list[str] = []
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            ended = True
            break
        event = json.loads(data)
        if isinstance(event.get("error"), dict):  # an error after the stream began (vLLM and this server)
            refused = event["error"].get("type") == "invalid_request_error"
            raise upstream_error(400 if refused else 500, data.encode())
        warnings += event.get("warnings") or []
        usage = event.get("usage") or usage
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            text.append(delta.get("content") or "")
            _emit(request, delivered, text[-1])
            finish = _finished(choice.get("finish_reason") or finish)
    if not ended:
        raise Retry("the stream ended before [DONE]")
    prompt, completion, by_modality = _usage(usage)
    return GenerationResult(
        text="".join(text),
        prompt_tokens=prompt,
        completion_tokens=completion,
        timings_ms={},
        prompt_tokens_by_modality=by_modality,
        warnings=warnings,
        finish_reason=finish,
    )
