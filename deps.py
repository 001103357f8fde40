"""What routes share: the model's state, the dependencies that hand out settings, engine and worker,
`run_generation`, which waits for the model thread on a request's behalf, and `wav_bytes` for
spoken answers."""

from __future__ import annotations

import asyncio
import contextvars
import io
import logging
import threading
import time
from concurrent.futures import Future
from typing import Annotated, Any, Callable, TypeVar

import numpy as np
import soundfile
from fastapi import Depends, HTTPException, Request

from engine import Engine, EngineUnavailable, Worker
from generation import Cancelled, GenerationRequest, OutOfMemory, with_parts_replaced
from media import PictureFile
from model_worker import ModelWorker, QueueFull
from remote_engine import RemoteEngine, UpstreamWorker
from settings import Settings
from uploads import check_pictures

logger = logging.getLogger("multimodal_api")
T = TypeVar("T")


class ModelState:
    """The engine once loaded, or why it is not (yet): the model here (ENGINE=local) or the upstreams (openai)."""

    def __init__(self, engine: Engine | None = None) -> None:
        self.engine = engine
        self.error: str | None = None
        self.owned = False  # an engine made here is closed here; one handed in belongs to its maker

    def load_in_background(self, settings: Settings, on_failure: Callable[[], None]) -> None:
        if settings.engine == "openai":  # nothing to load: the upstreams are probed in the background
            self.engine, self.owned = RemoteEngine(settings), True
            return

        from modeling_low_vram import ConfigError, ModelLoadError, OmniEngine  # torch: only for a local model

        def load() -> None:
            try:
                self.engine = OmniEngine.load(settings)
                logger.info("model ready: %s", self.engine.describe())
            except (ModelLoadError, ConfigError) as error:
                self.error = str(error)
                logger.error("%s", error)
                on_failure()
            except Exception as error:  # noqa: BLE001 - anything else is still fatal, with its traceback
                self.error = f"model failed to load: {error}"
                logger.exception("model failed to load")
                on_failure()

        threading.Thread(target=load, name="model-loader", daemon=True).start()

    def new_worker(self, settings: Settings) -> Worker:
        """What runs the engine's jobs: the model's one thread, or threads for as many as the upstreams take."""
        if isinstance(self.engine, RemoteEngine):
            return UpstreamWorker(self.engine)
        return ModelWorker(settings.max_waiting_requests)

    def upstream_report(self) -> list[dict[str, Any]] | None:
        """Each upstream's state, with ENGINE=openai; None for the model in this process."""
        return self.engine.upstream_report() if isinstance(self.engine, RemoteEngine) else None

    def close(self) -> None:
        if self.owned and isinstance(self.engine, RemoteEngine):
            self.engine.close()


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    state: ModelState = request.app.state.model
    if state.engine is None:
        raise HTTPException(
            503,
            "the model could not be loaded; see the server log"
            if state.error
            else "the model is still loading; retry shortly",
            headers={"Retry-After": "5"},
        )
    return state.engine


def get_worker(request: Request) -> Worker:
    return request.app.state.worker


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
WorkerDep = Annotated[Worker, Depends(get_worker)]


# ---------------------------------------------------------------- admission and the model's queue


class Place:
    """A request's place in the model's queue, taken when it arrives, before its body is read or decoded:
    a request that could not be queued gets its 503 before any work is spent on it."""

    def __init__(self, worker: ModelWorker, metrics=None, state: dict | None = None) -> None:
        self.metrics = metrics
        self.state = state if state is not None else {}
        try:
            worker.reserve()
        except QueueFull as error:
            raise HTTPException(
                503, f"the server is busy ({error}); retry shortly", headers={"Retry-After": "10"}
            ) from None
        self.worker = worker
        self.held = True

    def observe(self, result) -> None:
        """Count a finished generation in the metrics and the request's log line (runs on the model thread)."""
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

    def release(self) -> None:
        """Give the place back if no job took it (errors, a client gone before its job was queued)."""
        if self.use():
            self.worker.release()


def request_started(request: Request) -> float:
    """When the request arrived (perf_counter), by the one request clock the RequestId middleware starts."""
    return request.scope.get("state", {}).get("started") or time.perf_counter()


def admit(request: Request) -> Place:
    """A place in the queue for this request, or 503 with Retry-After when none is left."""
    return Place(request.app.state.worker, request.app.state.metrics, request.scope.setdefault("state", {}))


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


OUT_OF_MEMORY_RETRY_SECONDS = 10


def out_of_memory_error(error: OutOfMemory) -> HTTPException:
    """A request that ran out of memory: 503, retry later or with less (the message says what to lower)."""
    return HTTPException(503, str(error), headers={"Retry-After": str(OUT_OF_MEMORY_RETRY_SECONDS)})


class Job:
    """A generation on the model thread. Its inputs are held in a box the model thread empties when it
    starts, and `abandon()` empties when the request is given up, so a job cancelled while waiting does
    not keep its decoded frames until the model thread reaches it."""

    def __init__(
        self, worker: ModelWorker, engine, generation: GenerationRequest, place: Place | None, deadline: float
    ) -> None:
        generation.stop = self.stop = threading.Event()
        self._box = [generation]
        reserved = place.use() if place is not None else False
        self.place = place
        try:
            self.future: Future = worker.submit(self._run, engine.generate, reserved=reserved)
        except QueueFull as error:
            raise HTTPException(
                503, f"the server is busy ({error}); retry shortly", headers={"Retry-After": "10"}
            ) from None
        # REQUEST_TIMEOUT_SECONDS bounds the job itself, whoever is (or is not) waiting for it.
        loop = asyncio.get_running_loop()
        self.timed_out = False
        timer = loop.call_later(max(0.0, deadline - time.perf_counter()), self._time_out)
        self.future.add_done_callback(lambda _: loop.call_soon_threadsafe(timer.cancel))

    def _run(self, generate: Callable[[GenerationRequest], Any]):
        if not self._box:
            raise Cancelled("the request was given up before its generation started")
        result = generate(self._box.pop())
        if self.place is not None:
            self.place.observe(result)
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
    worker: ModelWorker,
    engine,
    generation: GenerationRequest,
    timeout: float,
    started: float,
    place: Place | None = None,
):
    """Run `generation` on the model thread; give up cleanly if the client leaves or time runs out.

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
            try:
                return future.result()
            except EngineUnavailable as error:
                raise HTTPException(error.status, str(error), headers={"Retry-After": "5"}) from None
        if gone in done:
            logger.info("client went away; its generation is cancelled")
            raise HTTPException(499, "client closed the request")
        raise HTTPException(
            504, f"the request took longer than {timeout:g} s (REQUEST_TIMEOUT_SECONDS); its generation was stopped"
        )
    finally:
        gone.cancel()
        job.abandon()


async def run_generation_checking(
    request: Request,
    settings: Settings,
    worker: ModelWorker,
    engine,
    generation: GenerationRequest,
    pictures: list[tuple[str, PictureFile]],
    timeout: float,
    started: float,
    place: Place | None = None,
):
    """`run_generation` while the pictures that went upstream as they came (ENGINE=openai) are decoded here in
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


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """A mono float waveform as a 16-bit PCM WAV file."""
    out = io.BytesIO()
    soundfile.write(out, np.clip(samples, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    return out.getvalue()
