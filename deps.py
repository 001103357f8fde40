"""What routes share: the model's state, the dependencies that hand out settings, engine and worker,
`run_generation`, which waits for the model thread on a request's behalf, and `wav_bytes` for
spoken answers."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from concurrent.futures import Future
from typing import Annotated, Any, Callable

import numpy as np
import soundfile
from fastapi import Depends, HTTPException, Request

from generation import GenerationRequest, OutOfMemory
from model_worker import ModelWorker, QueueFull
from modeling_low_vram import ConfigError, ModelLoadError, OmniEngine
from settings import Settings

logger = logging.getLogger("multimodal_api")


class ModelState:
    """The engine once loaded, or why it is not (yet)."""

    def __init__(self, engine: Any | None = None) -> None:
        self.engine = engine
        self.error: str | None = None

    def load_in_background(self, settings: Settings, on_failure: Callable[[], None]) -> None:
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


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> OmniEngine:
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


def get_worker(request: Request) -> ModelWorker:
    return request.app.state.worker


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[OmniEngine, Depends(get_engine)]
WorkerDep = Annotated[ModelWorker, Depends(get_worker)]


# ---------------------------------------------------------------- the app


def submit_generation(worker: ModelWorker, engine, generation: GenerationRequest) -> Future:
    """Queue `generation` on the model thread, with a stop event; a full queue is a 503 with Retry-After."""
    generation.stop = threading.Event()
    try:
        return worker.submit(engine.generate, generation)
    except QueueFull as error:
        raise HTTPException(
            503, f"the server is busy ({error}); retry shortly", headers={"Retry-After": "10"}
        ) from None


OUT_OF_MEMORY_RETRY_SECONDS = 10


def out_of_memory_error(error: OutOfMemory) -> HTTPException:
    """A request that ran out of memory: 503, retry later or with less (the message says what to lower)."""
    return HTTPException(503, str(error), headers={"Retry-After": str(OUT_OF_MEMORY_RETRY_SECONDS)})


def abandon(job: Future, generation: GenerationRequest) -> None:
    """Give up on an unfinished generation: cancel it if it has not started (its place frees at once;
    cancelling only an asyncio wrapper would not), or stop it at its next token if it runs."""
    if not job.done():
        generation.stop.set()
        job.cancel()


async def run_generation(
    request: Request, worker: ModelWorker, engine, generation: GenerationRequest, timeout: float, started: float
):
    """Run `generation` on the model thread; give up cleanly if the client leaves or time runs out.

    Giving up cancels a job that has not started and stops a running one at its next token
    (the thread itself cannot be killed); either way the queue moves on at once.
    """
    job = submit_generation(worker, engine, generation)
    future = asyncio.wrap_future(job)
    try:
        while True:
            remaining = started + timeout - time.perf_counter()
            done, _ = await asyncio.wait({future}, timeout=min(0.5, max(remaining, 0)))
            if done:
                return future.result()
            if remaining <= 0:
                raise HTTPException(
                    504,
                    f"the request took longer than {timeout:g} s (REQUEST_TIMEOUT_SECONDS); its generation was stopped",
                )
            if await request.is_disconnected():
                logger.info("client went away; its generation is cancelled")
                raise HTTPException(499, "client closed the request")
    finally:
        abandon(job, generation)


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """A mono float waveform as a 16-bit PCM WAV file."""
    out = io.BytesIO()
    soundfile.write(out, np.clip(samples, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    return out.getvalue()
