"""What the routes need from whatever generates: the engine, and the worker that runs and admits its jobs.

Two implementations exist: the model in this process (`modeling_low_vram.OmniEngine`, run one request at
a time by `model_worker.ModelWorker`) and OpenAI-compatible upstream servers (`remote_engine.RemoteEngine`,
whose `UpstreamWorker` admits as many requests as its reachable upstreams take). `deps.ModelState` picks
one from ENGINE; the routes do not know which they have.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from generation import GenerationRequest, GenerationResult


class Engine(Protocol):
    """Generates answers. `generate` blocks; it runs on a thread the worker gives it."""

    @property
    def voices(self) -> list[str]:
        """Voices speech can use, the default first (empty where the engine cannot say)."""
        ...

    def describe(self) -> dict[str, Any]:
        """At least {"model": name, "placement": {...}}: what serves the requests."""
        ...

    def memory(self) -> dict[str, Any] | None:
        """This process's memory in use, where the engine holds a model here."""
        ...

    def check_speech(self, speaker: str | None) -> str | None:
        """The voice to speak with; SpeechError when speech cannot be given."""
        ...

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """The answer; raises InputRejected (PromptTooLong), SpeechError, Cancelled or EngineUnavailable."""
        ...


class Worker(Protocol):
    """Runs an engine's jobs off the event loop, refusing (model_worker.QueueFull) past its admission limit."""

    def reserve(self) -> None:
        """Take a place before the request's work begins; QueueFull when none is left."""
        ...

    def release(self) -> None:
        """Give back a reserved place that no job took."""
        ...

    def submit(self, job: Callable[..., Any], *args: Any, reserved: bool = False) -> Future: ...

    def stats(self) -> dict[str, int]: ...

    def shutdown(self) -> None: ...


class EngineUnavailable(RuntimeError):
    """No upstream could take the request (all down, or they failed); `status` is the HTTP answer (502/503)."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status
