"""What the server counts, served as Prometheus text at GET /metrics (prometheus-client).

One registry per app. Counted as they happen: requests by route and status, request seconds, queue
rejections, decode seconds, time to first token (streamed answers), generation seconds, tokens in (by
modality) and out. Read when scraped: the queue's depth and the GPU memory in use and at its peak (only
once CUDA is initialised; this module never imports torch itself).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROUTES = frozenset({"/", "/health", "/metrics", "/multimodal", "/v1/chat/completions", "/v1/models", "/docs"})
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def route_of(path: str) -> str:
    """The route label: known routes by name, anything else as `other` (labels stay few)."""
    return path if path in ROUTES else "other"


class Metrics:
    """The server's Prometheus metrics; `worker` returns the engine's worker (None while it loads) when scraped,
    `intake` counts the request bodies arriving (`api.middleware.Intake`)."""

    def __init__(self, worker: Callable[[], Any], intake: Any = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "omni_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "omni_request_seconds", "Time from arrival to the end of the answer", ["route"], buckets=SECONDS, registry=r
        )
        self.decode_seconds = Histogram(
            "omni_decode_seconds", "Time spent decoding one request's media", buckets=SECONDS, registry=r
        )
        self.first_token_seconds = Histogram(
            "omni_time_to_first_token_seconds",
            "Time from arrival to the first streamed text",
            buckets=SECONDS,
            registry=r,
        )
        self.generation_seconds = Histogram(
            "omni_generation_seconds",
            "Time the model spent on one request (prompt and answer)",
            buckets=SECONDS,
            registry=r,
        )
        self.tokens = Counter(
            "omni_tokens", "Tokens in (prompt, by modality) and out (answer)", ["direction", "modality"], registry=r
        )
        r.register(_Live(worker, intake))

    def observe_result(self, result) -> None:
        """Count one finished generation (a GenerationResult)."""
        for modality, count in (result.prompt_tokens_by_modality or {"text": result.prompt_tokens}).items():
            self.tokens.labels("in", modality).inc(count)
        self.tokens.labels("out", "text").inc(result.completion_tokens)
        self.generation_seconds.observe(sum(result.timings_ms.values()) / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live:
    """What is read at each scrape: the uploads arriving, the queue, and the GPU's memory."""

    def __init__(self, worker: Callable[[], Any], intake: Any = None) -> None:
        self.worker = worker
        self.intake = intake

    def collect(self) -> Iterator[Metric]:
        worker = self.worker()  # None while the engine loads: nothing is queued yet
        stats: dict[str, Any] = worker.stats() if worker is not None else {"waiting": 0, "running": 0}
        yield GaugeMetricFamily(
            "omni_queue_waiting", "Requests holding a place in the engine's queue", value=stats["waiting"]
        )
        yield GaugeMetricFamily("omni_queue_running", "Generations running", value=stats["running"])
        yield CounterMetricFamily(
            "omni_queue_rejections",
            "Requests refused with 503 because the queue was full",
            value=worker.rejected if worker is not None else 0,
        )
        if "batching" in stats:
            yield from _batching(stats["batching"])
        if self.intake is not None:
            uploads = self.intake.stats()
            yield GaugeMetricFamily("omni_uploads_in_flight", "Request bodies arriving", value=uploads["uploads"])
            yield GaugeMetricFamily(
                "omni_upload_bytes_in_flight", "Bytes of the request bodies arriving", value=uploads["bytes"]
            )
            yield CounterMetricFamily(
                "omni_upload_rejections",
                "Request bodies refused with 503 (MAX_UPLOADS_IN_FLIGHT, MAX_UPLOAD_MB_IN_FLIGHT)",
                value=uploads["refused"],
            )
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            used = GaugeMetricFamily("omni_gpu_memory_bytes", "GPU memory allocated by tensors", labels=["device"])
            peak = GaugeMetricFamily("omni_gpu_memory_peak_bytes", "Peak GPU memory allocated", labels=["device"])
            for index in range(torch.cuda.device_count()):
                used.add_metric([str(index)], torch.cuda.memory_allocated(index))
                peak.add_metric([str(index)], torch.cuda.max_memory_allocated(index))
            yield used
            yield peak


def _batching(stats: dict[str, Any]) -> Iterator[Metric]:
    """Batching's counters (MAX_BATCH_SIZE > 1): steps by rows in the batch, rows now, rows that left early."""
    yield GaugeMetricFamily(
        "omni_batch_max_rows", "MAX_BATCH_SIZE: the most rows a batch holds", value=stats["max_rows"]
    )
    yield GaugeMetricFamily("omni_batch_rows", "Rows in the batch decoding now", value=stats["rows"])
    steps = CounterMetricFamily("omni_batch_steps", "Decoding steps, by rows in the batch", labels=["rows"])
    for rows, count in sorted(stats["steps_by_rows"].items()):
        steps.add_metric([str(rows)], count)
    yield steps
    yield CounterMetricFamily(
        "omni_batch_rows_finished_early",
        "Rows that left their batch (stop, length, stopped) while other rows went on decoding",
        value=stats["finished_early"],
    )
