"""The errors a generation may end in, whichever engine runs it; `api.errors` maps each to its HTTP answer."""

from __future__ import annotations


class InputRejected(ValueError):
    """An input the model cannot take (an image too narrow to cut into patches…); the message says which."""


class PromptTooLong(InputRejected):
    """The prompt alone would not fit MAX_CONTEXT_TOKENS; the message gives the counts and what to change."""


class Cancelled(RuntimeError):
    """The request was given up (client gone, time limit) before its generation started."""


class SpeechError(ValueError):
    """Speech was asked for and cannot be given (no talker, unknown voice); the message says why."""


class OutOfMemory(RuntimeError):
    """The request ran out of GPU (or host) memory; its memory is freed. The message says what to lower."""


class QueueFull(RuntimeError):
    """More requests are waiting for the engine than MAX_WAITING_REQUESTS (or the upstreams) allow."""


class EngineUnavailable(RuntimeError):
    """No upstream could take the request (all down, or they failed); `status` is the HTTP answer (502/503)."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


class EngineFailed(RuntimeError):
    """The engine could not be made (a wrong MODEL_PATH, placement or quantization); the message says what to set."""
