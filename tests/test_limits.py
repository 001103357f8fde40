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

    def __init__(
        self, app, path: str, body: bytes, content_type: str, spec_version: str = "2.3", method: str = "POST"
    ) -> None:
        self.app, self.path, self.content_type, self.spec_version = app, path, content_type, spec_version
        self.method = method
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
            "method": self.method,
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


# ---------------------------------------------------------------- uploads in flight, apart from places for work


class Held(Exchange):
    """A request whose body arrives in part and then waits (a client dripping it), until `go` is set."""

    def __init__(self, app, path: str, body: bytes, content_type: str, sent_first: int, **options) -> None:
        super().__init__(app, path, body, content_type, **options)
        self.sent_first = sent_first
        self.go = asyncio.Event()

    async def receive(self):
        if self.pulled == self.sent_first:
            await self.go.wait()
        return await super().receive()


def v1_body(text: str = "hi", **fields) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 4, **fields}).encode()


async def until(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def test_slow_bodies_hold_no_place_for_work(tmp_path):
    """More bodies arriving than there are places for work: a request whose body is in is answered at once."""
    app = create_app(settings(tmp_path, max_waiting_requests=1), engine=FakeEngine())  # two places
    form = value_part("text", "slow") + f"--{BOUNDARY}--\r\n".encode()
    slow = [
        Held(app, "/multimodal", form * 200, f"multipart/form-data; boundary={BOUNDARY}", sent_first=1)
        for _ in range(3)
    ] + [Held(app, "/v1/chat/completions", v1_body("x" * 50_000), "application/json", sent_first=1)]

    async def scenario():
        dripping = [asyncio.ensure_future(held.run()) for held in slow]
        await until(lambda: all(held.pulled == 1 for held in slow))
        ready = [
            await Exchange(app, "/multimodal", b"text=ready", "application/x-www-form-urlencoded").run(),
            await Exchange(app, "/v1/chat/completions", v1_body(), "application/json").run(),
        ]
        in_flight = app.state.intake.stats()
        for held in slow:
            held.go.set()
        await asyncio.gather(*dripping)
        return ready, in_flight

    ready, in_flight = asyncio.run(scenario())
    assert [answer.status for answer in ready] == [200, 200]
    assert in_flight["uploads"] == 4 and in_flight["bytes"] == 4 * CHUNK  # the slow ones, counted
    assert app.state.intake.stats() == {"uploads": 0, "bytes": 0, "refused": 0}
    assert app.state.model.worker.stats()["waiting"] == 0


def test_bodies_arriving_are_bounded_by_max_uploads_in_flight(tmp_path):
    app = create_app(settings(tmp_path, max_uploads_in_flight=2), engine=FakeEngine())
    slow = [Held(app, "/v1/chat/completions", v1_body("x" * 20_000), "application/json", sent_first=1) for _ in "ab"]

    async def scenario():
        dripping = [asyncio.ensure_future(held.run()) for held in slow]
        await until(lambda: all(held.pulled == 1 for held in slow))
        refused = await Exchange(app, "/v1/chat/completions", v1_body(), "application/json").run()
        for held in slow:
            held.go.set()
        await asyncio.gather(*dripping)
        after = await Exchange(app, "/v1/chat/completions", v1_body(), "application/json").run()
        return refused, after

    refused, after = asyncio.run(scenario())
    assert refused.status == 503 and "MAX_UPLOADS_IN_FLIGHT" in refused.json()["error"]["message"]
    assert refused.pulled == 0  # refused before a byte of it was read
    assert after.status == 200 and app.state.intake.stats()["uploads"] == 0
    assert "omni_upload_rejections_total 1.0" in app.state.metrics.render().decode()


def test_bytes_arriving_are_bounded_by_max_upload_mb_in_flight(tmp_path):
    app = create_app(settings(tmp_path, max_upload_mb_in_flight=0.05), engine=FakeEngine())  # 52,428 bytes
    big = v1_body("x" * 200_000)
    refused = asyncio.run(Exchange(app, "/v1/chat/completions", big, "application/json").run())
    assert refused.status == 503 and "MAX_UPLOAD_MB_IN_FLIGHT" in refused.json()["error"]["message"]
    assert refused.bytes_read <= 0.05 * 1024 * 1024 + CHUNK  # cut at the byte that crossed it
    assert app.state.intake.stats()["bytes"] == 0
    assert asyncio.run(Exchange(app, "/v1/chat/completions", v1_body(), "application/json").run()).status == 200


def test_a_v1_body_is_parsed_in_the_decoding_pool(tmp_path):
    """With the decoding pool busy, a /v1 request waits for it (its JSON is parsed there, not on the event loop),
    while the server goes on answering."""
    app = create_app(settings(tmp_path, decode_workers=1), engine=FakeEngine())
    busy = threading.Event()

    async def scenario():
        blocker = asyncio.get_running_loop().run_in_executor(app.state.decoders, busy.wait, 10)
        answering = asyncio.ensure_future(Exchange(app, "/v1/chat/completions", v1_body(), "application/json").run())
        await asyncio.sleep(0.5)
        waiting = not answering.done()
        health = await Exchange(app, "/health", b"", "application/json", method="GET").run()
        busy.set()
        await blocker
        return waiting, health, await answering

    waiting, health, answer = asyncio.run(scenario())
    assert waiting and health.status == 200
    assert answer.status == 200 and answer.json()["choices"][0]["message"]["content"]


def test_the_json_apart_from_media_is_bounded_by_max_json_mb(tmp_path):
    picture = make_media.image_bytes("BMP", (320, 240))
    assert len(picture) > 200_000  # its data URL is lifted out of the JSON before it is parsed
    app = create_app(settings(tmp_path, max_json_mb=0.1), engine=FakeEngine())  # 104,857 bytes
    part = {"type": "image_url", "image_url": {"url": data_url(picture, "image/bmp")}}
    with_picture = chat(app, [{"type": "text", "text": "hi"}, part])
    assert with_picture.status == 200, with_picture.body
    long_text = chat(app, [{"type": "text", "text": "x" * 150_000}])
    assert long_text.status == 413 and "MAX_JSON_MB" in long_text.json()["error"]["message"]


def test_a_v1_text_is_held_to_max_text_chars(tmp_path):
    app = create_app(settings(tmp_path, max_text_chars=1000), engine=FakeEngine())
    refused = chat(app, [{"type": "text", "text": "x" * 1001}])
    assert refused.status == 413 and "MAX_TEXT_CHARS" in refused.json()["error"]["message"]
    assert refused.json()["error"]["param"] == "messages[0].content[0].text"
    assert chat(app, [{"type": "text", "text": "x" * 1000}]).status == 200


def test_a_stream_whose_client_leaves_while_queued_is_given_up_at_once(tmp_path):
    """The client leaves after the stream's first event, while its job waits behind another: the job is
    cancelled then, whatever the ASGI server's version, not when its first token would be sent."""
    engine = BlockingEngine()
    app = create_app(settings(tmp_path), engine=engine)

    class LeavesAfterFirstEvent(Exchange):
        async def receive(self):
            if self.pulled < len(self.chunks):
                return await super().receive()
            await until(lambda: bool(self.body))
            return {"type": "http.disconnect"}

        async def send(self, message) -> None:
            if self.body:
                raise OSError("the client is gone")
            await super().send(message)

    async def scenario():
        first = asyncio.ensure_future(
            Exchange(app, "/multimodal", b"text=first", "application/x-www-form-urlencoded").run()
        )
        await until(engine.started.is_set)
        body = b"text=second&stream=true"
        gone = LeavesAfterFirstEvent(app, "/multimodal", body, "application/x-www-form-urlencoded", spec_version="2.4")
        streaming = asyncio.ensure_future(gone.run())
        await until(lambda: app.state.model.worker.stats()["waiting"] == 1)
        await until(lambda: app.state.model.worker.stats()["waiting"] == 0, seconds=3)
        waiting = app.state.model.worker.stats()["waiting"]
        engine.release.set()
        await first
        with contextlib.suppress(Exception):
            await streaming
        return gone, waiting

    gone, waiting = asyncio.run(scenario())
    assert b"chat.completion.chunk" in gone.body  # it was streaming
    assert waiting == 0  # and its job left the queue when its client did
    assert [r.text for r in engine.requests] == ["first"]


def test_a_recovered_picture_starts_over_in_the_place_its_request_was_admitted_to(tmp_path):
    """An engine that passes pictures on as they came starts at once; the check then finds one cut short, so the
    request starts over with the pixels that decoded. With every place taken, the new attempt takes its own
    place back (no 503), and only that attempt is counted."""
    import io

    from qwen_omni_server.api.admission import Place, run_generation_checking
    from qwen_omni_server.core import media
    from qwen_omni_server.core.types import GenerationRequest
    from qwen_omni_server.core.worker import ModelWorker

    app = create_app(settings(tmp_path, decode_workers=1), engine=FakeEngine())
    picture = media.picture_file(io.BytesIO(make_media.damaged_png("cut")), max_pixels=10**8)
    assert picture is not None
    engine = BlockingEngine()

    class Staying:  # the request of a client that stays
        def __init__(self) -> None:
            self.app, self.scope = app, {}

        async def receive(self) -> dict:
            await asyncio.sleep(3600)
            return {}

    async def scenario():
        loop = asyncio.get_running_loop()
        pool_busy = loop.run_in_executor(app.state.decoders, engine.started.wait, 10)  # checks once it runs
        worker = ModelWorker(max_waiting=0)  # one place: this request's
        place = Place(worker, app.state.metrics)
        generation = GenerationRequest("hi", None, images=[picture])
        pictures = [("images[0]", picture)]
        answering = asyncio.ensure_future(
            run_generation_checking(
                Staying(), app.state.settings, worker, engine, generation, pictures, 30, time.perf_counter(), place
            )
        )
        await until(lambda: len(engine.requests) == 1 or answering.done(), 15)  # the first attempt, stopped
        engine.release.set()
        await pool_busy
        result = await asyncio.wait_for(answering, 15)
        worker.shutdown()
        return result

    result = asyncio.run(scenario())
    assert "image file is truncated" in result.warnings[0]
    assert len(engine.requests) == 2
    counted = [line for line in app.state.metrics.render().decode().splitlines() if "generation_seconds_count" in line]
    assert counted == ["omni_generation_seconds_count 1.0"]  # the attempt given up is not counted


def test_lifting_the_media_out_changes_nothing_the_parser_sees(tmp_path):
    """The request parsed with its media lifted out equals the request parsed whole: text that looks like a
    data URL stays text, an escaped payload stays in place, and a placeholder a client writes is not one."""
    from qwen_omni_server.api.json_body import Received, parse_chat
    from qwen_omni_server.api.protocol import ChatCompletionRequest

    payload = base64.b64encode(bytes(range(256)) * 1024).decode()  # 341 KiB of base64
    looks_like_media = '"url": "data:image/png;base64,' + payload[:70_000] + '"'
    body = {
        "messages": [
            {"role": "system", "content": looks_like_media},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": looks_like_media},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + payload}},
                    {"type": "input_audio", "input_audio": {"data": payload}},
                    {"type": "image_url", "image_url": "data:image/png;base64," + payload.replace("/", "\\/")},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,\x00lifted:0"}},
                ],
            },
        ]
    }
    raw = json.dumps(body).encode().replace(b"\\\\/", b"\\/")  # a sender that escapes slashes
    whole = ChatCompletionRequest.model_validate_json(raw)
    parsed = parse_chat(Received(raw, len(raw)), max_json_bytes=1024 * 1024)
    assert len(parsed.media) == 2  # the image URL and the audio data; the escaped one stays
    parts, whole_parts = parsed.request.messages[1].content, whole.messages[1].content
    assert parsed.request.messages[0] == whole.messages[0] and parts[0] == whole_parts[0]  # text is text
    assert bytes(parsed.payload(parts[1].image_url.url)) == payload.encode()
    assert bytes(parsed.payload("data:;base64," + parts[2].input_audio.data)) == payload.encode()
    assert parts[3] == whole_parts[3] and parsed.payload(parts[3].image_url) is None
    assert parts[4] == whole_parts[4] and parsed.payload(parts[4].image_url.url) is None


def test_a_body_of_no_declared_length_is_read_whole(tmp_path):
    """A chunked body (no Content-Length) grows its buffer as it arrives."""
    picture = make_media.image_bytes("BMP", (320, 240))
    part = {"type": "image_url", "image_url": {"url": data_url(picture, "image/bmp")}}
    body = json.dumps({"messages": [{"role": "user", "content": [part]}], "max_tokens": 4}).encode()
    app = create_app(settings(tmp_path), engine=FakeEngine())
    sent = asyncio.run(Exchange(app, "/v1/chat/completions", body, "application/json").run())  # no length
    assert sent.status == 200, sent.body
    assert sent.json()["choices"][0]["message"]["content"]
