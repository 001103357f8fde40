"""GET /metrics in Prometheus format (read back with prometheus_client's own parser), and the access log."""

from __future__ import annotations

import json
import logging

from conftest import upload
from prometheus_client.parser import text_string_to_metric_families

from qwen_omni_server.api.middleware import JsonFormatter


def samples(client, **headers) -> dict:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_count_requests_queue_decoding_and_tokens(client, media_dir):
    assert client.post("/multimodal", data={"text": "hi"}).status_code == 200
    images = [("images", upload(media_dir / "image.png"))]
    assert client.post("/multimodal", data={"text": "hi"}, files=images).status_code == 200
    assert client.post("/multimodal", data={"text": "hi", "max_new_tokens": "0"}).status_code == 422
    seen = samples(client)
    route = ("route", "/multimodal")
    assert seen[("omni_requests_total", (route, ("status", "200")))] == 2
    assert seen[("omni_requests_total", (route, ("status", "422")))] == 1
    assert seen[("omni_request_seconds_count", (route,))] == 3
    assert seen[("omni_queue_waiting", ())] == 0 and seen[("omni_queue_rejections_total", ())] == 0
    assert seen[("omni_decode_seconds_count", ())] == 2  # the 422 was refused before decoding
    assert seen[("omni_generation_seconds_count", ())] == 2
    assert seen[("omni_tokens_total", (("direction", "in"), ("modality", "text")))] == 20  # the fake's 10 each
    assert seen[("omni_tokens_total", (("direction", "out"), ("modality", "text")))] == 6


def test_metrics_need_the_api_key_unless_opened(make_client, fake_engine):
    closed = make_client(fake_engine, api_key="s3cret-key-123")
    assert closed.get("/metrics").status_code == 401
    assert samples(closed, Authorization="Bearer s3cret-key-123")
    opened = make_client(fake_engine, api_key="s3cret-key-123", metrics_public=True)
    assert samples(opened)


def test_one_log_line_per_request_with_id_sizes_tokens_and_times(client, caplog):
    with caplog.at_level(logging.INFO, logger="multimodal_api"):
        response = client.post("/multimodal", data={"text": "hi"}, headers={"X-Request-ID": "trace-7"})
    lines = [r for r in caplog.records if hasattr(r, "access")]
    assert len(lines) == 1
    record = lines[0]
    assert record.access["route"] == "/multimodal" and record.access["status"] == 200
    assert record.access["bytes_in"] > 0 and record.access["bytes_out"] == len(response.content)
    assert record.access["prompt_tokens"] == 10 and record.access["completion_tokens"] == 3
    assert record.access["total_ms"] > 0
    record.request_id = "trace-7"  # what RequestIdFilter puts on it
    entry = json.loads(JsonFormatter().format(record))
    assert entry["request_id"] == "trace-7" and entry["status"] == 200 and entry["completion_tokens"] == 3


def test_log_format_json_writes_one_object_per_line(tiny_model_dir, tmp_path):
    import subprocess

    import httpx
    from servers import start_server

    server, base = start_server(
        tmp_path,
        {"MODEL_PATH": str(tiny_model_dir), "DEVICE_MAP": "cpu", "LOG_FORMAT": "json"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        httpx.post(f"{base}/multimodal", data={"text": "hi", "max_new_tokens": "3"}, headers={"X-Request-ID": "json-1"})
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=60)
    entries = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    others = [line for line in output.splitlines() if line.strip() and not line.startswith("{")]
    assert not [line for line in others if "multimodal_api" in line or "uvicorn" in line]  # ours are all JSON
    assert not [line for line in others if "it/s]" in line]  # no progress bar breaks a line in two
    assert any(e["logger"] == "uvicorn.error" for e in entries)
    access = [e for e in entries if e.get("route") == "/multimodal"]
    assert len(access) == 1 and access[0]["request_id"] == "json-1" and access[0]["status"] == 200
    assert access[0]["completion_tokens"] == 3 and access[0]["bytes_in"] > 0


def test_metrics_and_health_answer_while_the_engine_loads(tmp_path):
    """Before the engine is ready there is no queue yet: /metrics still answers (an empty queue), /health says
    loading, and the routes that need the engine answer 503."""
    import threading

    from fastapi.testclient import TestClient

    from qwen_omni_server.api.app import create_app
    from qwen_omni_server.core.settings import Settings

    release = threading.Event()

    def slow_load(settings):
        release.wait(30)
        raise RuntimeError("never loads")

    settings = Settings(_env_file=None, model_path=str(tmp_path))
    with TestClient(create_app(settings, load_engine=slow_load)) as client:
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and "omni_queue_waiting 0.0" in metrics.text
        assert client.get("/health").json()["status"] == "loading"
        assert client.post("/multimodal", data={"text": "hi"}).status_code == 503
        release.set()
