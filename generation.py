"""What a generation is: the request (text and media, or a whole conversation), its result,
the errors it may end in, and how it streams its text and stops early."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer


class InputRejected(ValueError):
    """An input the model cannot take (an image too narrow to cut into patches…); the message says which."""


class Cancelled(RuntimeError):
    """The request was given up (client gone, time limit) before its generation started."""


class PromptTooLong(InputRejected):
    """The prompt alone would not fit MAX_CONTEXT_TOKENS; the message gives the counts and what to change."""


class SpeechError(ValueError):
    """Speech was asked for and cannot be given (no talker, unknown voice); the message says why."""


class OutOfMemory(RuntimeError):
    """The request ran out of GPU (or host) memory; its memory is freed. The message says what to lower."""


@dataclass
class VideoInput:
    frames: list[Image.Image]
    fps: float
    audio: np.ndarray | None = None  # its own audio track, 16 kHz mono, given with the video


Part = "str | Image.Image | np.ndarray | VideoInput"  # text, picture, 16 kHz mono audio, video


@dataclass
class ChatTurn:
    role: str  # system, user or assistant
    parts: list  # of Part, in the order they are to be read


@dataclass
class GenerationRequest:
    text: str | None
    system_prompt: str | None  # None: DEFAULT_SYSTEM_PROMPT (or the official one, for speech)
    images: list[Image.Image] = field(default_factory=list)
    audios: list[np.ndarray] = field(default_factory=list)
    videos: list[VideoInput] = field(default_factory=list)
    max_new_tokens: int = 512
    return_audio: bool = False
    speaker: str | None = None  # a voice of the checkpoint; None is its first
    max_pixels: int | None = None  # per-request pixel budget for each image and video frame
    stop: threading.Event | None = None  # set it to end the generation at the next token
    turns: list[ChatTurn] | None = None  # a whole conversation; else text and media make one user turn
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)
    on_text: Callable[[str], None] | None = None  # receives the answer's text as it is generated


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    timings_ms: dict[str, float]
    completion_ids: list[int] = field(default_factory=list)
    audio: np.ndarray | None = None  # float32 mono at SPEECH_SAMPLE_RATE, when speech was asked for
    prompt_tokens_by_modality: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    finish_reason: str = "stop"  # or "length"


def cut_at_stop(text: str, stop_strings: list[str]) -> tuple[str, bool]:
    """The text up to the first stop string (excluded, as OpenAI does), and whether one was found."""
    cuts = [text.find(stop) for stop in stop_strings if stop and stop in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class TextDeltas(BaseStreamer):
    """Hands the answer's new text to `on_text` token by token (generate() calls put/end on the model thread).

    Text is held back while it ends in an incomplete UTF-8 sequence, or could be the start of a stop
    string, so what was streamed is always a prefix of the final answer.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None], stop_strings: list[str]) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.stop_strings = [s for s in stop_strings if s]
        self.hold = max((len(s) for s in self.stop_strings), default=1) - 1
        self.tokens: list[int] = []
        self.sent = 0
        self.prompt_seen = False
        self.done = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.tokens.extend(value.reshape(-1).tolist())
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        if self.done:
            return
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, self.stop_strings)
        if stopped or final:
            ready, self.done = text, True
        else:
            ready = text[: len(text) - self.hold] if self.hold else text
            if ready.endswith("\ufffd"):
                return
        if len(ready) > self.sent:
            self.on_text(ready[self.sent :])
            self.sent = len(ready)


class _StopWhenSet(StoppingCriteria):
    """Ends generation at the next token once the event is set (a thread cannot be killed)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
