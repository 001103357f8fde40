"""Admission and jobs: a request's place in the engine's queue (taken once its body is in), the decoding
pool, and `run_generation`, which waits for the engine on a request's behalf and gives up cleanly when its
client leaves or its time runs out."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

from fastapi import Request

from qwen_omni_server.api.errors import ApiError
from qwen_omni_server.api.metrics import Metrics
from qwen_omni_server.api.uploads import check_pictures
from qwen_omni_server.core.engine import Engine, Worker
from qwen_omni_server.core.errors import Cancelled
from qwen_omni_server.core.media import PictureFile
from qwen_omni_server.core.settings import Settings
from qwen_omni_server.core.types import GenerationRequest, GenerationResult, with_parts_replaced

logger = logging.getLogger("multimodal_api")
T = TypeVar("T")


# ---------------------------------------------------------------- admission and the engine's queue


class Place:
    """A request's place in the engine's queue, taken once its body is in (a slow body holds none; the uploads
    arriving are bounded apart, `api.middleware.Intake`) and before its media is decoded: a request that could
    not be queued gets its 503 before any work is spent on it."""

    def __init__(self, worker: Worker, metrics: Metrics | None = None, state: dict | None = None) -> None:
        self.metrics = metrics
        self.state = state if state is not None else {}
        worker.reserve()  # QueueFull: 503 with Retry-After (api.errors)
        self.worker = worker
        self.held = True
        self.attempt = 0

    def observe(self, result: GenerationResult, attempt: int) -> None:
        """Count a finished generation in the metrics and the request's log line (runs on the worker's thread);
        a generation given up for a later attempt (`renew`) is not the request's and is not counted."""
        if attempt != self.attempt:
            return
        if self.metrics is not None:
            self.metrics.observe_result(result)
        self.state["usage"] = {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "generate_ms": round(sum(result.timings_ms.values()), 1),
        }

    def use(self) -> bool:
        """Hand the place over to the job being submitted."""
        held, self.held = self.held, False
        return held

    def renew(self) -> None:
        """Take the place again for a new attempt at the request (its first job given up, as a recovered
        picture makes it start over): it was admitted, so the queue's bound does not refuse it now."""
        self.release()
        self.worker.reserve(renewing=True)
        self.held = True
        self.attempt += 1

    def release(self) -> None:
        """Give the place back if no job took it (errors, a client gone before its job was queued)."""
        if self.use():
            self.worker.release()


def check_room(request: Request) -> None:
    """A 503 with Retry-After now, before the request's body is read, when the engine's queue is full."""
    request.app.state.model.worker.check_room()


def admit(request: Request) -> Place:
    """A place in the queue for this request whose body is in, or 503 with Retry-After when none is left."""
    return Place(request.app.state.model.worker, request.app.state.metrics, request.scope.setdefault("state", {}))


