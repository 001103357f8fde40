"""The request types of both APIs, apart from serving them: the /v1 Chat Completions body (the shape vLLM
accepts for Qwen2.5-Omni) and the /multimodal form's value fields with its OpenAPI schema."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qwen_omni_server.core.types import SEED_MAX, SEED_MIN

# ---------------------------------------------------------------- /v1/chat/completions


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
    extract_video_frame: bool = Field(
        False, description="not OpenAI's: send each video as its last frame (an image), as /multimodal does"
    )
    extract_video_audio: bool = Field(
        False, description="not OpenAI's: send each video as its sound track (an audio), as /multimodal does"
    )
    user: str | None = None
    frequency_penalty: float = Field(0, ge=0, le=0, description="not supported: 0 only")
    presence_penalty: float = Field(0, ge=0, le=0, description="not supported: 0 only")


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its `$defs` written where they are referred to (an operation's schema in
    OpenAPI cannot carry `$defs` of its own)."""
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return inline(schema)


# The body is read and parsed by the route itself (as it arrives, then off the event loop): its schema for the docs.
CHAT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _inlined(ChatCompletionRequest.model_json_schema())}},
    }
}


# ---------------------------------------------------------------- /multimodal


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
        "json",
        description="json (default), or wav: the spoken answer as audio/wav, its text percent-encoded in X-Text, "
        "at most 4,096 bytes of it (X-Text-Truncated: true when cut; json with return_audio=true has all of it).",
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
