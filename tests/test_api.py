"""The HTTP layer with a fake engine: form handling, conversions, limits and error shapes."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import FakeEngine, input_counts, upload


def post(client, data=None, files=None):
    return client.post("/multimodal", data=data or {}, files=files or [])


def test_text_only_answer_has_the_documented_shape(client, fake_engine):
    response = post(client, {"text": "hello", "max_new_tokens": "7"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == "0 images, 0 audios, 0 videos"
    assert body["model"] == "fake"
    assert body["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
        "prompt_tokens_by_modality": {"text": 10, "image": 0, "audio": 0, "video": 0},
    }
    assert input_counts(body) == {"images": 0, "audios": 0, "videos": 0}
    assert set(body["timings_ms"]) == {"preprocess", "generate", "total"}
    request = fake_engine.requests[0]
    assert request.text == "hello" and request.max_new_tokens == 7
    assert request.system_prompt is None  # the engine applies DEFAULT_SYSTEM_PROMPT (or the official one)


def test_system_prompt_is_passed_through(client, fake_engine):
    post(client, {"text": "hi", "system_prompt": "Answer in French."})
    assert fake_engine.requests[0].system_prompt == "Answer in French."


def test_every_kind_of_file_reaches_the_engine(client, fake_engine, media_dir):
    files = [
        ("images", upload(media_dir / "image.png")),
        ("images", upload(media_dir / "image.jpg")),
        ("audios", upload(media_dir / "audio.wav")),
        ("videos", upload(media_dir / "video.mp4")),
    ]
    body = post(client, {"text": "describe"}, files).json()
    assert input_counts(body) == {"images": 2, "audios": 1, "videos": 1}
    video = fake_engine.requests[0].videos[0]
    assert video.audio is not None and len(video.frames) == 4 and video.fps == 2.0


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"extract_video_audio": "true"}, {"images": 0, "audios": 1, "videos": 0}),
        ({"extract_video_frame": "true"}, {"images": 1, "audios": 0, "videos": 0}),
        ({"extract_video_audio": "true", "extract_video_frame": "true"}, {"images": 1, "audios": 1, "videos": 0}),
    ],
)
def test_video_flags_convert_the_video_into_its_parts(client, media_dir, flags, expected):
    body = post(client, flags, [("videos", upload(media_dir / "video.mp4"))]).json()
    assert input_counts(body) == expected and body["warnings"] == []


def test_silent_video_with_audio_asked_says_so(client, media_dir):
    body = post(
        client,
        {"extract_video_audio": "true", "extract_video_frame": "true"},
        [("videos", upload(media_dir / "silent.mp4"))],
    ).json()
    assert input_counts(body) == {"images": 1, "audios": 0, "videos": 0}
    assert "has no audio track" in body["warnings"][0]


def test_silent_video_with_only_audio_asked_is_kept_as_video(client, media_dir):
    body = post(client, {"extract_video_audio": "true"}, [("videos", upload(media_dir / "silent.mp4"))]).json()
    assert input_counts(body) == {"images": 0, "audios": 0, "videos": 1}
    assert any("sent whole as a video" in w for w in body["warnings"])


def test_empty_file_inputs_from_browser_forms_are_ignored(client):
    # What a browser sends for a file input left empty: a part with filename="" and no bytes.
    body = (
        b'--zz\r\nContent-Disposition: form-data; name="text"\r\n\r\nhi\r\n'
        b'--zz\r\nContent-Disposition: form-data; name="images"; filename=""\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n\r\n--zz--\r\n"
    )
    response = client.post("/multimodal", content=body, headers={"content-type": "multipart/form-data; boundary=zz"})
    assert response.status_code == 200 and input_counts(response.json())["images"] == 0


@pytest.mark.parametrize(
    ("data", "files", "status", "detail"),
    [
        ({}, [], 422, "send `text`, or at least one file"),
        ({"text": "   "}, [], 422, "send `text`"),
        ({"text": "hi", "extract_video_audio": "maybe"}, [], 422, "extract_video_audio"),
        ({"text": "hi", "max_new_tokens": "lots"}, [], 422, "max_new_tokens"),
        ({"text": "hi", "max_new_tokens": "0"}, [], 422, "max_new_tokens"),
        ({"text": "hi", "max_new_tokens": "999999"}, [], 422, "MAX_NEW_TOKENS_LIMIT"),
        ({"text": "hi", "image": "x"}, [], 422, "unknown form field(s) ['image']"),
        ({}, [("videos", "notes.txt")], 415, "videos[0] 'notes.txt': is not a recognised"),
        ({}, [("images", "video.mp4")], 415, "images[0] 'video.mp4': is a video, not an image; send it in `videos`"),
        ({}, [("audios", "image.png")], 415, "send it in `images`"),
        ({}, [("videos", "truncated.mp4")], 400, "broken or truncated"),
    ],
)
def test_bad_input_gets_a_clear_4xx(client, media_dir, data, files, status, detail):
    (media_dir / "truncated.mp4").write_bytes((media_dir / "video.mp4").read_bytes()[:3000])
    response = post(client, data, [(field, upload(media_dir / name)) for field, name in files])
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"]


def test_file_count_and_size_limits(make_client, fake_engine, media_dir):
    client = make_client(fake_engine, max_files_per_field=2, max_file_mb=0.01)
    three = [("images", upload(media_dir / "image.png"))] * 3
    response = post(client, {}, three)
    assert response.status_code == 413 and "MAX_FILES_PER_FIELD" in response.json()["detail"]
    response = post(client, {}, [("audios", upload(media_dir / "audio.wav"))])
    assert response.status_code == 413 and "MAX_FILE_MB" in response.json()["detail"]


def test_request_body_limit_is_counted_as_it_arrives(make_client, fake_engine, media_dir):
    client = make_client(fake_engine, max_request_mb=0.05)
    response = post(client, {}, [("audios", upload(media_dir / "audio.wav"))])  # ~260 kB
    assert response.status_code == 413 and "MAX_REQUEST_MB" in response.json()["detail"]

    def lying_body():  # no Content-Length: the server can only count
        yield b"x" * 40_000
        yield b"x" * 40_000

    response = client.post(
        "/multimodal", content=lying_body(), headers={"content-type": "multipart/form-data; boundary=zz"}
    )
    assert response.status_code == 413


def test_health_and_about(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "fake" and health["memory"]["rss_bytes"] > 0
    about = client.get("/").json()
    assert about["model"]["model"] == "fake"
    assert "POST /multimodal" in about["endpoints"] and about["limits"]["max_files_per_field"] == 8


def test_health_is_503_until_the_model_has_loaded(make_client, tmp_path):
    client = make_client(engine=None)  # MODEL_PATH points at a folder that does not exist
    deadline = time.time() + 30
    while (response := client.get("/health")).json()["status"] == "loading" and time.time() < deadline:
        time.sleep(0.05)
    assert response.status_code == 503
    assert response.json()["status"] == "error" and "MODEL_PATH" in response.json()["detail"]
    assert client.post("/multimodal", data={"text": "hi"}).status_code == 503


class HeldEngine(FakeEngine):
    """Generation that runs until released, and counts how many run at once."""

    def __init__(self) -> None:
        super().__init__()
        self.running = 0
        self.peak = 0
        self.lock = threading.Lock()
        self.started = threading.Event()
        self.release = threading.Event()

    def generate(self, request):
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        self.started.set()
        self.release.wait(10)
        with self.lock:
            self.running -= 1
        return super().generate(request)


def test_generations_run_one_at_a_time_while_health_answers(make_client):
    engine = HeldEngine()
    client = make_client(engine)
    threads = [threading.Thread(target=post, args=(client, {"text": f"q{i}"})) for i in range(4)]
    for thread in threads:
        thread.start()
    assert engine.started.wait(10)
    health = client.get("/health")  # answered while a generation runs and three wait
    assert health.status_code == 200 and not engine.release.is_set()
    assert health.json()["generations"]["running"] == 1
    engine.release.set()
    for thread in threads:
        thread.join()
    assert engine.peak == 1 and len(engine.requests) == 4


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 10**30])
def test_a_seed_outside_64_bits_is_a_4xx_on_both_apis(client, fake_engine, seed):
    """torch's generator takes 64-bit seeds; a larger one once reached it and raised (a 500)."""
    form = post(client, {"text": "hi", "seed": str(seed)})
    assert form.status_code == 422 and "seed" in form.text, form.text
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "seed": seed})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "seed", chat.text
    assert not fake_engine.requests
    assert post(client, {"text": "hi", "seed": str(2**63 - 1)}).status_code == 200


