"""Reliability and security: API key, request ids, clean errors, CORS, the bounded queue, time limits,
clients that leave, hostile input, and a clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
import urllib.parse

import httpx
import pytest
from conftest import FakeEngine, serve, tiny_settings
from fastapi import HTTPException
from fastapi.testclient import TestClient
from servers import start_server

from qwen_omni_server.api.admission import run_generation
from qwen_omni_server.core.settings import Settings
from qwen_omni_server.core.worker import ModelWorker
from qwen_omni_server.server import create_app


class BlockingEngine(FakeEngine):
    """Generates until released, or until the request's stop event is set (as the real one does)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.stopped: list[bool] = []

    def generate(self, request):
        give_up = time.monotonic() + 10  # a failing test must not hang the suite
        while not self.release.is_set() and time.monotonic() < give_up:
            if request.stop is not None and request.stop.is_set():
                self.stopped.append(True)
                break
            time.sleep(0.01)
        return super().generate(request)


def test_api_key_guards_everything_but_health(make_client, fake_engine):
    client = make_client(fake_engine, api_key="s3cret-key-123")
    assert client.get("/health").status_code == 200
    for method, path in (("GET", "/"), ("POST", "/multimodal"), ("GET", "/openapi.json")):
        response = client.request(method, path, data={"text": "hi"} if method == "POST" else None)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in response.json()["detail"]
    wrong = client.post("/multimodal", data={"text": "hi"}, headers={"Authorization": "Bearer nope-nope-nope"})
    assert wrong.status_code == 401
    right = client.post("/multimodal", data={"text": "hi"}, headers={"Authorization": "Bearer s3cret-key-123"})
    assert right.status_code == 200


def test_every_answer_carries_a_request_id(client):
    ok = client.post("/multimodal", data={"text": "hi"})
    bad = client.post("/multimodal", data={})
    assert len(ok.headers["x-request-id"]) == 16 and bad.headers["x-request-id"] != ok.headers["x-request-id"]
    echoed = client.get("/health", headers={"X-Request-ID": "trace-42"})
    assert echoed.headers["x-request-id"] == "trace-42"
    hostile = client.get("/health", headers={"X-Request-ID": "bad id\nwith newline"})
    assert hostile.headers["x-request-id"] != "bad id\nwith newline"


def test_internal_errors_hide_tracebacks_and_paths_but_log_them(tmp_path, caplog):
    class BrokenEngine(FakeEngine):
        def generate(self, request):
            raise RuntimeError("/very/secret/server/path exploded")

    settings = Settings(_env_file=None, model_path=str(tmp_path))
    with TestClient(create_app(settings, engine=BrokenEngine()), raise_server_exceptions=False) as client:
        response = client.post("/multimodal", data={"text": "hi"})
    assert response.status_code == 500
    body = response.text
    assert "secret" not in body and "Traceback" not in body
    assert response.headers["x-request-id"] in response.json()["detail"]
    assert "/very/secret/server/path exploded" in caplog.text


def test_cors_is_off_unless_origins_are_listed(make_client, fake_engine):
    origin = {"Origin": "https://ui.example.org"}
    assert "access-control-allow-origin" not in make_client(fake_engine).get("/health", headers=origin).headers
    allowed = make_client(fake_engine, cors_origins=["https://ui.example.org"]).get("/health", headers=origin)
    assert allowed.headers["access-control-allow-origin"] == "https://ui.example.org"


