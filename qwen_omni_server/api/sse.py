"""Server-Sent Events of chat.completion.chunk objects, for both APIs' streamed answers (`stream=true`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import anyio
import pybase64
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from qwen_omni_server.api.admission import Job, Place
from qwen_omni_server.api.errors import HANDLED, ApiError, api_error
from qwen_omni_server.core.audio import pcm16
from qwen_omni_server.core.engine import Engine, Worker
from qwen_omni_server.core.errors import Cancelled
from qwen_omni_server.core.types import GenerationRequest, GenerationResult

AUDIO_LIFETIME_SECONDS = 3600


def chunk(
    completion_id: str,
    model: str,
    delta: dict | None,
    finish_reason: str | None = None,
    usage: dict | None = None,
    warnings: list[str] | None = None,
    inputs: dict | None = None,
) -> str:
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["usage"] = usage
    if warnings:  # not OpenAI's: what decoding recovered, or a shortened bound
        body["warnings"] = warnings
    if inputs is not None:  # not OpenAI's: what the model got of each file
        body["inputs"] = inputs
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def usage_of(result: GenerationResult) -> dict[str, Any]:
    """The answer's token counts, in OpenAI's shape (with the prompt's tokens by modality)."""
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"by_modality": result.prompt_tokens_by_modality},
    }


@dataclass(frozen=True)
class Stream:
    """What a streamed answer needs besides its generation: who runs it, its names, and its clock."""

    worker: Worker
    engine: Engine
    model: str
    include_usage: bool
    timeout: float
    started: float
    warnings: list[str]
    place: Place | None = None

    @property
    def deadline(self) -> float:
        return self.started + self.timeout

    def timeout_error(self) -> ApiError:
        message = f"the request took longer than {self.timeout:g} s (REQUEST_TIMEOUT_SECONDS)"
        return ApiError(504, message, code="timeout")


def stream_events(generation: GenerationRequest, stream: Stream) -> AsyncIterator[str]:
    """Server-Sent Events of chat.completion.chunk objects, text as it is generated, then [DONE].

    A spoken answer streams as OpenAI streams one: `delta.audio` objects carrying its `id`, the text as
    `transcript` deltas, then base64 PCM16 `data` (24 kHz mono) as token2wav makes it, and last its
    `expires_at`. The job is queued when the stream starts, not before: a client that leaves before the
    first byte leaves no job behind. A client that disconnects later cancels this generator: the thinker,
    talker or token2wav then stops at its next step; the request's deadline stops it whoever listens.
    """
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    generation = replace(
        generation,
        on_text=lambda text: loop.call_soon_threadsafe(deltas.put_nowait, ("text", text)),
        on_audio=(lambda samples: loop.call_soon_threadsafe(deltas.put_nowait, ("audio", samples)))
        if generation.return_audio
        else None,
    )
    return _events(generation, stream, deltas, Ids(generation.return_audio))


class Ids:
    """A streamed answer's ids, and its deltas in the shape its kind takes (text, or a spoken answer)."""

    def __init__(self, spoken: bool) -> None:
        self.spoken = spoken
        self.completion = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.audio = f"audio_{uuid.uuid4().hex[:24]}"

    def delta(self, kind: str, value: Any) -> dict[str, Any]:
        if not self.spoken:
            return {"content": value}
        if kind == "text":
            return {"audio": {"id": self.audio, "transcript": value}}
        return {"audio": {"id": self.audio, "data": pybase64.b64encode_as_string(pcm16(value))}}


async def _events(
    generation: GenerationRequest, stream: Stream, deltas: asyncio.Queue[tuple[str, Any]], ids: Ids
) -> AsyncIterator[str]:
    job: Job | None = None
    try:
        job = Job(stream.worker, stream.engine, generation, stream.place, stream.deadline)
        yield chunk(ids.completion, stream.model, {"role": "assistant", "content": ""}, warnings=stream.warnings)
        async for kind, value in _deltas(job, stream, deltas):
            yield chunk(ids.completion, stream.model, ids.delta(kind, value))
        result: GenerationResult = job.future.result()
        async for event in _ending(result, stream, ids):
            yield event
    except HANDLED as error:
        yield (stream.timeout_error() if isinstance(error, Cancelled) else api_error(error)).event()
    finally:
        if job is not None:
            job.abandon()
        elif stream.place is not None:
            stream.place.release()
    yield "data: [DONE]\n\n"


async def _deltas(job: Job, stream: Stream, deltas: asyncio.Queue[tuple[str, Any]]) -> AsyncIterator[tuple[str, Any]]:
    """The answer's text and audio as they come, until its job ends (its errors raised) or time runs out."""
    finished = asyncio.wrap_future(job.future)
    finished.add_done_callback(_seen)  # a client that left never reads how its job ended
    first = True
    while not finished.done() or not deltas.empty():
        getter = asyncio.ensure_future(deltas.get())
        try:
            done, _ = await asyncio.wait(
                {getter, finished},
                timeout=max(0.0, stream.deadline - time.perf_counter()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:  # also when a client that left cancels the wait: else the getter stays pending, and asyncio
            getter.cancel()  # logs "Task was destroyed but it is pending!" when it is collected (done: no-op)
        if getter in done:
            if first and stream.place is not None and stream.place.metrics is not None:
                stream.place.metrics.first_token_seconds.observe(time.perf_counter() - stream.started)
            first = False
            yield getter.result()
            continue
        if not done or finished.cancelled() or job.timed_out:
            raise stream.timeout_error()
    if job.timed_out:
        raise stream.timeout_error()


def _seen(future: asyncio.Future[Any]) -> None:
    """Mark a job's end as read (asyncio logs an error it was never asked for)."""
    if not future.cancelled():
        future.exception()


async def _ending(result: GenerationResult, stream: Stream, ids: Ids) -> AsyncIterator[str]:
    """The last events: audio made in one piece, the audio's expiry, the finish reason, the usage."""
    if result.audio is not None:  # an engine that made its audio in one piece
        yield chunk(ids.completion, stream.model, ids.delta("audio", result.audio))
    if ids.spoken:
        expires = int(time.time()) + AUDIO_LIFETIME_SECONDS
        yield chunk(ids.completion, stream.model, {"audio": {"id": ids.audio, "expires_at": expires}})
    yield chunk(
        ids.completion,
        stream.model,
        {},
        finish_reason=result.finish_reason,
        warnings=result.warnings,
        inputs=result.inputs,
    )
    if stream.include_usage:
        yield chunk(ids.completion, stream.model, None, usage=usage_of(result))


class EventStream(StreamingResponse):
    """Server-Sent Events that, however the response ends (a client gone before the first byte included),
    close their generator and give back the request's place in the queue if its job was never queued.

    A client that leaves ends the stream at once, whatever the ASGI server's version: Starlette listens for
    the disconnect only below spec 2.4 and otherwise learns of it from the next event it fails to send, which
    for a job waiting in the queue would come after its prefill."""

    def __init__(self, events: AsyncIterator[str], place: Place | None = None) -> None:
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.place = place

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream_then_stop() -> None:
                    with contextlib.suppress(OSError):  # the client left while an event was being sent
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            if self.place is not None:
                self.place.release()


def streamed(generation: GenerationRequest, stream: Stream) -> EventStream:
    """The streamed answer to `generation`, as the route's response."""
    return EventStream(stream_events(generation, stream), stream.place)