async def decode_off_loop(request: Request, function: Callable[..., T], *args: Any) -> T:
    """Run a decoder in the bounded decoding pool (DECODE_WORKERS), never on the event loop."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()  # the request id follows the decoder into the log
    started = time.perf_counter()
    try:
        return await loop.run_in_executor(request.app.state.decoders, context.run, function, *args)
    finally:
        seconds = time.perf_counter() - started
        request.app.state.metrics.decode_seconds.observe(seconds)
        state = request.scope.setdefault("state", {})
        state["decode_seconds"] = state.get("decode_seconds", 0.0) + seconds


def decoding_pool(settings: Settings) -> ThreadPoolExecutor:
    """The threads uploads decode on: DECODE_WORKERS at once, the rest wait their turn."""
    return ThreadPoolExecutor(max_workers=settings.decode_workers, thread_name_prefix="decode")


class Job:
    """A generation on the engine's worker. Its inputs are held in a box the worker's thread empties when it
    starts, and `abandon()` empties when the request is given up, so a job cancelled while waiting does
    not keep its decoded frames until a thread reaches it."""

    def __init__(
        self, worker: Worker, engine: Engine, generation: GenerationRequest, place: Place | None, deadline: float
    ) -> None:
        self.stop = threading.Event()
        self._box = [replace(generation, stop=self.stop)]
        reserved = place.use() if place is not None else False
        self.place = place
        self.attempt = place.attempt if place is not None else 0
        self.future: Future = worker.submit(self._run, engine.generate, reserved=reserved)
        # REQUEST_TIMEOUT_SECONDS bounds the job itself, whoever is (or is not) waiting for it.
        loop = asyncio.get_running_loop()
        self.timed_out = False
        timer = loop.call_later(max(0.0, deadline - time.perf_counter()), self._time_out)
        self.future.add_done_callback(lambda _: loop.call_soon_threadsafe(timer.cancel))

    def _run(self, generate: Callable[[GenerationRequest], GenerationResult]) -> GenerationResult:
        if not self._box:
            raise Cancelled("the request was given up before its generation started")
        result = generate(self._box.pop())
        if self.place is not None:
            self.place.observe(result, self.attempt)
        return result

    def _time_out(self) -> None:
        self.timed_out = True
        self.abandon()

    def abandon(self) -> None:
        """Give up on an unfinished generation: cancel it if it has not started (its place frees at once;
        cancelling only an asyncio wrapper would not), or stop it at its next token if it runs."""
        if not self.future.done():
            self.stop.set()
            self.future.cancel()
        self._box.clear()


async def run_generation(
    request: Request,
    worker: Worker,
    engine: Engine,
    generation: GenerationRequest,
    timeout: float,
    started: float,
    place: Place | None = None,
) -> GenerationResult:
    """Run `generation` on the engine's worker; give up cleanly if the client leaves or time runs out.

    Giving up cancels a job that has not started and stops a running one at its next token
    (the thread itself cannot be killed); either way the queue moves on at once.
    """
    job = Job(worker, engine, generation, place, started + timeout)
    future = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait(
            {future, gone},
            timeout=max(0.0, started + timeout - time.perf_counter()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if future in done and not job.timed_out:
            return future.result()
        if gone in done:
            logger.info("client went away; its generation is cancelled")
            raise ApiError(499, "client closed the request")
        raise ApiError(
            504, f"the request took longer than {timeout:g} s (REQUEST_TIMEOUT_SECONDS); its generation was stopped"
        )
    finally:
        gone.cancel()
        job.abandon()


async def run_generation_checking(
    request: Request,
    settings: Settings,
    worker: Worker,
    engine: Engine,
    generation: GenerationRequest,
    pictures: list[tuple[str, PictureFile]],
    timeout: float,
    started: float,
    place: Place | None = None,
) -> GenerationResult:
    """`run_generation` while the pictures that went on as they came (`Engine.passes_files`) are decoded here in
    full, in the decoding pool, as every upload is: checking them adds no time to the answer. One that does not
    decode stops the generation, and its 4xx is the answer; one that decoded only in part (a cut file
    recovered) makes the generation start over with the pixels that decoded, and the answer says so."""
    if not pictures:
        return await run_generation(request, worker, engine, generation, timeout, started, place)
    checking = asyncio.ensure_future(decode_off_loop(request, check_pictures, settings, pictures))
    answering = asyncio.ensure_future(run_generation(request, worker, engine, generation, timeout, started, place))
    try:
        recovered = await checking
    except BaseException:
        answering.cancel()
        await asyncio.gather(answering, return_exceptions=True)
        raise
    if not recovered:
        return await answering
    if place is not None:
        place.renew()  # first: the attempt given up is no longer the request's, whenever it ends
    answering.cancel()
    await asyncio.gather(answering, return_exceptions=True)
    generation, notes = with_recovered(generation, recovered)
    result = await run_generation(request, worker, engine, generation, timeout, started, place)
    result.warnings[:0] = notes
    return result


async def check_pictures_first(
    request: Request,
    settings: Settings,
    generation: GenerationRequest,
    pictures: list[tuple[str, PictureFile]],
    warnings: list[str],
) -> GenerationRequest:
    """The pictures of a streamed answer checked before it starts (its status goes out with its first byte);
    the generation to run, and `warnings` extended with what a recovery noted."""
    if not pictures:
        return generation
    generation, notes = with_recovered(generation, await decode_off_loop(request, check_pictures, settings, pictures))
    warnings += notes
    return generation


def with_recovered(generation: GenerationRequest, recovered: dict) -> tuple[GenerationRequest, list[str]]:
    """The generation with each recovered picture replaced by the pixels that decoded, and the notes saying so."""
    if not recovered:
        return generation, []
    pixels = {id(picture): decoded.image for picture, (_, decoded) in recovered.items()}
    notes = [f"{label}: {note}" for label, decoded in recovered.values() for note in decoded.warnings]
    return with_parts_replaced(generation, pixels), notes


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: what arrives now is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
