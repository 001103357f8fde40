"""The worker that runs an engine's jobs off the event loop: its threads (one owns a local model) and a bounded
wait queue."""

from __future__ import annotations

import contextvars
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from qwen_omni_server.core.errors import QueueFull

T = TypeVar("T")


class ModelWorker:
    """The threads that run an engine's jobs in arrival order: by default one, which owns the local model, so
    jobs run one at a time.

    At most `max_waiting` jobs wait; more are refused at once (QueueFull). A waiter whose client
    went away cancels its job if it has not started; a running job always finishes (or is
    stopped cooperatively, see GenerationRequest.stop) on this thread, so two never overlap.
    """

    def __init__(
        self,
        max_waiting: int = 32,
        threads: int = 1,
        name: str = "model",
        details: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._lock = threading.Lock()
        self.threads = threads
        self.details = details  # what the engine adds to `stats` (batching's counters)
        self.max_waiting = max_waiting
        self.waiting = 0
        self.running = 0
        self.peak_running = 0
        self.rejected = 0

    def refusal(self) -> str | None:
        """Why no job could be admitted now (call with the lock held), or None when there is room."""
        if self.waiting + self.running >= self.max_waiting + self.threads:  # `threads` running, max_waiting waiting
            return f"{self.waiting} requests are already waiting for the model"
        return None

    def check_room(self) -> None:
        """QueueFull when a request arriving now could not be admitted; reserves nothing (a request checks this
        before its body is read, and reserves once its body is in)."""
        with self._lock:
            self._refuse_if_full()

    def reserve(self, *, renewing: bool = False) -> None:
        """Take a place in the queue before the request's work (decoding, generation) begins; QueueFull when
        none is left. The place is used by `submit(..., reserved=True)` or given back by `release()`.
        `renewing`: the place is for a request admitted already whose first job was given up (it starts over
        with recovered pixels), so no bound applies: it only takes back the place that job held."""
        with self._lock:
            if not renewing:
                self._refuse_if_full()
            self.waiting += 1

    def _refuse_if_full(self) -> None:
        """QueueFull, counted, when `refusal` gives a reason (call with the lock held)."""
        if (reason := self.refusal()) is not None:
            self.rejected += 1
            raise QueueFull(reason)

    def release(self) -> None:
        """Give back a place taken by `reserve()` and never used."""
        with self._lock:
            self.waiting -= 1

    def submit(self, job: Callable[..., T], *args: Any, reserved: bool = False) -> Future:
        """Queue `job(*args)` on the worker's threads; QueueFull when too many already wait."""
        if not reserved:
            self.reserve()
        context = contextvars.copy_context()  # the request id follows the job into the log
        future = self._executor.submit(context.run, self._track, job, *args)
        future.add_done_callback(self._forget_if_cancelled)
        return future

    def _track(self, job: Callable[..., T], *args: Any) -> T:
        with self._lock:
            self.waiting -= 1
            self.running += 1
            self.peak_running = max(self.peak_running, self.running)
        try:
            return job(*args)
        finally:
            with self._lock:
                self.running -= 1

    def _forget_if_cancelled(self, future: Future) -> None:
        if future.cancelled():  # never started: it no longer waits
            with self._lock:
                self.waiting -= 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            stats: dict[str, Any] = {
                "running": self.running,
                "waiting": self.waiting,
                "peak_running": self.peak_running,
            }
        if self.details is not None:
            stats["batching"] = self.details()
        return stats

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
