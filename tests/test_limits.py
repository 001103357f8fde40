"""Limits enforced as the bytes arrive, and admission before work: each test drives the ASGI app directly
with a body it hands over chunk by chunk, so it can count how much of the body the server read."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import threading
import time
import weakref

import make_media
from conftest import FakeEngine
from PIL import Image

from qwen_omni_server.core.settings import Settings
from qwen_omni_server.server import create_app

CHUNK = 4096
BOUNDARY = "limitsboundary"


def settings(tmp_path, **overrides) -> Settings:
    return Settings(_env_file=None, model_path=str(tmp_path / "unused"), device_map="cpu", **overrides)


def file_part(field: str, name: str, data: bytes) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + b"\r\n"
    )


def value_part(field: str, value: str) -> bytes:
    return f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n{value}\r\n'.encode()


class Exchange:
    """One request to the ASGI app: the body in chunks, counted as the server pulls them."""

    def __init__(self, app, path: str, body: bytes, content_type: str, spec_version: str = "2.3") -> None:
        self.app, self.path, self.content_type, self.spec_version = app, path, content_type, spec_version
        self.chunks = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)] or [b""]
        self.pulled = 0
        self.status: int | None = None
        self.body = b""

    @property
    def bytes_read(self) -> int:
        return sum(len(c) for c in self.chunks[: self.pulled])

    async def receive(self):
        if self.pulled < len(self.chunks):
            self.pulled += 1
            return {
                "type": "http.request",
                "body": self.chunks[self.pulled - 1],
                "more_body": self.pulled < len(self.chunks),
            }
        await asyncio.sleep(3600)  # the client is still there, sending nothing more

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")

    async def run(self) -> Exchange:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": self.spec_version},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", self.content_type.encode()), (b"host", b"test")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        await asyncio.wait_for(self.app(scope, self.receive, self.send), 30)
        return self

    def json(self) -> dict:
        return json.loads(self.body)


def post_form(app, parts: list[bytes], **options) -> Exchange:
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    return asyncio.run(Exchange(app, "/multimodal", body, f"multipart/form-data; boundary={BOUNDARY}", **options).run())


def test_a_file_over_max_file_mb_is_cut_at_the_limit(tmp_path):
    app = create_app(settings(tmp_path, max_file_mb=0.05), engine=FakeEngine())  # 52,428 bytes
    sent = post_form(app, [value_part("text", "hi"), file_part("videos", "big.mp4", b"\0" * 2_000_000)])
    assert sent.status == 413 and "MAX_FILE_MB" in sent.json()["detail"]
    assert "videos[0] 'big.mp4'" in sent.json()["detail"]
    assert sent.bytes_read <= 0.05 * 1024 * 1024 + 2 * CHUNK  # not the 2 MB that was on its way


def test_the_file_one_too_many_is_refused_at_its_headers(tmp_path):
    app = create_app(settings(tmp_path, max_files_per_field=2), engine=FakeEngine())
    picture = make_media.image_bytes("PNG")
    parts = [file_part("images", f"{i}.png", picture) for i in range(3)] + [file_part("images", "x.bin", b"\0" * 10**6)]
    sent = post_form(app, parts)
    assert sent.status == 413 and "MAX_FILES_PER_FIELD" in sent.json()["detail"]
    third = sum(len(p) for p in parts[:2]) + len(parts[2]) - len(picture)
    assert sent.bytes_read <= third + CHUNK  # the third file's bytes, and all after, were never read


def test_an_unknown_field_is_refused_before_its_bytes(tmp_path):
    app = create_app(settings(tmp_path), engine=FakeEngine())
    sent = post_form(app, [file_part("image", "a.png", b"\0" * 10**6)])
    assert sent.status == 422 and "unknown form field(s) ['image']" in sent.json()["detail"]
    assert sent.bytes_read <= 2 * CHUNK


class BlockingEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.started = threading.Event()

    def generate(self, request):
        self.started.set()
        give_up = time.monotonic() + 10
        while not self.release.is_set() and not request.stop.is_set() and time.monotonic() < give_up:
            time.sleep(0.01)
        return super().generate(request)


def test_a_full_queue_is_refused_before_the_upload_is_read(tmp_path):
    engine = BlockingEngine()
    app = create_app(settings(tmp_path, max_waiting_requests=0), engine=engine)

    async def scenario():
        busy = asyncio.ensure_future(
            Exchange(app, "/multimodal", b"text=first", "application/x-www-form-urlencoded").run()
        )
        while not engine.started.is_set():
            await asyncio.sleep(0.01)
        body = file_part("videos", "v.mp4", make_media.video_bytes(2.0)) + f"--{BOUNDARY}--\r\n".encode()
        refused = await Exchange(app, "/multimodal", body, f"multipart/form-data; boundary={BOUNDARY}").run()
        engine.release.set()
        await busy
        return refused

    refused = asyncio.run(scenario())
    assert refused.status == 503 and "busy" in refused.json()["detail"]
    assert refused.pulled == 0  # not a byte of the upload was read, let alone decoded


def test_a_waiting_request_given_up_lets_go_of_its_decoded_media(tmp_path):
    """A job cancelled while it waits no longer holds its frames (the model thread reaches it later)."""
    from qwen_omni_server.api import admission as deps
    from qwen_omni_server.core.types import GenerationRequest
    from qwen_omni_server.core.worker import ModelWorker

    engine = BlockingEngine()

    async def scenario():
        worker = ModelWorker(max_waiting=4)
        first = deps.Job(worker, engine, GenerationRequest("first", None), None, time.perf_counter() + 30)
        picture = Image.new("RGB", (64, 64))
        alive = weakref.ref(picture)
        waiting = deps.Job(
            worker, engine, GenerationRequest("second", None, images=[picture]), None, time.perf_counter() + 30
        )
        del picture
        waiting.abandon()
        gc.collect()
        held_after_abandon = alive() is not None
        engine.release.set()
        await asyncio.wrap_future(first.future)
        worker.shutdown()
        return held_after_abandon

    assert asyncio.run(scenario()) is False
    assert [r.text for r in engine.requests] == ["first"]


def test_decoding_runs_in_a_pool_of_decode_workers(tmp_path):
    from qwen_omni_server.api.admission import decode_off_loop

    app = create_app(settings(tmp_path, decode_workers=2), engine=FakeEngine())
    running, peak, lock = [0], [0], threading.Lock()

    def decode() -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1

    class FakeRequest:
        def __init__(self) -> None:
            self.app = app
            self.scope: dict = {}

    async def scenario():
        await asyncio.gather(*(decode_off_loop(FakeRequest(), decode) for _ in range(8)))

    asyncio.run(scenario())
    assert peak[0] == 2


def test_a_stream_whose_client_left_before_the_first_byte_queues_no_job(tmp_path):
    engine = BlockingEngine()
    app = create_app(settings(tmp_path), engine=engine)

    class Gone(Exchange):
        async def send(self, message) -> None:
            raise OSError("the client is gone")

    body = value_part("text", "hi") + value_part("stream", "true") + f"--{BOUNDARY}--\r\n".encode()

    async def scenario():
        exchange = Gone(app, "/multimodal", body, f"multipart/form-data; boundary={BOUNDARY}", spec_version="2.4")
        with contextlib.suppress(Exception):  # whatever the server makes of it, the client is gone
            await exchange.run()
        await asyncio.sleep(0.3)

    asyncio.run(scenario())
    gc.collect()
    engine.release.set()
    assert engine.requests == [] and not engine.started.is_set()  # nothing ran unattended
    assert app.state.model.worker.stats()["waiting"] == 0  # and its place in the queue was given back


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat(app, parts: list[dict]) -> Exchange:
    body = json.dumps({"messages": [{"role": "user", "content": parts}], "max_tokens": 4}).encode()
    return asyncio.run(Exchange(app, "/v1/chat/completions", body, "application/json").run())


def test_v1_media_parts_have_the_upload_limits(tmp_path):
    picture = make_media.image_bytes("PNG", (320, 240))
    part = {"type": "image_url", "image_url": {"url": data_url(picture)}}
    app = create_app(settings(tmp_path, max_files_per_field=2), engine=FakeEngine())
    assert chat(app, [part, part]).status == 200
    three = chat(app, [part, part, part])
    assert three.status == 413 and "MAX_FILES_PER_FIELD" in three.json()["error"]["message"]
    small = create_app(settings(tmp_path, max_file_mb=len(picture) / 2 / 1024 / 1024), engine=FakeEngine())
    big = chat(small, [part])
    assert big.status == 413 and "MAX_FILE_MB" in big.json()["error"]["message"]
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"\0" * len(picture)).decode()}}
    assert chat(small, [audio]).status == 413


def test_v1_is_refused_before_decoding_when_the_queue_is_full(tmp_path):
    engine = BlockingEngine()
    app = create_app(settings(tmp_path, max_waiting_requests=0), engine=engine)
    decoded = []
    submit = app.state.decoders.submit

    def record(function, *args):  # every decoding passes here
        decoded.append(args)
        return submit(function, *args)

    app.state.decoders.submit = record

    async def scenario():
        busy = asyncio.ensure_future(
            Exchange(app, "/multimodal", b"text=first", "application/x-www-form-urlencoded").run()
        )
        while not engine.started.is_set():
            await asyncio.sleep(0.01)
        part = {"type": "image_url", "image_url": {"url": data_url(make_media.image_bytes("PNG"))}}
        body = json.dumps({"messages": [{"role": "user", "content": [part]}]}).encode()
        refused = await Exchange(app, "/v1/chat/completions", body, "application/json").run()
        engine.release.set()
        await busy
        return refused

    refused = asyncio.run(scenario())
    assert refused.status == 503 and len(decoded) == 1  # the first request's (empty) uploads only


def test_a_body_that_drips_in_is_cut_by_body_timeout_seconds(tmp_path):
    app = create_app(settings(tmp_path, body_timeout_seconds=0.5), engine=FakeEngine())

    class Drip(Exchange):
        async def receive(self):
            if self.pulled:
                await asyncio.sleep(0.1)
            self.pulled += 1
            return {
                "type": "http.request",
                "body": b"x" if self.pulled > 1 else value_part("text", "hi"),
                "more_body": True,
            }

    for path, content_type in (
        ("/multimodal", f"multipart/form-data; boundary={BOUNDARY}"),
        ("/v1/chat/completions", "application/json"),
    ):
        sent = asyncio.run(Drip(app, path, b"", content_type).run())
        assert sent.status == 408 and b"BODY_TIMEOUT_SECONDS" in sent.body
        assert sent.pulled < 20  # about half a second of it
