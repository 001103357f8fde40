"""A /v1 JSON body read as it arrives and parsed off the event loop without holding up the server.

Parsing holds Python's lock for the whole of each call, so a 200 MB body parsed in one piece would stop the
event loop (and every stream) for a third of a second, whatever thread parses it. Almost all of a large
body is its media: base64 data URLs. So the media strings are lifted out first, each found and cut with
short searches over windows of the body, and only the rest (text, options: at most MAX_JSON_MB) is parsed;
a lifted payload is decoded later by pybase64, which lets go of the lock while it works
(`media_urls.base64_bytes`).
Everything here but `read_body` runs in the decoding pool.
"""

from __future__ import annotations

import mmap
import re
import secrets
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from qwen_omni_server.api.errors import ApiError
from qwen_omni_server.api.protocol import ChatCompletionRequest

WINDOW = 4 * 1024 * 1024  # bytes one search covers: about a millisecond
LIFT_BYTES = 64 * 1024  # strings shorter than this stay where they are
MOST_STRINGS = 4096  # media strings looked at in one body; what lies beyond stays in the JSON
# A media string's opening: an image/audio/video URL's value up to its payload, or input_audio's `data`. An
# unescaped quote before `url` or `data` can only open a key in valid JSON, so text is never lifted.
_MEDIA_STRING = re.compile(rb'"(?:url"\s{0,64}:\s{0,64}"data:[^",\\]{0,256};base64,|data"\s{0,64}:\s{0,64}")')


@dataclass(frozen=True)
class ChatBody:
    """A parsed /v1 body: the request, and the media payloads lifted out of it (by placeholder)."""

    request: ChatCompletionRequest
    media: dict[str, memoryview] = field(default_factory=dict)

    def payload(self, url: str) -> memoryview | None:
        """A lifted data URL's base64 payload, or None for any other URL."""
        return self.media.get(url.partition(",")[2])


@dataclass(frozen=True)
class Received:
    """A body as it arrived: its first `size` bytes of `data` (an anonymous memory map, or bytes)."""

    data: bytes | mmap.mmap
    size: int


async def read_body(request: Request) -> Received:
    """The body as it arrives (its limits are enforced by `middleware.BodyLimits`), copied a piece at a time
    into an anonymous memory map sized by Content-Length when it is declared: unlike a bytearray's, its pages
    need no zeroing before they are written (200 MB of that would hold the event loop for 0.1 s)."""
    declared = request.headers.get("content-length", "")
    buffer, filled = mmap.mmap(-1, max(1, int(declared) if declared.isdigit() else 0)), 0
    async for piece in request.stream():
        if filled + len(piece) > len(buffer):  # longer than it said, or no length said: a map twice as big
            buffer = _moved(buffer, filled, max(2 * len(buffer), filled + len(piece)))
        buffer[filled : filled + len(piece)] = piece
        filled += len(piece)
    return Received(buffer, filled)


def _moved(buffer: mmap.mmap, filled: int, size: int) -> mmap.mmap:
    """`buffer`'s first `filled` bytes in a new map of `size` bytes, copied a window at a time."""
    bigger = mmap.mmap(-1, size)
    for start in range(0, filled, WINDOW):
        bigger[start : min(filled, start + WINDOW)] = buffer[start : min(filled, start + WINDOW)]
    buffer.close()
    return bigger


def parse_chat(body: Received, max_json_bytes: int) -> ChatBody:
    """The body as a request with its media lifted out; 413 when the rest is over `max_json_bytes`
    (MAX_JSON_MB), 422 saying what is wrong where."""
    pieces, media = lift_media(body)
    size = sum(len(piece) for piece in pieces)
    if size > max_json_bytes:
        raise ApiError(
            413,
            f"the request's JSON apart from its media (data URLs) is {size:,} bytes, at most "
            f"{max_json_bytes:,} (MAX_JSON_MB)",
        )
    try:
        request = ChatCompletionRequest.model_validate_json(b"".join(pieces))
    except ValidationError as error:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in error.errors(include_url=False)]
        raise RequestValidationError(errors) from None
    return ChatBody(request, media)


def lift_media(body: Received) -> tuple[list[memoryview | bytes], dict[str, memoryview]]:
    """The body's pieces with each long data URL payload (or input_audio `data`) replaced by a placeholder, and
    the payloads by placeholder. A string with an escape in it stays (JSON must unescape it)."""
    view = memoryview(body.data)[: body.size]
    pieces: list[memoryview | bytes] = []
    media: dict[str, memoryview] = {}
    nonce = f"\x00{secrets.token_hex(8)}:"  # a lifted payload's place (no URL holds a NUL; no client guesses it)
    done = start = 0
    for _ in range(MOST_STRINGS):
        if (found := _search(body, start)) is None:
            break
        if _escaped(body, found.start()):
            start = found.start() + 1
            continue
        payload_start = found.end()
        end = _closing_quote(body, payload_start)
        if end is None:
            break  # the rest stays: the parser says what is wrong with it
        if end - payload_start >= LIFT_BYTES and _find(body, b"\\", payload_start, end) is None:
            key = f"{nonce}{len(media)}"
            pieces += [view[done:payload_start], key.replace("\x00", "\\u0000").encode()]
            media[key] = view[payload_start:end]
            done = end
        start = end + 1
    pieces.append(view[done:])
    return pieces, media


def _search(body: Received, start: int) -> re.Match | None:
    """The next media string's opening, searched window by window."""
    while start < body.size:
        found = _MEDIA_STRING.search(body.data, start, min(body.size, start + WINDOW + 512))
        if found is not None:
            return found
        start += WINDOW
    return None


def _closing_quote(body: Received, start: int) -> int | None:
    """Where the string opened before `start` ends, or None where a quote in it is escaped (no payload has one,
    and such a string is left to the parser) or there is no end."""
    quote = _find(body, b'"', start, body.size)
    return None if quote is None or _escaped(body, quote) else quote


def _escaped(body: Received, at: int) -> bool:
    """Whether the character at `at` follows an odd number of backslashes (or a run too long to count)."""
    before = bytes(body.data[max(0, at - 4096) : at])
    run = len(before) - len(before.rstrip(b"\\"))
    return run % 2 == 1 or run == 4096


def _find(body: Received, needle: bytes, start: int, end: int) -> int | None:
    for window in range(start, end, WINDOW):
        if (at := body.data.find(needle, window, min(end, window + WINDOW))) >= 0:
            return at
    return None
