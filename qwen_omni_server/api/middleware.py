"""ASGI middleware: request ids, the access log and request metrics, the optional API key, and the request
body limit; and the log formats (text, or JSON for log collectors).

Plain ASGI classes rather than BaseHTTPMiddleware, so that responses stream through untouched.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import json
import logging
import re
import time
import uuid

from starlette.requests import ClientDisconnect

from qwen_omni_server.api.errors import ApiError, is_openai
from qwen_omni_server.api.metrics import route_of
from qwen_omni_server.core.errors import QueueFull

logger = logging.getLogger("multimodal_api")
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every log record (`%(request_id)s`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """LOG_FORMAT=json: one JSON object per line, with the request id and an access line's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
            **getattr(record, "access", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class AccessLog:
    """One log line per request (route, status, bytes in and out, token counts, timings) and its metrics.

    Inside RequestId, so the line carries the request id; what the handlers learn on the way (decode time,
    token counts) they leave in the request's state."""

    def __init__(self, app, metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        started = state.setdefault("started", time.perf_counter())
        counts = {"status": 500, "bytes_in": 0, "bytes_out": 0}

        async def counting_receive():
            event = await receive()
            if event["type"] == "http.request":
                counts["bytes_in"] += len(event.get("body", b""))
            return event

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                counts["status"] = message["status"]
            elif message["type"] == "http.response.body":
                counts["bytes_out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            seconds = time.perf_counter() - started
            route = route_of(scope["path"])
            self.metrics.requests.labels(route, str(counts["status"])).inc()
            self.metrics.request_seconds.labels(route).observe(seconds)
            fields = {
                "method": scope["method"],
                "route": route,
                **counts,
                **state.get("usage", {}),
                "decode_ms": round(state.get("decode_seconds", 0.0) * 1000, 1),
                "total_ms": round(seconds * 1000, 1),
            }
            text = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("method", "route"))
            logger.info("%s %s %s", scope["method"], scope["path"][:200], text, extra={"access": fields})


class RequestId:
    """Gives each request an id (the client's X-Request-ID when it is sane), logged and returned.

    Outermost of ours, it also turns an unexpected error into a 500 that names the request id
    and nothing else: the traceback goes to the log, never to the client.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        offered = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        current = offered if _CLIENT_ID.fullmatch(offered) else uuid.uuid4().hex[:16]
        token = request_id.set(current)
        scope.setdefault("state", {})["started"] = time.perf_counter()  # the one request clock

        started = False

        async def send_with_id(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", []).append((b"x-request-id", current.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:  # the client left before its answer could start: nothing to answer
            logger.info("client went away before the answer started")
        except Exception:  # noqa: BLE001 - whatever it was, the client gets a clean 500
            logger.exception("unexpected error")
            if not started:
                error = ApiError(500, f"internal error; request id {current}")
                await error.response(is_openai(scope))(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


def carries_key(scope, key: bytes) -> bool:
    """Whether the request sends `Authorization: Bearer <key>` (compared in constant time)."""
    header = dict(scope["headers"]).get(b"authorization", b"")
    scheme, _, token = header.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


class ApiKey:
    """With API_KEY set, every path but the open ones (/health, which then tells its status alone) needs
    `Authorization: Bearer <key>`."""

    def __init__(self, app, key: str, open_paths: frozenset[str] = frozenset({"/health"})) -> None:
        self.app = app
        self.key = key.encode()
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        if carries_key(scope, self.key):
            return await self.app(scope, receive, send)
        message = "a valid API key is required: send the header `Authorization: Bearer <API_KEY>`"
        error = ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await error.response(is_openai(scope))(scope, receive, send)


class Intake:
    """The request bodies arriving now (uploads in flight), bounded apart from the places for work: a body
    takes one of MAX_UPLOADS_IN_FLIGHT when its first byte is read and gives it back with its bytes once its last
    byte is in (or its request ends). Its request takes a place for work only then, so a slow body holds
    none, and a request whose body is in never waits behind one. Used on the event loop only."""

    def __init__(self, max_uploads: int, max_bytes: int) -> None:
        self.max_uploads = max_uploads
        self.max_bytes = max_bytes
        self.uploads = 0
        self.bytes = 0
        self.refused = 0

    def open(self) -> None:
        if self.uploads >= self.max_uploads:
            self.refused += 1
            raise QueueFull(f"{self.uploads} request bodies are already arriving (MAX_UPLOADS_IN_FLIGHT)")
        self.uploads += 1

    def add(self, count: int) -> None:
        if self.bytes + count > self.max_bytes:
            self.refused += 1
            raise QueueFull(
                f"{self.bytes:,} bytes of request bodies are already arriving, at most {self.max_bytes:,} "
                "(MAX_UPLOAD_MB_IN_FLIGHT)"
            )
        self.bytes += count

    def close(self, received: int) -> None:
        self.uploads -= 1
        self.bytes -= received

    def stats(self) -> dict[str, int]:
        return {"uploads": self.uploads, "bytes": self.bytes, "refused": self.refused}


class BodyLimits:
    """A request body within its limits as it arrives: one of the uploads in flight (`Intake`), at most
    `max_bytes` (Content-Length is not trusted), and in within `timeout` seconds (a client dripping its body
    a byte at a time gets 408)."""

    def __init__(self, app, max_bytes: int, intake: Intake, timeout: float = 300) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.intake = intake
        self.timeout = timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body is over {self.max_bytes:,} bytes (MAX_REQUEST_MB)"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            return await ApiError(413, message).response(is_openai(scope))(scope, receive, send)
        deadline = asyncio.get_running_loop().time() + self.timeout
        body = _Body(self.intake, self.max_bytes, message, deadline, self.timeout)
        try:
            await self.app(scope, body.receiving(receive), send)
        finally:
            body.close()


class _Body:
    """One request body as it arrives, counted against its limits and the intake until its last byte."""

    def __init__(self, intake: Intake, max_bytes: int, message: str, deadline: float, timeout: float) -> None:
        self.intake, self.max_bytes, self.message = intake, max_bytes, message
        self.deadline, self.timeout = deadline, timeout
        self.received = 0
        self.state = "unread"

    def receiving(self, receive):
        async def counting_receive():
            if self.state == "in":  # the body is in: what comes now (a disconnect) may take as long as it takes
                return await receive()
            if self.state == "unread":  # one of the uploads in flight from its first byte (QueueFull: a 503)
                self.intake.open()
                self.state = "arriving"
            try:
                async with asyncio.timeout_at(self.deadline):  # no task per piece, as wait_for would make
                    event = await receive()
            except TimeoutError:
                raise ApiError(
                    408, f"the request body took longer than {self.timeout:g} s to arrive (BODY_TIMEOUT_SECONDS)"
                ) from None
            if event["type"] == "http.request":
                self.count(len(event.get("body", b"")))
                if not event.get("more_body", False):
                    self.close()
            else:
                self.close()
            return event

        return counting_receive

    def count(self, size: int) -> None:
        if self.received + size > self.max_bytes:
            raise ApiError(413, self.message)
        self.intake.add(size)
        self.received += size

    def close(self) -> None:
        if self.state == "arriving":
            self.intake.close(self.received)
        self.state = "in"