def test_a_full_queue_answers_503_with_retry_after_at_once(make_client):
    engine = BlockingEngine()
    client = make_client(engine, max_waiting_requests=1)
    results: list[httpx.Response] = []
    threads = [
        threading.Thread(target=lambda: results.append(client.post("/multimodal", data={"text": "q"})))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    worker = client.app.state.model.worker
    deadline = time.monotonic() + 10
    while worker.stats() != {"running": 1, "waiting": 1, "peak_running": 1} and time.monotonic() < deadline:
        time.sleep(0.01)  # until one runs and one waits
    refused = client.post("/multimodal", data={"text": "one too many"})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "10"
    assert not engine.release.is_set() and worker.stats()["running"] == 1  # answered while the queue was full
    engine.release.set()
    for thread in threads:
        thread.join()
    assert sorted(r.status_code for r in results) == [200, 200]


LONG = {"text": "Tell a long story.", "max_new_tokens": "2048"}  # the tiny model never stops early on it


def test_the_time_limit_gives_504_and_stops_the_running_generation(counting_engine, tiny_model_dir):
    settings = tiny_settings(tiny_model_dir, request_timeout_seconds=1.5, max_new_tokens_limit=2048)
    # 2 ms per token: the whole answer takes over 4 s on any machine, so the time limit is what ends it.
    pace = counting_engine.model.thinker.lm_head.register_forward_hook(lambda *args: time.sleep(0.002))
    with pace_removed(pace), TestClient(create_app(settings, engine=counting_engine)) as client:
        response = client.post("/multimodal", data=LONG)
        assert response.status_code == 504 and "REQUEST_TIMEOUT_SECONDS" in response.json()["detail"]
        streamed = client.post("/multimodal", data={**LONG, "stream": "true"})
    assert counting_engine.at_stop is not None and counting_engine.at_stop >= 3  # it was generating
    assert counting_engine.tokens - counting_engine.at_stop <= 3  # and stopped within a few tokens
    assert counting_engine.tokens < 2048
    assert '"code": "timeout"' in streamed.text and "REQUEST_TIMEOUT_SECONDS" in streamed.text


@contextlib.contextmanager
def pace_removed(hook):
    try:
        yield
    finally:
        hook.remove()


def _leave_when_running(base: str, engine, data: dict) -> None:
    """Send a form over a raw socket, and close it once the generation is running."""
    body = urllib.parse.urlencode(data).encode()
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(
            b"POST /multimodal HTTP/1.1\r\nHost: test\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert engine.running.wait(30)


@pytest.mark.parametrize("stream", ["false", "true"])
def test_a_client_that_leaves_stops_its_generation_within_a_few_tokens(counting_engine, tiny_model_dir, stream):
    settings = tiny_settings(tiny_model_dir, max_new_tokens_limit=2048)
    for base in serve(create_app(settings, engine=counting_engine)):
        _leave_when_running(base, counting_engine, {**LONG, "stream": stream})
        deadline = time.monotonic() + 30
        while counting_engine.at_stop is None and time.monotonic() < deadline:
            time.sleep(0.01)
        while not counting_engine.results and time.monotonic() < deadline:
            time.sleep(0.01)
        assert httpx.get(f"{base}/health").json()["generations"]["running"] == 0
    assert counting_engine.at_stop is not None and counting_engine.at_stop >= 3  # it was generating
    assert counting_engine.tokens - counting_engine.at_stop <= 3  # and stopped within a few tokens
    assert counting_engine.results[0].completion_tokens < 2048


def test_a_client_that_leaves_while_waiting_frees_its_place(fake_engine):
    class GoneRequest:
        async def receive(self) -> dict:
            return {"type": "http.disconnect"}

    async def scenario():
        worker = ModelWorker(max_waiting=4)
        engine = BlockingEngine()
        blocker = asyncio.wrap_future(worker.submit(engine.generate, _request("first")))
        await asyncio.sleep(0.1)
        waiting = _request("second")
        with pytest.raises(HTTPException) as gone:
            await run_generation(GoneRequest(), worker, engine, waiting, timeout=30, started=time.perf_counter())
        assert gone.value.status_code == 499
        assert worker.stats()["waiting"] == 0  # its place is free
        engine.release.set()
        await blocker
        worker.shutdown()
        assert [r.text for r in engine.requests] == ["first"]  # the second never ran
        assert worker.peak_running == 1

    asyncio.run(scenario())


def _request(text: str):
    from qwen_omni_server.core.types import GenerationRequest

    return GenerationRequest(text, None)


@pytest.mark.parametrize(
    ("data", "files", "status"),
    [
        ({"text": "hi", "max_new_tokens": "-5"}, [], 422),
        ({"text": "hi", "max_new_tokens": "9" * 40}, [], 422),
        ({"text": "hi", "extract_video_frame": "[1, 2]"}, [], 422),
        ({"text": "hi", "images": "not a file"}, [], 422),
        ({}, [("images", ("../../etc/passwd", b"GIF89a junk"))], 415),
        ({}, [("images", ("evil\x00name.png", b"\x89PNG\r\n\x1a\n junk"))], 400),
        ({}, [("images", ("photo.png", b"hello, I am text", "image/png"))], 415),  # the content type lies
    ],
)
def test_hostile_form_input_gets_a_clear_4xx(client, data, files, status):
    response = client.post("/multimodal", data=data, files=files)
    assert response.status_code == status, response.text
    assert "\x00" not in response.json()["detail"]


def test_thousands_of_tiny_files_are_refused(client):
    files = [("images", (f"{i}.png", b"x")) for i in range(1500)]
    response = client.post("/multimodal", files=files)
    assert response.status_code in (400, 413) and response.json()["detail"]


def test_sigterm_lets_the_running_generation_finish(tiny_model_dir, tmp_path):
    """SIGTERM while an answer streams: it was running (text had arrived), and it is finished in full."""
    server, base = start_server(
        tmp_path,
        {"MODEL_PATH": str(tiny_model_dir), "DEVICE_MAP": "cpu", "MAX_NEW_TOKENS_LIMIT": "2048"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    events: list[dict] = []
    try:
        with (
            httpx.Client(timeout=120) as client,
            client.stream(
                "POST", f"{base}/multimodal", data={**LONG, "max_new_tokens": "800", "stream": "true"}
            ) as answer,
        ):
            lines = answer.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                if sum(1 for e in events if e["choices"] and e["choices"][0]["delta"].get("content")) >= 3:
                    break
            server.send_signal(signal.SIGTERM)  # the generation is running: text is arriving
            events += [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        # uvicorn shuts down gracefully, then re-raises the signal: exit status -15 (143 in a shell).
        assert server.wait(60) in (0, -signal.SIGTERM)
    finally:
        if server.poll() is None:
            server.kill()
    usage = next(e["usage"] for e in events if e.get("usage"))
    assert usage["completion_tokens"] == 800  # not cut short by the shutdown
    assert any(e["choices"] and e["choices"][0]["finish_reason"] == "length" for e in events)
