"""The upstreams and what this process knows of them: which are up (each probed every PROBE_SECONDS), how
busy each is, which one a request goes to, and the worker that admits as many requests as they take."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from qwen_omni_server.core.errors import EngineUnavailable
from qwen_omni_server.core.worker import ModelWorker

logger = logging.getLogger("multimodal_api")
PROBE_SECONDS = 1.0
CONNECT_SECONDS = 5.0


@dataclass
class Upstream:
    """One OpenAI-compatible server and what this process knows of it."""

    url: str
    state: str = "unknown"  # unknown (not probed yet), up, down
    model: str | None = None
    vllm: bool = True  # vLLM's conventions (its /models says owned_by "vllm"; unknown upstreams too), or this server's
    in_flight: int = 0
    served: int = 0
    failed: int = 0
    last_error: str | None = None
    since: float = field(default_factory=time.time)

    def report(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "state": self.state,
            "model": self.model,
            "in_flight": self.in_flight,
            "served": self.served,
            "failed": self.failed,
            "last_error": self.last_error,
            "since": int(self.since),
        }


class Pool:
    """The upstreams of ENGINE_URLS: each request goes to the reachable one with the fewest in flight."""

    def __init__(self, urls: list[str], per_upstream: int) -> None:
        self.upstreams = [Upstream(url) for url in urls]
        self.per_upstream = per_upstream  # as the local model: one running, the rest waiting
        self._lock = threading.Lock()

    def report(self) -> list[dict[str, Any]]:
        with self._lock:
            return [u.report() for u in self.upstreams]

    def capacity(self) -> int:
        """Requests the reachable upstreams may have in flight together."""
        with self._lock:
            return self.per_upstream * sum(u.state == "up" for u in self.upstreams)

    def model(self) -> str | None:
        return next((u.model for u in self.upstreams if u.model), None)

    def kinds(self) -> set[bool]:
        """The kinds of upstream a request may go to now (vLLM or not): of those up, else of all."""
        with self._lock:
            up = [u for u in self.upstreams if u.state == "up"] or self.upstreams
            return {u.vllm for u in up}

    def choose(self, tried: list[Upstream]) -> Upstream:
        """The least busy upstream that is up and not tried yet, now counted in flight; EngineUnavailable if none."""
        with self._lock:
            ready = [
                u for u in self.upstreams if u.state == "up" and u not in tried and u.in_flight < self.per_upstream
            ]
            if not ready:
                states = ", ".join(f"{u.url} {u.state}" for u in self.upstreams)
                raise EngineUnavailable(f"no upstream engine can take the request now ({states}); see /health")
            chosen = min(ready, key=lambda u: (u.in_flight, u.served))
            chosen.in_flight += 1
            return chosen

    def finished(self, upstream: Upstream, *, served: bool = False, error: str | None = None) -> None:
        """A request that `choose` sent to `upstream` is over: served, failed with `error`, or given up."""
        with self._lock:
            upstream.in_flight -= 1
            upstream.served += served
            if error is not None:
                upstream.failed += 1
                upstream.last_error = error

    def mark(
        self, upstream: Upstream, state: str, error: str | None = None, model: str | None = None, owner: str = ""
    ) -> None:
        with self._lock:
            if owner:
                upstream.vllm = owner != "qwen"  # this server's /v1/models says "qwen"
            if upstream.state != state:
                logger.log(logging.INFO if state == "up" else logging.WARNING, "upstream %s is %s", upstream.url, state)
                upstream.state, upstream.since = state, time.time()
            upstream.last_error = error or upstream.last_error
            upstream.model = model or upstream.model

    async def probe_forever(self, client: httpx.AsyncClient) -> None:
        while True:
            await asyncio.gather(*(self._probe(client, u) for u in self.upstreams))
            await asyncio.sleep(PROBE_SECONDS)

    async def _probe(self, client: httpx.AsyncClient, upstream: Upstream) -> None:
        """An upstream is up while its /models answers with a model."""
        try:
            response = await client.get(f"{upstream.url}/models", timeout=CONNECT_SECONDS)
            response.raise_for_status()
            models = response.json().get("data") or []
            if not models:
                raise ValueError("no model listed")
            self.mark(upstream, "up", model=str(models[0].get("id")), owner=str(models[0].get("owned_by") or "-"))
        except (httpx.HTTPError, ValueError, AttributeError) as error:
            self.mark(upstream, "down", f"/models: {type(error).__name__}: {str(error)[:200]}")


class UpstreamWorker(ModelWorker):
    """Runs the upstream engine's calls on threads; admits as many as the reachable upstreams take together.

    ModelWorker's queue, with a thread for every place the upstreams could offer, so an admitted job
    starts at once; how many places there are follows the upstreams' states (`Pool.capacity`)."""

    def __init__(self, pool: Pool) -> None:
        super().__init__(threads=pool.per_upstream * len(pool.upstreams), name="upstream")
        self.pool = pool

    def refusal(self) -> str | None:
        capacity = self.pool.capacity()
        if capacity == 0:
            return "no upstream engine is reachable; see /health"
        if self.waiting + self.running >= capacity:
            return f"{self.waiting + self.running} requests are in flight, as many as the upstreams take"
        return None
