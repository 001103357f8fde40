"""The one table from errors to HTTP answers, used by every route and every stream.

Routes raise `ApiError` for what they find wrong themselves; the engines' and decoders' errors (core.errors,
media errors, a refused media URL) are answered through `TABLE`. Each API has its shape: `/multimodal`
answers `{"detail": message}`; `/v1` answers OpenAI's `{"error": {message, type, param, code}}`, with 400
for what OpenAI calls an invalid request; a stream that has begun carries the same error as its last event.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from qwen_omni_server.api.media_urls import FetchRefused
from qwen_omni_server.core.errors import (
    Cancelled,
    EngineUnavailable,
    InputRejected,
    OutOfMemory,
    PromptTooLong,
    QueueFull,
    SpeechError,
)
from qwen_omni_server.core.media_formats import MediaTooLarge, UndecodableMedia, UnsupportedMedia

BUSY_RETRY_SECONDS = 10
OUT_OF_MEMORY_RETRY_SECONDS = 10
UNAVAILABLE_RETRY_SECONDS = 5


class ApiError(HTTPException):
    """An error answer: its status, a message that says what was wrong and which setting governs it, and for
    /v1 the parameter at fault and OpenAI's error code. (An HTTPException, so that FastAPI lets it through
    while it reads a body.)"""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        openai_status: int | None = None,
    ) -> None:
        super().__init__(status, message, headers)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.openai_status = openai_status

    def payload(self) -> dict[str, Any]:
        """OpenAI's error object."""
        return {"message": self.message, "type": _kind(self.v1_status), "param": self.param, "code": self.code}

    @property
    def v1_status(self) -> int:
        if self.openai_status is not None:
            return self.openai_status
        return 400 if self.status == 422 else self.status

    def response(self, openai: bool) -> JSONResponse:
        if openai:
            return JSONResponse({"error": self.payload()}, self.v1_status, headers=self.headers)
        return JSONResponse({"detail": self.message}, self.status, headers=self.headers)

    def event(self) -> str:
        """The error as a stream's last event (its status went out with the first byte)."""
        return f"data: {json.dumps({'error': self.payload()})}\n\n"


def _kind(status: int) -> str:
    named = {404: "not_found_error", 429: "rate_limit_error"}
    return named.get(status, "invalid_request_error" if status < 500 else "server_error")


@dataclass(frozen=True)
class Rule:
    """How one kind of error is answered."""

    status: int | Callable[[Any], int]
    code: str | None = None
    retry_after: int | None = None
    openai_status: int | None = None
    message: Callable[[Any], str] = str


TABLE: dict[type[Exception], Rule] = {
    QueueFull: Rule(503, retry_after=BUSY_RETRY_SECONDS, message=lambda e: f"the server is busy ({e}); retry shortly"),
    PromptTooLong: Rule(413, code="context_length_exceeded", openai_status=400),
    InputRejected: Rule(422),
    SpeechError: Rule(400),
    OutOfMemory: Rule(503, code="out_of_memory", retry_after=OUT_OF_MEMORY_RETRY_SECONDS),
    Cancelled: Rule(504, code="timeout"),
    EngineUnavailable: Rule(lambda e: e.status, retry_after=UNAVAILABLE_RETRY_SECONDS),
    UnsupportedMedia: Rule(415),
    UndecodableMedia: Rule(400),
    MediaTooLarge: Rule(413),
    FetchRefused: Rule(lambda e: e.status),
}
HANDLED: tuple[type[Exception], ...] = (ApiError, *TABLE)


def api_error(error: BaseException, *, prefix: str | None = None, param: str | None = None) -> ApiError:
    """`error` as its answer; `prefix` names the input at fault (a file, a message part) in the message."""
    if isinstance(error, ApiError):
        return error
    rule = next((rule for kind, rule in TABLE.items() if isinstance(error, kind)), None)
    if rule is None:
        raise TypeError(f"no answer is defined for {type(error).__name__}") from error
    status = rule.status(error) if callable(rule.status) else rule.status
    message = rule.message(error)
    return ApiError(
        status,
        f"{prefix}: {message}" if prefix else message,
        param=param,
        code=rule.code,
        headers={"Retry-After": str(rule.retry_after)} if rule.retry_after else None,
        openai_status=rule.openai_status,
    )


def is_openai(scope: Mapping[str, Any]) -> bool:
    """Whether a request is on the OpenAI-compatible API (its errors in OpenAI's shape)."""
    return str(scope.get("path", "")).startswith("/v1/")