def test_a_json_body_on_the_form_route_is_a_415_pointing_to_v1(client, fake_engine):
    response = client.post("/multimodal", json={"text": "hi"})
    assert response.status_code == 415 and "/v1/chat/completions" in response.json()["detail"], response.text
    assert not fake_engine.requests


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (b"not json", None, "not valid JSON"),
        (b'{"messages": [{"role": "user"}]}', "messages[0].content", "needs text or media"),
        (b'{"messages": [{"role": "user", "content": "  "}]}', "messages[0].content", "needs text or media"),
        (
            b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}',
            "messages[0].content[0]",
            "text is missing",
        ),
    ],
)
def test_v1_bodies_that_say_nothing_are_refused_clearly(client, fake_engine, body, param, fragment):
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["param"] == param
    assert not fake_engine.requests


def test_an_engine_the_server_made_is_closed_at_stop_and_made_afresh_at_the_next_start(tmp_path):
    """The app makes its engine when it starts and closes it when it stops; started again, it makes a new one
    (a closed engine is never served)."""
    from fastapi.testclient import TestClient

    from qwen_omni_server.api.app import create_app
    from qwen_omni_server.core.settings import Settings

    class Closing(FakeEngine):
        closed = False

        def close(self) -> None:
            self.closed = True

    made: list[Closing] = []

    def load(settings) -> Closing:
        made.append(Closing())
        return made[-1]

    app = create_app(Settings(_env_file=None, model_path=str(tmp_path)), load_engine=load)
    for start in range(2):
        with TestClient(app) as client:
            deadline = time.time() + 10
            while client.get("/health").status_code != 200 and time.time() < deadline:
                time.sleep(0.01)
            assert client.post("/multimodal", data={"text": "hi"}).status_code == 200
        assert len(made) == start + 1 and made[-1].closed and len(made[-1].requests) == 1


