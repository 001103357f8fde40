"""The served engine's state, and the FastAPI dependencies that hand out settings, engine and worker."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request

from qwen_omni_server.api.errors import UNAVAILABLE_RETRY_SECONDS, ApiError
from qwen_omni_server.core.engine import Engine, Worker
from qwen_omni_server.core.errors import EngineFailed
from qwen_omni_server.core.settings import Settings

logger = logging.getLogger("multimodal_api")
EngineLoader = Callable[[Settings], Engine]


class ModelState:
    """The engine once ready, its worker, or why there is none (yet)."""

    def __init__(self, engine: Engine | None, max_waiting: int) -> None:
        self.engine = engine
        self.worker = engine.new_worker(max_waiting) if engine is not None else None  # for callers without lifespan
        self.error: str | None = None
        self.owned = False  # an engine made here is closed here; one handed in belongs to its maker

    def start(self, settings: Settings, load: EngineLoader | None, on_failure: Callable[[], None]) -> None:
        """A fresh worker for the engine handed in, or the engine loaded in the background (`/health` says
        "loading" until it is ready)."""
        if self.engine is not None:
            self.worker = self.engine.new_worker(settings.max_waiting_requests)  # a fresh one for each start
        elif load is not None:
            threading.Thread(
                target=self._load, args=(settings, load, on_failure), name="engine-loader", daemon=True
            ).start()

    def _load(self, settings: Settings, load: EngineLoader, on_failure: Callable[[], None]) -> None:
        try:
            engine = load(settings)
        except EngineFailed as error:
            self.error = str(error)
            logger.error("%s", error)
            on_failure()
            return
        except Exception as error:  # noqa: BLE001 - anything else is still fatal, with its traceback
            self.error = f"model failed to load: {error}"
            logger.exception("model failed to load")
            on_failure()
            return
        self.worker, self.owned = engine.new_worker(settings.max_waiting_requests), True
        self.engine = engine  # last: a request that sees the engine finds its worker
        logger.info("model ready: %s", engine.describe())

    def stop(self) -> None:
        """The running generation finishes; waiting ones are cancelled; an engine made here is closed, and the
        next start makes a fresh one."""
        if self.worker is not None:
            self.worker.shutdown()
        if self.owned and self.engine is not None:
            self.engine.close()
            self.engine, self.worker, self.owned = None, None, False


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    state: ModelState = request.app.state.model
    if state.engine is None:
        message = "the model could not be loaded; see the server log" if state.error else None
        retry = {"Retry-After": str(UNAVAILABLE_RETRY_SECONDS)}
        raise ApiError(503, message or "the model is still loading; retry shortly", headers=retry)
    return state.engine


def get_worker(request: Request) -> Worker:
    worker = request.app.state.model.worker
    assert worker is not None, "a worker exists once the engine does"
    return worker


def request_started(request: Request) -> float:
    """When the request arrived (perf_counter), by the one request clock the RequestId middleware starts."""
    return request.scope.get("state", {}).get("started") or time.perf_counter()


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
WorkerDep = Annotated[Worker, Depends(get_worker)]
