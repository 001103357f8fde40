"""What the API needs from whatever generates: the engine, and the worker that admits and runs its jobs.

Two engines implement it: the model in this process (`local`, one generation at a time on its own thread)
and OpenAI-compatible upstream servers (`upstream`, as many at once as they take). The API never asks which
it has: what differs between them is a member of this protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from qwen_omni_server.core.types import GenerationRequest, GenerationResult
from qwen_omni_server.core.worker import ModelWorker


class Worker(Protocol):
    """Runs an engine's jobs off the event loop, refusing (QueueFull) past its admission limit."""

    rejected: int

    def check_room(self) -> None:
        """QueueFull when a request arriving now could not be admitted; reserves nothing."""
        ...

    def reserve(self, *, renewing: bool = False) -> None:
        """Take a place before the request's work begins; QueueFull when none is left (`renewing`: a request
        admitted already takes back the place its given-up job held, whatever the bound)."""
        ...

    def release(self) -> None:
        """Give back a reserved place that no job took."""
        ...

    def submit(self, job: Callable[..., Any], *args: Any, reserved: bool = False) -> Future: ...

    def stats(self) -> dict[str, int]: ...

    def shutdown(self) -> None: ...


class Engine(Protocol):
    """Generates answers. `generate` blocks; it runs on a thread of the engine's worker."""

    @property
    def voices(self) -> list[str]:
        """Voices speech can use, the default first (empty where the engine cannot say)."""
        ...

    @property
    def sampling_defaults(self) -> dict[str, float]:
        """The sampling values a request leaves unset takes (the checkpoint's generation_config), where known."""
        ...

    @property
    def passes_files(self) -> bool:
        """Whether media goes on as files (pictures that can go as they came, videos whole): decoding keeps them."""
        ...

    def describe(self) -> dict[str, Any]:
        """At least {"model": name, "placement": {...}}: what serves the requests."""
        ...

    def memory(self) -> dict[str, Any] | None:
        """This process's memory in use, where the engine holds a model here."""
        ...

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether it can answer now, and what `/health` adds about it (the upstreams' states)."""
        ...

    def check_speech(self, speaker: str | None) -> str | None:
        """The voice to speak with; SpeechError when speech cannot be given."""
        ...

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """The answer; raises InputRejected (PromptTooLong), SpeechError, OutOfMemory, Cancelled or
        EngineUnavailable."""
        ...

    def new_worker(self, max_waiting: int) -> Worker:
        """A fresh worker for this engine's jobs (one per server start); the local model's admits `max_waiting`
        beyond the one running, the upstreams' as many as they take."""
        ...

    def close(self) -> None:
        """Let go of what the engine holds (connections, threads)."""
        ...


class BaseEngine:
    """The members most engines share: one generation at a time, always healthy, nothing to close, media
    decoded here, no voices or sampling defaults of its own."""

    sampling_defaults: dict[str, float] = {}
    passes_files = False

    @property
    def voices(self) -> list[str]:
        return []

    def memory(self) -> dict[str, Any] | None:
        return None

    def health(self) -> tuple[bool, dict[str, Any]]:
        return True, {}

    def new_worker(self, max_waiting: int) -> Worker:
        return ModelWorker(max_waiting)

    def close(self) -> None:
        pass
