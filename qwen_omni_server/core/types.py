"""What a generation is: the request (text and media, or a whole conversation) and its result. Plain data,
no torch: the API builds requests, the engines answer them. A request is frozen: a changed one is a copy."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from qwen_omni_server.core.media import PictureFile

# The seeds the sampler takes: 64-bit signed integers.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


@dataclass
class VideoInput:
    frames: list[Image.Image]
    fps: float
    audio: np.ndarray | None = None  # its own audio track, 16 kHz mono, given with the video
    source: bytes | None = None  # the file itself, kept for an engine that passes files on


# text, picture (decoded; or, for an engine that passes files on, a media.PictureFile as it came), 16 kHz mono
# audio, video
Part = "str | Image.Image | PictureFile | np.ndarray | VideoInput"


@dataclass(frozen=True)
class ChatTurn:
    role: str  # system, user or assistant
    parts: list  # of Part, in the order they are to be read


@dataclass(frozen=True)
class GenerationRequest:
    text: str | None
    system_prompt: str | None  # None: DEFAULT_SYSTEM_PROMPT (or the official one, for speech)
    images: list[Image.Image | PictureFile] = field(default_factory=list)
    audios: list[np.ndarray] = field(default_factory=list)
    videos: list[VideoInput] = field(default_factory=list)
    max_new_tokens: int = 512
    return_audio: bool = False
    speaker: str | None = None  # a voice of the checkpoint; None is its first
    max_pixels: int | None = None  # per-request pixel budget for each image and video frame
    stop: threading.Event | None = None  # set it to end the generation at the next token
    turns: list[ChatTurn] | None = None  # a whole conversation; else text and media make one user turn
    temperature: float | None = 0.0  # 0: greedy; None: the checkpoint's generation_config (as vLLM does)
    top_p: float | None = None  # None: the checkpoint's
    top_k: int | None = None  # None: the checkpoint's; 0: off
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)
    on_text: Callable[[str], object] | None = None  # receives the answer's text as it is generated
    on_audio: Callable[[np.ndarray], object] | None = None  # receives the spoken answer's samples as they are made


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    timings_ms: dict[str, float]
    completion_ids: list[int] = field(default_factory=list)
    audio: np.ndarray | None = None  # float32 mono at audio.SPEECH_SAMPLE_RATE, when speech was asked for
    prompt_tokens_by_modality: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    finish_reason: str = "stop"  # or "length"
    inputs: dict[str, list[dict]] = field(default_factory=dict)  # per file, what the model got (core.conversation)


def with_parts_replaced(request: GenerationRequest, new: dict[int, Any]) -> GenerationRequest:
    """A fresh copy of `request` (no stop event yet) in which each media part whose id() is a key of `new`
    is that key's value."""

    def swap(part: Any) -> Any:
        return new.get(id(part), part)

    turns = None if request.turns is None else [ChatTurn(t.role, [swap(p) for p in t.parts]) for t in request.turns]
    return replace(request, images=[swap(p) for p in request.images], turns=turns, stop=None)


def cut_at_stop(text: str, stop_strings: list[str]) -> tuple[str, bool]:
    """The text up to the first stop string (excluded, as OpenAI does), and whether one was found."""
    cuts = [text.find(stop) for stop in stop_strings if stop and stop in text]
    return (text[: min(cuts)], True) if cuts else (text, False)
