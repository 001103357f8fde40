"""Every setting of the server, read from the environment and `.env` (see `.env.example`).

One pydantic-settings class, `Settings`, made of sections (model, speech, engine, HTTP, media URLs,
generation, upload limits, vision budgets, logging): each field is an environment variable of the same
name in upper case, typed, bounded and described; the README's table and `.env.example` are generated
from it (`scripts/document_settings.py`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
PATCH = 28 * 28  # pixels per visual token
MAX_BATCH_ROWS = 64  # the largest MAX_BATCH_SIZE


class ModelSettings(BaseModel):
    """Model and placement"""

    model_path: str = Field(
        "Qwen/Qwen2.5-Omni-3B",
        min_length=1,
        max_length=4096,
        description="Local folder or Hugging Face hub id of a Qwen2.5-Omni checkpoint (3B or 7B).",
    )
    device_map: str = Field(
        "auto",
        min_length=1,
        max_length=4096,
        description="Where each component runs: 'auto' (planned for the GPU's memory; cpu without a GPU), 'gpu', "
        "'low-vram' (encoders offloaded: weights in RAM, run on the GPU), 'low-vram-cpu' (encoders run on the "
        "CPU), 'cpu', or a JSON object mapping components (language_model, lm_head, visual, audio_tower, talker, "
        "token2wav) to a device or 'offload'.",
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto",
        description="Weights dtype: 'auto' is bf16 on GPUs that support it, else fp16; on the CPU the faster of fp32 "
        "and bf16 (timed at start-up on the model's shapes) that fits the free RAM with headroom.",
    )
    quantization: Literal["none", "int8", "nf4"] = Field(
        "none",
        description="Language model weights: 'none' (DTYPE), 'int8' or 'nf4' (4-bit, double quant; compute in DTYPE) "
        "with bitsandbytes. The encoders, lm_head, talker and token2wav stay in DTYPE. A pre-quantized (GPTQ, "
        "AWQ) checkpoint needs 'none'.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel; flash_attention_2 only where installed (falls back to sdpa)."
    )
    gpu_device: str = Field(
        "cuda", min_length=1, max_length=64, description="The GPU the presets' GPU side uses (cuda, cuda:1…)."
    )
    gpu_memory_gib: float = Field(
        0, ge=0, le=4096, description="GPU memory DEVICE_MAP=auto may plan for, in GiB; 0 uses what is free."
    )
    max_context_tokens: int = Field(
        8192, ge=256, le=131072, description="Longest prompt plus answer the memory plan reserves room for."
    )
    max_batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH_ROWS)] | Literal["auto"] = Field(
        1,
        description="Text answers generated together on the local model: the requests waiting when it is free (and "
        "those arriving while it decodes) join one batch of up to this many rows; 1 answers one at a time. 'auto': "
        f"the most (up to {MAX_BATCH_ROWS}) whose KV cache at MAX_CONTEXT_TOKENS the memory plan admits. Spoken "
        "answers run alone.",
    )
    empty_cuda_cache: bool = Field(False, description="Return cached CUDA memory to the driver after each request.")
    cpu_threads: int = Field(0, ge=0, le=256, description="torch CPU threads; 0 keeps torch's default.")


class SpeechSettings(BaseModel):
    """Speech output"""

    enable_audio_output: bool = Field(
        False, description="Load the talker and token2wav (about 2.4 GiB for 3B) so answers can be spoken."
    )
    max_speech_seconds: float = Field(
        180, gt=0, le=3600, description="Longest spoken answer, in seconds (bounds the talker's codec tokens)."
    )
    speech_seconds_per_token: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="The most seconds of speech one text token of the answer may take: the talker stops after 2 s "
        "plus this much per spoken token (or MAX_SPEECH_SECONDS, whichever is less), so a talker that does not end "
        "stops soon after its text. The default leaves room for digits spelled out and slow voices.",
    )
    speech_chunk_blocks: int = Field(
        3,
        ge=1,
        le=64,
        description="token2wav makes every spoken answer in chunks of this many DiT blocks (24 mel frames, 0.48 s "
        "of speech each), streamed or not; fewer starts a streamed voice sooner, more costs less per second of speech.",
    )
    speech_pipeline: bool = Field(
        True,
        description="The talker speaks while the thinker still writes (the first sound comes after a few tokens, "
        "not after the whole answer; same speech for the same seed); false speaks once the text is done.",
    )


class UpstreamSettings(BaseModel):
    """Engine (this process, or upstream servers: see Scaling out)"""

    engine: Literal["local", "openai"] = Field(
        "local",
        description="'local' runs MODEL_PATH in this process; 'openai' decodes and checks media here and sends "
        "each request to the upstreams in ENGINE_URLS (vLLM, vLLM-Omni, or another of these servers).",
    )
    engine_urls: list[str] = Field(
        [],
        max_length=64,
        description="With ENGINE=openai: the upstreams' OpenAI-compatible base URLs, as JSON "
        '(["http://gpu-1:8000/v1", "http://gpu-2:8000/v1"]; a bare http://gpu-1:8000 means its /v1); each request '
        "goes to the least busy one.",
    )
    engine_api_key: str | None = Field(
        None,
        max_length=65_536,
        description="With ENGINE=openai: sent to the upstreams as `Authorization: Bearer <key>`.",
    )
    engine_model: str | None = Field(
        None,
        max_length=1024,
        description="With ENGINE=openai: the model name sent upstream; unset, each upstream's own /v1/models.",
    )
    upstream_idle_seconds: float = Field(
        60,
        gt=0,
        le=3600,
        description="With ENGINE=openai: longest an upstream may send nothing on a request (before its first token "
        "or between two; answers are streamed from it) before the request goes to another upstream, or ends with "
        "502 once text reached the client.",
    )

    @field_validator("engine_urls")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not re.match(r"^https?://[^/\s]+", url):
                raise ValueError(f"{url!r} is not an http(s) URL such as http://gpu-1:8000/v1")
        # A bare server address (http://gpu-1:8000) means its API under /v1, where vLLM serves it.
        return [url.rstrip("/") + ("/v1" if re.match(r"^https?://[^/]+/*$", url) else "") for url in urls]

    @model_validator(mode="after")
    def _engine_has_upstreams(self) -> Any:
        if self.engine == "openai" and not self.engine_urls:
            raise ValueError('ENGINE=openai needs ENGINE_URLS, e.g. ["http://gpu-1:8000/v1"]')
        return self


class HttpSettings(BaseModel):
    """HTTP"""

    host: str = Field("0.0.0.0", min_length=1, max_length=255, description="Address to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    api_key: str | None = Field(
        None,
        min_length=8,
        max_length=65_536,
        description="When set (at least 8 characters), every endpoint but /health needs `Authorization: Bearer <key>`; "
        "/health then tells its status alone without it.",
    )
    cors_origins: list[str] = Field(
        [],
        max_length=256,
        description='Origins allowed to call the API from a browser, as JSON (["https://example.org"]); '
        "none by default.",
    )
    max_waiting_requests: int = Field(
        32, ge=0, le=10_000, description="Requests that may wait for the model; more get 503 with Retry-After."
    )
    request_timeout_seconds: float = Field(
        600, gt=0, le=86_400, description="Longest a request may wait and generate before a 504 (the run is stopped)."
    )
    decode_workers: int = Field(
        2, ge=1, le=64, description="Uploads decoded at once; more wait their turn (bounds CPU and memory)."
    )
    metrics_public: bool = Field(False, description="Serve GET /metrics without the API key (when API_KEY is set).")


class MediaUrlSettings(BaseModel):
    """Media URLs (/v1 `image_url`, `audio_url`, `video_url` that are not data URLs)"""

    media_url_hosts: list[str] = Field(
        [],
        max_length=1024,
        description='Hosts whose http(s) media URLs /v1 may fetch, as JSON (["media.example.org"]); none by default.',
    )
    media_url_timeout_seconds: float = Field(
        10, gt=0, le=600, description="One deadline for fetching one media URL: connecting, headers and every byte."
    )
    media_url_ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(
        [80, 443], description="Ports a media URL may name, as JSON ([80, 443, 8080]); others are refused."
    )
    media_url_allow_private: bool = Field(
        False,
        description="Let media URLs reach private, loopback and shared (100.64/10) addresses (checked on the "
        "address actually connected to); link-local, metadata, multicast and reserved ones never. Off by default.",
    )


class GenerationSettings(BaseModel):
    """Generation"""

    default_system_prompt: str = Field(
        "You are a helpful assistant.",
        max_length=20_000,
        description="System prompt when a request sends none (the default is the chat template's own).",
    )
    default_max_new_tokens: int = Field(512, ge=1, le=32768, description="max_new_tokens when a request sends none.")
    max_new_tokens_limit: int = Field(2048, ge=1, le=32768, description="Largest max_new_tokens a request may ask for.")
    max_text_chars: int = Field(
        100_000, ge=1, le=10_000_000, description="Longest text or system_prompt a request may send."
    )


class LimitSettings(BaseModel):
    """Upload limits (each enforced with a clear 4xx)"""

    max_file_mb: float = Field(512, gt=0, le=65_536, description="Largest single uploaded file, in MiB.")
    max_request_mb: float = Field(
        1024, gt=0, le=65_536, description="Largest request body, in MiB, counted as it arrives."
    )
    body_timeout_seconds: float = Field(
        300, gt=0, le=86_400, description="Longest a request body may take to arrive (a slow-drip client gets 408)."
    )
    max_json_mb: float = Field(
        16,
        gt=0,
        le=65_536,
        description="Largest /v1 JSON body apart from its media (the data URLs' payloads), in MiB; it is parsed "
        "in one piece, the media apart.",
    )
    max_uploads_in_flight: int = Field(
        256,
        ge=1,
        le=100_000,
        description="Request bodies that may be arriving at once, apart from the places for work "
        "(MAX_WAITING_REQUESTS, taken once a body is in); more get 503 with Retry-After before a byte is read.",
    )
    max_upload_mb_in_flight: float = Field(
        4096,
        gt=0,
        le=1_048_576,
        description="MiB of request bodies that may be arriving at once, counted as they arrive; the body whose "
        "bytes would pass it gets 503 with Retry-After.",
    )
    max_files_per_field: int = Field(8, ge=1, le=1000, description="Most files in each of images/audios/videos.")
    max_image_pixels: int = Field(
        50_000_000,
        ge=1,
        le=100_000_000_000,
        description="Largest image (width x height) decoded; larger ones are refused unread.",
    )
    max_audio_seconds: float = Field(
        300, gt=0, le=300, description="Longest audio input, in seconds (the model's audio window is 300 s)."
    )
    max_video_seconds: float = Field(
        1800, gt=0, le=86_400, description="Longest video, in seconds, judged by decoded timestamps."
    )
    decode_timeout_seconds: float = Field(
        120, gt=0, le=3600, description="Longest time one file may take to decode before it is refused."
    )

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * MiB)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * MiB)

    @property
    def max_json_bytes(self) -> int:
        return int(self.max_json_mb * MiB)

    @property
    def max_upload_bytes_in_flight(self) -> int:
        return int(self.max_upload_mb_in_flight * MiB)


class BudgetSettings(BaseModel):
    """Vision budgets (one visual token per 28x28 pixels)"""

    image_min_pixels: int = Field(
        4 * PATCH, ge=PATCH, le=16384 * PATCH, description="Smallest image after resizing, in pixels."
    )
    image_max_pixels: int = Field(
        1280 * PATCH,
        ge=PATCH,
        le=65536 * PATCH,
        description="Largest image after resizing, in pixels (one token per 28x28).",
    )
    video_fps: float = Field(2.0, gt=0, le=30, description="Frames sampled per second of video.")
    video_max_frames: int = Field(64, ge=2, le=768, description="Most frames sampled from one video.")
    video_min_pixels: int = Field(
        128 * PATCH, ge=PATCH, le=16384 * PATCH, description="Smallest video frame after resizing."
    )
    video_max_pixels: int = Field(
        768 * PATCH, ge=PATCH, le=65536 * PATCH, description="Largest video frame after resizing."
    )
    video_total_pixels: int = Field(
        4096 * PATCH,
        ge=PATCH,
        le=262144 * PATCH,
        description="Pixel budget shared by all frames of one video (tokens x 784).",
    )
    max_pixels_ceiling: int = Field(
        16384 * PATCH,
        ge=PATCH,
        le=65536 * PATCH,
        description="Most pixels per image or frame a request's max_pixels may ask for.",
    )


class LogSettings(BaseModel):
    """Logging"""

    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or as one JSON object each (for log collectors)."
    )


# The sections in the order the documentation lists them.
SECTIONS: tuple[type[BaseModel], ...] = (
    ModelSettings,
    SpeechSettings,
    UpstreamSettings,
    HttpSettings,
    MediaUrlSettings,
    GenerationSettings,
    LimitSettings,
    BudgetSettings,
    LogSettings,
)


class Settings(  # pydantic collects the fields of the last base first: the sections in reverse
    LogSettings,
    BudgetSettings,
    LimitSettings,
    GenerationSettings,
    MediaUrlSettings,
    HttpSettings,
    UpstreamSettings,
    SpeechSettings,
    ModelSettings,
    BaseSettings,
):
    """Server settings: every section's fields, each an environment variable of the same name in upper case."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment and `.env`; on invalid values, exit naming each variable."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']).upper() or 'SETTINGS'}: {e['msg']}" for e in error.errors()
        )
        raise SystemExit(f"invalid configuration: {problems}") from None