KEY = "s3cret-key-123"
BEARER = {"Authorization": f"Bearer {KEY}"}


def wait_for_health(client, headers: dict[str, str] | None = None):
    """/health once the model (or the upstream engine) is made: no longer `loading`."""
    deadline = time.time() + 30
    while (response := client.get("/health", headers=headers)).json()["status"] == "loading":
        assert time.time() < deadline, "still loading"
        time.sleep(0.05)
    return response


def test_health_without_the_key_tells_the_status_alone(make_client, fake_engine):
    """With API_KEY set, the model, memory and generations are for the key's holders; anyone gets the status."""
    client = make_client(fake_engine, api_key=KEY)
    for headers in ({}, {"Authorization": "Bearer nope-nope-nope"}, {"Authorization": KEY}):
        response = client.get("/health", headers=headers)
        assert response.status_code == 200 and response.json() == {"status": "ok"}, headers
    detailed = client.get("/health", headers=BEARER)
    assert detailed.status_code == 200 and detailed.json()["model"] == "fake" and "generations" in detailed.json()


def test_health_of_a_model_that_failed_to_load_without_the_key(make_client):
    client = make_client(engine=None, api_key=KEY)  # MODEL_PATH points at a folder that does not exist
    anonymous = wait_for_health(client)
    assert anonymous.status_code == 503 and anonymous.json() == {"status": "error"}
    detailed = client.get("/health", headers=BEARER)
    assert detailed.status_code == 503 and "MODEL_PATH" in detailed.json()["detail"]


def test_health_without_the_key_hides_the_upstreams(tmp_path):
    """ENGINE=openai: the upstreams' URLs and last errors only with the key."""
    from fastapi.testclient import TestClient
    from servers import free_port

    from qwen_omni_server.core.settings import Settings
    from qwen_omni_server.server import create_app

    upstream = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = Settings(_env_file=None, engine="openai", engine_urls=[f"{upstream}/v1"], api_key=KEY)
    with TestClient(create_app(settings)) as client:
        anonymous = wait_for_health(client)
        assert anonymous.status_code == 503 and anonymous.json() == {"status": "unavailable"}
        assert upstream not in anonymous.text
        detailed = client.get("/health", headers=BEARER)
    assert detailed.status_code == 503 and upstream in detailed.json()["upstreams"][0]["url"]


class LongAnswer(FakeEngine):
    """Answers with `text`, whatever it was asked."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def generate(self, request):
        result = super().generate(request)
        result.text = self.text
        return result


def test_a_long_wav_answer_caps_x_text_and_says_so(make_client):
    """2,048 tokens of Chinese are ~25 KB percent-encoded, past proxies' and Node's header limits."""
    import urllib.parse

    text = "这是一个很长的回答，包含 ASCII 42 和表情 🙂。" * 300
    client = make_client(LongAnswer(text), cors_origins=["https://example.org"])
    form = {"text": "hi", "return_audio": "true", "response_format": "wav"}
    response = post(client, form)
    assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
    header = response.headers["x-text"]
    assert 4096 - 12 <= len(header) <= 4096  # cut after a whole character: less than one (🙂 is 12) short
    shown = urllib.parse.unquote(header, errors="strict")
    assert text.startswith(shown) and len(shown) > 400
    assert response.headers["x-text-truncated"] == "true" and "response_format=json" in response.headers["x-text-note"]
    browser = client.post("/multimodal", data=form, headers={"Origin": "https://example.org"})
    assert "X-Text-Truncated" in browser.headers["access-control-expose-headers"]


def test_a_short_wav_answer_has_its_whole_text(client):
    import urllib.parse

    response = post(client, {"text": "hi", "return_audio": "true", "response_format": "wav"})
    assert urllib.parse.unquote(response.headers["x-text"]) == "0 images, 0 audios, 0 videos"
    assert "x-text-truncated" not in response.headers and "x-text-note" not in response.headers


def test_a_request_id_with_a_trailing_newline_is_not_kept():
    """`$` also matches before a final newline: `abc\\n` once passed as a client's id (into logs and headers)."""
    import asyncio

    from qwen_omni_server.api.middleware import RequestId, request_id

    seen: list[str] = []
    sent: list[dict] = []

    async def app(scope, receive, send) -> None:
        seen.append(request_id.get())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    async def send(message) -> None:
        sent.append(message)

    for offered in (b"abc\n", b"abc"):
        scope = {"type": "http", "method": "GET", "path": "/health", "headers": [(b"x-request-id", offered)]}
        asyncio.run(RequestId(app)(scope, receive, send))
    assert seen[0] != "abc\n" and len(seen[0]) == 16 and seen[1] == "abc"
    assert dict(sent[0]["headers"])[b"x-request-id"] == seen[0].encode()
