"""ENGINE=openai: this server in front of OpenAI-compatible upstreams. The upstreams are real: instances of this
very server on the tiny model, started as their own processes on loopback ports; nothing is mocked."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import subprocess
import threading
import time

import httpx
import make_media
import openai
import pytest
from conftest import CORPUS, FakeEngine, serve
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.testclient import TestClient
from PIL import Image
from servers import free_port, start_server, wait_until

from qwen_omni_server.core import media
from qwen_omni_server.core.settings import Settings
from qwen_omni_server.core.types import GenerationRequest, GenerationResult
from qwen_omni_server.server import create_app


def upstream_env(model_dir) -> dict[str, str]:
    return {"MODEL_PATH": str(model_dir), "DEVICE_MAP": "cpu", "DEFAULT_MAX_NEW_TOKENS": "8", "LOG_LEVEL": "warning"}


def start_upstream(model_dir, cwd):
    return start_server(cwd, upstream_env(model_dir), timeout=120)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def upstreams(tiny_model_dir, tmp_path_factory):
    """Two upstream servers on the tiny model: their base URLs."""
    processes = []
    try:
        for _ in range(2):
            processes.append(start_upstream(tiny_model_dir, tmp_path_factory.mktemp("upstream")))
        yield [url for _, url in processes]
    finally:
        for process, _ in processes:
            stop(process)


def front_settings(urls: list[str], **overrides) -> Settings:
    return Settings(
        _env_file=None,
        engine="openai",
        engine_urls=[f"{url}/v1" for url in urls],
        default_max_new_tokens=8,
        **overrides,
    )


def start_front(settings: Settings):
    """The front as a real uvicorn server (in this process); yields its URL once an upstream is up."""
    server = serve(create_app(settings))
    url = next(server)
    wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200)
    return server, url


@pytest.fixture(scope="module")
def front(upstreams):
    """The front over the first upstream only."""
    server, url = start_front(front_settings(upstreams[:1]))
    yield url
    server.close()


def media_files() -> list[tuple[str, tuple[str, bytes, str]]]:
    return [
        ("images", ("a.png", make_media.image_bytes("PNG"), "image/png")),
        ("images", ("b.jpg", make_media.image_bytes("JPEG", (320, 240)), "image/jpeg")),
        ("audios", ("c.mp3", make_media.audio_bytes("mp3", 1.0), "audio/mpeg")),
        ("videos", ("d.mp4", make_media.video_bytes(2.0, audio=True), "video/mp4")),
    ]


def same_answer(direct: dict, via_front: dict) -> None:
    assert via_front["text"] == direct["text"]
    assert via_front["usage"] == direct["usage"]  # prompt tokens by modality: the same media reached the model
    for kind in ("images", "audios", "videos"):  # the front tells what it sent; token counts are the upstream's
        assert len(via_front["inputs"][kind]) == len(direct["inputs"][kind])


@pytest.mark.parametrize(
    "form",
    [
        {"text": "Describe everything."},
        {"text": "Describe.", "system_prompt": "Be brief.", "max_new_tokens": "12", "max_pixels": "40000"},
        {"text": "What is in the clip?", "extract_video_frame": "true", "extract_video_audio": "true"},
    ],
)
def test_multimodal_gives_the_upstreams_own_answer(upstreams, front, form):
    direct = httpx.post(f"{upstreams[0]}/multimodal", data=form, files=media_files(), timeout=120)
    via_front = httpx.post(f"{front}/multimodal", data=form, files=media_files(), timeout=120)
    assert direct.status_code == via_front.status_code == 200, via_front.text
    same_answer(direct.json(), via_front.json())
    assert via_front.json()["usage"]["prompt_tokens_by_modality"]["image"] > 0
    assert via_front.json()["model"] == direct.json()["model"]  # the upstream's name, from its /v1/models


@pytest.mark.parametrize(
    "name",
    [
        "heic_iphone_style__fixture-mif1.heic",  # a format upstreams may not read
        "jpeg_exif_orient6__hopper_orientation_6.jpg",  # must be turned upright first
        "png_16bit_rgba__basn6a16.png",  # transparency and 16 bits
        "jpeg_cmyk_adobe__pil_sample_cmyk.jpg",
    ],
)
def test_pictures_that_need_converting_reach_the_upstream_as_decoded_here(upstreams, front, name):
    path = CORPUS / "image" / name
    if not path.exists():
        pytest.skip("the media corpus is not beside the repository")
    assert (
        media.picture_file(io.BytesIO(path.read_bytes()), max_pixels=10**8) is None
    )  # so it goes as the pixels decoded here, not as it came
    files = [("images", (name, path.read_bytes(), "application/octet-stream"))]
    direct = httpx.post(f"{upstreams[0]}/multimodal", data={"text": "Hi"}, files=files, timeout=120)
    via_front = httpx.post(f"{front}/multimodal", data={"text": "Hi"}, files=files, timeout=120)
    assert direct.status_code == via_front.status_code == 200, via_front.text
    same_answer(direct.json(), via_front.json())


def image_message(data: bytes, mime: str) -> list[dict]:
    url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    return [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Hi"}]}
    ]


@pytest.mark.parametrize("route", ["multimodal", "multimodal-stream", "v1", "v1-stream"])
def test_a_picture_sent_as_it_came_that_does_not_decode_gets_the_same_error_as_here(upstreams, front, route):
    """It went upstream from its header alone; the front's own full decoding, meanwhile, refuses it as a
    server with the model inside does (an upstream's refusal would name the file differently)."""
    broken = make_media.damaged_png("broken")
    assert media.picture_file(io.BytesIO(broken), max_pixels=10**8) is not None  # taken as it came
    if route.startswith("multimodal"):
        form = {"text": "Hi", "stream": str(route.endswith("stream")).lower()}
        files = [("images", ("broken.png", broken, "image/png"))]
        answers = [
            httpx.post(f"{url}/multimodal", data=form, files=files, timeout=120) for url in (upstreams[0], front)
        ]
        assert answers[0].status_code == answers[1].status_code == 400
        assert answers[1].json()["detail"] == answers[0].json()["detail"]
        assert answers[1].json()["detail"].startswith("images[0] 'broken.png': image data is broken")
    else:
        body = {"messages": image_message(broken, "image/png"), "max_tokens": 4, "stream": route.endswith("stream")}
        answers = [httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120) for url in (upstreams[0], front)]
        assert answers[0].status_code == answers[1].status_code == 400
        assert answers[1].json()["error"]["message"] == answers[0].json()["error"]["message"]
        assert answers[1].json()["error"]["message"].startswith("messages[0].content[0]: image data is broken")


@pytest.mark.parametrize("route", ["multimodal", "v1"])
def test_a_picture_cut_inside_goes_again_as_the_pixels_that_decoded(upstreams, front, route):
    """A PNG that ends as a whole one does but whose data stops short goes upstream as it came; the front's
    decoding recovers its first rows, as the server with the model does, and the answer is that server's."""
    cut = make_media.damaged_png("cut")
    assert media.picture_file(io.BytesIO(cut), max_pixels=10**8) is not None
    if route == "multimodal":
        files = [("images", ("cut.png", cut, "image/png"))]
        form = {"text": "Hi", "max_new_tokens": "6"}
        direct, via_front = (
            httpx.post(f"{u}/multimodal", data=form, files=files, timeout=120) for u in (upstreams[0], front)
        )
        assert direct.status_code == via_front.status_code == 200, via_front.text
        same_answer(direct.json(), via_front.json())
        assert via_front.json()["warnings"] == direct.json()["warnings"]
        assert "images[0] 'cut.png': image file is truncated" in via_front.json()["warnings"][0]
    else:
        body = {"messages": image_message(cut, "image/png"), "max_tokens": 6, "temperature": 0}
        direct, via_front = (
            httpx.post(f"{u}/v1/chat/completions", json=body, timeout=120) for u in (upstreams[0], front)
        )
        assert direct.status_code == via_front.status_code == 200, via_front.text
        assert via_front.json()["choices"] == direct.json()["choices"]
        assert via_front.json()["usage"]["prompt_tokens"] == direct.json()["usage"]["prompt_tokens"]
        assert via_front.json()["warnings"][0] == direct.json()["warnings"][0]
        assert via_front.json()["warnings"][0].startswith("messages[0].content[0]: image file is truncated")


def stand_in() -> FastAPI:
    """A stand-in upstream's app, listing its one model; each test adds the chat completions it needs."""
    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "stand-in", "object": "model"}]}

    return app


def recording_upstream(bodies: list[dict]):
    """A stand-in upstream: it keeps each Chat Completions body it is sent and answers "ok"."""
    app = stand_in()

    @app.post("/v1/chat/completions")
    async def complete(request: Request) -> dict:
        bodies.append(await request.json())
        message = {"role": "assistant", "content": "ok"}
        return {
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        }

    return app


@pytest.fixture(scope="module")
def recorded():
    """A front over a recording stand-in upstream: its URL, and the bodies the upstream was sent."""
    bodies: list[dict] = []
    upstream = serve(recording_upstream(bodies))
    server, url = start_front(front_settings([next(upstream)]))
    yield url, bodies
    server.close()
    upstream.close()


def sent_pictures(body: dict) -> list[tuple[str, Image.Image]]:
    """Each picture of a Chat Completions body: its data URL's header, and the picture."""
    pictures = []
    for message in body["messages"]:
        for part in message["content"] if isinstance(message["content"], list) else []:
            if part["type"] == "image_url":
                header, data = part["image_url"]["url"].split(",", 1)
                pictures.append((header, Image.open(io.BytesIO(base64.b64decode(data)))))
    return pictures


def big_tiff() -> bytes:
    """A 4000 x 3000 picture in a format that is converted here (not sent as it came)."""
    tiff = make_media.image_bytes("TIFF", (4000, 3000), compression="tiff_deflate")
    assert media.picture_file(io.BytesIO(tiff), max_pixels=10**8) is None
    return tiff


@pytest.mark.parametrize("max_pixels", [None, 40000])
def test_a_big_decoded_picture_goes_upstream_as_a_png_within_the_pixel_budget(recorded, max_pixels):
    """It went as a BMP of every pixel decoded (36 MB here, 150 MB at 50 MP); the model reads at most the budget
    (IMAGE_MAX_PIXELS, or the request's max_pixels), so it goes resized as the model's processor resizes it."""
    from qwen_omni_utils.v2_5.vision_process import smart_resize

    url, bodies = recorded
    form = {"text": "Hi", **({"max_pixels": str(max_pixels)} if max_pixels else {})}
    files = [("images", ("big.tif", big_tiff(), "image/tiff"))]
    answer = httpx.post(f"{url}/multimodal", data=form, files=files, timeout=120)
    assert answer.status_code == 200, answer.text
    [(header, picture)] = sent_pictures(bodies[-1])
    budget = max_pixels or Settings(_env_file=None).image_max_pixels
    assert header == "data:image/png;base64" and picture.format == "PNG"
    assert picture.width * picture.height <= budget
    assert picture.size[::-1] == smart_resize(3000, 4000, 28, min_pixels=28 * 28, max_pixels=budget)
    small = make_media.image_bytes("TIFF", (96, 64))
    answer = httpx.post(f"{url}/multimodal", data={"text": "Hi"}, files=[("images", ("s.tif", small, "image/tiff"))])
    [(header, picture)] = sent_pictures(bodies[-1])
    assert answer.status_code == 200 and header == "data:image/png;base64" and picture.size == (96, 64)


def sent_parts(body: dict) -> list[str]:
    """The content parts' types of a Chat Completions body, in order."""
    return [
        part["type"]
        for message in body["messages"]
        if isinstance(message["content"], list)
        for part in message["content"]
    ]


@pytest.mark.parametrize(
    ("videos", "processor"),
    [
        ([False], None),  # it was {"use_audio_in_video": false}, which vLLM refuses unless trusting such options
        ([True], {"use_audio_in_video": True}),
        ([True, False], None),  # the track goes as audio after its video; vLLM reads no video's sound unless told
    ],
)
def test_processor_options_go_to_vllm_only_when_they_change_something(recorded, videos, processor):
    """The stand-in lists no owner in its /v1/models, as vLLM's would say "vllm": vLLM's conventions."""
    url, bodies = recorded
    files = [("videos", (f"{i}.mp4", make_media.video_bytes(2.0, audio=a), "video/mp4")) for i, a in enumerate(videos)]
    answer = httpx.post(f"{url}/multimodal", data={"text": "Hi"}, files=files, timeout=120)
    assert answer.status_code == 200, answer.text
    assert bodies[-1].get("mm_processor_kwargs") == processor


def test_a_video_with_sound_and_another_audio_go_to_vllm_as_it_takes_them(recorded):
    """vLLM 0.32 refuses use_audio_in_video beside other audio: the track goes as audio, with a warning."""
    url, bodies = recorded
    files = [
        ("videos", ("v.mp4", make_media.video_bytes(2.0, audio=True), "video/mp4")),
        ("audios", ("a.wav", make_media.audio_bytes("wav", 1.0), "audio/wav")),
    ]
    answer = httpx.post(f"{url}/multimodal", data={"text": "Hi"}, files=files, timeout=120)
    assert answer.status_code == 200, answer.text
    assert "mm_processor_kwargs" not in bodies[-1]
    assert sent_parts(bodies[-1]).count("input_audio") == 2 and "video_url" in sent_parts(bodies[-1])
    assert any("each video's sound went to the upstream as audio" in w for w in answer.json()["warnings"])


def test_engine_urls_may_name_the_server_without_v1():
    """It stayed "down" for good (its /models is /v1/models): a bare address means the API under /v1."""
    settings = Settings(_env_file=None, engine="openai", engine_urls=["http://gpu-1:8000", "http://gpu-2:8000/"])
    assert settings.engine_urls == ["http://gpu-1:8000/v1", "http://gpu-2:8000/v1"]
    kept = ["http://gpu-1:8000/v1", "https://proxy.example/vllm/v1"]
    assert Settings(_env_file=None, engine="openai", engine_urls=kept).engine_urls == kept


def going_down_upstream(state: dict[str, bool]):
    """A stand-in upstream that, once sent a request, stops answering /v1/models and sends nothing more, the
    connection left open: as vLLM did after a SIGTERM."""
    app = FastAPI()

    @app.get("/v1/models")
    def models() -> JSONResponse:
        if state["down"]:
            return JSONResponse({"detail": "shutting down"}, status_code=503)
        return JSONResponse({"object": "list", "data": [{"id": "stand-in", "object": "model"}]})

    @app.post("/v1/chat/completions")
    async def complete(request: Request) -> None:
        await request.body()
        state["down"] = True
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)

    return app


def test_a_request_in_flight_on_an_upstream_that_goes_down_is_given_up():
    """A spoken answer comes whole from the upstream (no idle timeout applies while it generates): its
    upstream found down by the probe, the request goes to another one (here none is left: a clear 502),
    instead of waiting for REQUEST_TIMEOUT_SECONDS."""
    state = {"down": False}
    upstream = serve(going_down_upstream(state))
    server, url = start_front(front_settings([next(upstream)], request_timeout_seconds=30))
    try:
        started = time.monotonic()
        body = {"messages": [{"role": "user", "content": "Hi"}], "modalities": ["text", "audio"]}
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code == 502 and "went down" in answer.json()["error"]["message"], answer.text
        assert time.monotonic() - started < 10  # the probe's second, twice: not the request timeout
    finally:
        server.close()
        upstream.close()


def aborting_upstream():
    """A stand-in upstream that streams a few words, then ends with finish_reason "abort": as vLLM does with the
    requests in flight when it is stopped with SIGTERM."""
    app = stand_in()

    @app.post("/v1/chat/completions")
    async def complete(request: Request) -> Response:
        if not (await request.json()).get("stream"):
            message = {"role": "assistant", "content": "Once upon"}
            return JSONResponse({"choices": [{"index": 0, "message": message, "finish_reason": "abort"}]})

        def chunk(delta: dict, finish: str | None) -> str:
            return "data: " + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

        events = [chunk({"role": "assistant", "content": "Once upon"}, None), chunk({}, "abort"), "data: [DONE]\n\n"]
        return StreamingResponse(iter(events), media_type="text/event-stream")

    return app


def test_an_answer_the_upstream_aborted_is_not_passed_off_as_whole():
    """It was answered 200 with the words before the abort, as if the answer had ended there."""
    upstream = serve(aborting_upstream())
    server, url = start_front(front_settings([next(upstream)]))
    try:
        answer = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert answer.status_code == 502 and "finish_reason 'abort'" in answer.json()["error"]["message"], answer.text
    finally:
        server.close()
        upstream.close()


def pausing_upstream(closed: list[float]):
    """A stand-in upstream that streams a word, then sends nothing until its client goes; when it went, in
    `closed`."""
    app = stand_in()

    @app.post("/v1/chat/completions")
    async def complete(request: Request) -> Response:
        await request.body()

        async def words():
            delta = {"role": "assistant", "content": "Once"}
            yield "data: " + json.dumps({"choices": [{"index": 0, "delta": delta}]}) + "\n\n"
            try:
                while not await request.is_disconnected():
                    await asyncio.sleep(0.01)
            finally:
                closed.append(time.monotonic())

        return StreamingResponse(words(), media_type="text/event-stream")

    return app


def test_a_client_leaving_a_stream_closes_the_upstreams_and_leaves_no_task_pending(caplog):
    """The client leaves while the upstream sends nothing: the front closes the upstream's stream at once, and
    its wait for the next word goes too (it was left pending, and asyncio logged "Task was destroyed but it is
    pending!" when it was collected)."""
    closed: list[float] = []
    upstream = serve(pausing_upstream(closed))
    server, url = start_front(front_settings([next(upstream)]))
    try:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1000, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as answer:
            next(line for line in answer.iter_lines() if "Once" in line)
            time.sleep(0.2)  # the front waits for the next word
        left = time.monotonic()
        wait_until(lambda: bool(closed), 10)
        assert closed[0] - left < 2
        wait_until(lambda: httpx.get(f"{url}/health").json()["upstreams"][0]["in_flight"] == 0)
        time.sleep(0.3)  # the job's thread lets go of the request
        gc.collect()
        pending = [r.getMessage() for r in caplog.records if "destroyed but it is pending" in r.getMessage()]
        assert not pending, pending
    finally:
        server.close()
        upstream.close()


def test_a_big_decoded_picture_gets_the_upstreams_own_answer(upstreams, front):
    """Resized here as the model's processor resizes it (size and filter), it reaches the model as the same
    pixels: the same answer and prompt tokens as the upstream gives the file itself."""
    files = [("images", ("big.tif", big_tiff(), "image/tiff"))]
    direct = httpx.post(f"{upstreams[0]}/multimodal", data={"text": "Hi"}, files=files, timeout=120)
    via_front = httpx.post(f"{front}/multimodal", data={"text": "Hi"}, files=files, timeout=120)
    assert direct.status_code == via_front.status_code == 200, via_front.text
    same_answer(direct.json(), via_front.json())


class UntilStopped(FakeEngine):
    """An engine whose generation runs until its request is stopped, and records what it was given."""

    passes_files = True  # as the upstream engine it stands in for: pictures go on as they came

    def __init__(self) -> None:
        super().__init__()
        self.stopped: list[bool] = []

    def generate(self, request: GenerationRequest) -> GenerationResult:
        self.requests.append(request)
        self.stopped.append(request.stop.wait(60))
        return GenerationResult("", 0, 0, {})


def test_the_upstream_works_while_the_front_checks_the_picture():
    """The generation starts with the picture as it came, before the front has finished decoding it; the
    failed check then stops it, and the client gets the check's 400."""
    engine = UntilStopped()
    broken = make_media.damaged_png("broken", size=(1600, 1200))
    with TestClient(create_app(front_settings(["http://127.0.0.1:9"]), engine=engine)) as client:
        answer = client.post("/multimodal", data={"text": "Hi"}, files=[("images", ("b.png", broken, "image/png"))])
    assert answer.status_code == 400 and "image data is broken" in answer.json()["detail"]
    assert len(engine.requests) == 1 and isinstance(engine.requests[0].images[0], media.PictureFile)
    assert engine.stopped == [True]  # stopped by the check, not by a time limit


@pytest.mark.parametrize("silent_too", [False, True])
def test_videos_with_sound_are_sent_as_the_local_model_reads_them(upstreams, front, silent_too):
    """All sounding: interleaved (use_audio_in_video). Mixed with a silent one: each track after its video."""
    files = [("videos", ("d.mp4", make_media.video_bytes(2.0, audio=True), "video/mp4"))]
    if silent_too:
        files.append(("videos", ("s.mp4", make_media.video_bytes(2.0, audio=False), "video/mp4")))
    direct = httpx.post(f"{upstreams[0]}/multimodal", data={"text": "Hi"}, files=files, timeout=120).json()
    via_front = httpx.post(f"{front}/multimodal", data={"text": "Hi"}, files=files, timeout=120).json()
    same_answer(direct, via_front)
    assert via_front["usage"]["prompt_tokens_by_modality"]["audio"] > 0  # the video's own track was heard


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def conversation() -> list[dict]:
    wav = base64.b64encode(make_media.audio_bytes("wav", 1.0)).decode()
    return [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! What can I do?"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare these."},
                {"type": "image_url", "image_url": {"url": data_url("image/png", make_media.image_bytes("PNG"))}},
                {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}},
                {"type": "video_url", "video_url": {"url": data_url("video/mp4", make_media.video_bytes(2.0))}},
            ],
        },
    ]


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def test_v1_gives_the_upstreams_own_answer(upstreams, front):
    options = {"model": "any", "messages": conversation(), "max_tokens": 10, "temperature": 0, "stop": ["zz"]}
    direct = client(upstreams[0]).chat.completions.create(**options)
    via_front = client(front).chat.completions.create(**options)
    assert via_front.choices[0].message.content == direct.choices[0].message.content
    assert via_front.choices[0].finish_reason == direct.choices[0].finish_reason
    assert via_front.usage.prompt_tokens == direct.usage.prompt_tokens
    assert via_front.usage.completion_tokens == direct.usage.completion_tokens
    assert via_front.model == direct.model == client(front).models.list().data[0].id


def test_v1_streams_token_by_token_as_the_upstream_does(upstreams, front):
    options = {
        "model": "any",
        "messages": conversation(),
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    direct = list(client(upstreams[0]).chat.completions.create(**options))
    via_front = list(client(front).chat.completions.create(**options))

    def text(chunks) -> list[str]:
        return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]

    assert "".join(text(via_front)) == "".join(text(direct))
    assert len(text(via_front)) > 1  # passed on as it came, not in one piece at the end
    assert via_front[-1].usage.completion_tokens == direct[-1].usage.completion_tokens
    assert via_front[-1].usage.prompt_tokens == direct[-1].usage.prompt_tokens


def test_multimodal_streams_through_the_front(front):
    with httpx.stream(
        "POST",
        f"{front}/multimodal",
        data={"text": "Tell me a story.", "max_new_tokens": "12", "stream": "true"},
        files=media_files()[:1],
        timeout=120,
    ) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
    assert response.status_code == 200 and len([d for d in deltas if d]) > 1
    assert events[-1]["usage"]["completion_tokens"] > 0


def test_upstream_refusals_keep_their_message(front):
    answer = httpx.post(
        f"{front}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "modalities": ["text", "audio"]},
        timeout=60,
    )
    assert answer.status_code == 400
    assert "speech output is not enabled" in answer.json()["error"]["message"]


def test_health_reports_each_upstream(upstreams, front):
    health = httpx.get(f"{front}/health").json()
    assert health["status"] == "ok"
    assert [u["url"] for u in health["upstreams"]] == [f"{upstreams[0]}/v1"]
    assert health["upstreams"][0]["state"] == "up" and health["upstreams"][0]["served"] > 0


def test_no_reachable_upstream_is_a_clear_503():
    server = serve(create_app(front_settings([f"http://127.0.0.1:{free_port()}"])))
    url = next(server)
    try:
        wait_until(lambda: httpx.get(f"{url}/health").json()["upstreams"][0]["state"] == "down")
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        answer = httpx.post(f"{url}/multimodal", data={"text": "Hi"})
        assert answer.status_code == 503 and "no upstream engine is reachable" in answer.json()["detail"]
        answer = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert answer.status_code == 503 and answer.json()["error"]["type"] == "server_error"
    finally:
        server.close()


def test_engine_openai_needs_upstream_urls():
    with pytest.raises(ValueError, match="ENGINE_URLS"):
        Settings(_env_file=None, engine="openai")


def ask_one(url: str, index: int, max_new_tokens: int, stream: bool) -> dict:
    """One /multimodal request; for a stream, whether text had arrived before an error, if one came."""
    form = {"text": f"Request {index}", "max_new_tokens": str(max_new_tokens), "stream": str(stream).lower()}
    try:
        if not stream:
            answer = httpx.post(f"{url}/multimodal", data=form, timeout=300)
            return {"ok": answer.status_code == 200, "detail": answer.text[:300]}
        text, error = "", None
        with httpx.stream("POST", f"{url}/multimodal", data=form, timeout=300) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    error = event.get("error") or error
                    text += "".join(c["delta"].get("content") or "" for c in event.get("choices", []))
        return {
            "ok": response.status_code == 200 and error is None,
            "streamed_before_error": bool(text),
            "detail": error,
        }
    except httpx.HTTPError as error:
        return {"ok": False, "detail": repr(error)}


def ask_many(url: str, count: int, max_new_tokens: int, streams: bool = False) -> list[dict]:
    """`count` requests at once; with `streams`, every other one streams."""
    answers: list[dict] = [{}] * count

    def one(index: int) -> None:
        answers[index] = ask_one(url, index, max_new_tokens, streams and index % 2 == 1)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def test_two_upstreams_share_the_load(upstreams):
    server, url = start_front(front_settings(upstreams))
    try:
        answers = ask_many(url, 6, 8)
        assert all(a["ok"] for a in answers), answers
        served = [u["served"] for u in httpx.get(f"{url}/health").json()["upstreams"]]
        assert sum(served) == 6 and min(served) >= 2, served
    finally:
        server.close()


def test_killing_an_upstream_mid_run_loses_no_request(upstreams, tiny_model_dir, tmp_path):
    doomed, doomed_url = start_upstream(tiny_model_dir, tmp_path)
    server, url = start_front(front_settings([upstreams[0], doomed_url]))
    try:
        wait_until(lambda: all(u["state"] == "up" for u in httpx.get(f"{url}/health").json()["upstreams"]))
        results: list[dict] = []
        # Long enough answers that the doomed upstream is still on its first when it is killed, however fast.
        runner = threading.Thread(target=lambda: results.extend(ask_many(url, 8, 1024, streams=True)))
        runner.start()
        wait_until(lambda: httpx.get(f"{url}/health").json()["upstreams"][1]["in_flight"] >= 3)
        doomed.kill()  # mid-run: one request generating on it, others waiting in its queue
        runner.join()
        lost = [a for a in results if not a["ok"] and not a.get("streamed_before_error")]
        assert not lost, results  # only a stream that had already sent text may end in an error
        assert sum(a["ok"] for a in results) >= 6, results
        report = httpx.get(f"{url}/health").json()["upstreams"]
        assert report[1]["state"] == "down" and report[1]["failed"] >= 2  # requests it held were retried
        assert report[0]["served"] == sum(a["ok"] for a in results)  # every answer came from the survivor
    finally:
        server.close()
        stop(doomed)


def test_a_down_upstream_is_skipped_until_its_models_answer_again(tiny_model_dir, tmp_path):
    port = free_port()
    server = serve(create_app(front_settings([f"http://127.0.0.1:{port}"])))
    url = next(server)
    upstream = None
    try:
        wait_until(lambda: httpx.get(f"{url}/health").json()["upstreams"][0]["state"] == "down")
        assert httpx.post(f"{url}/multimodal", data={"text": "Hi"}).status_code == 503
        upstream, _ = start_server(tmp_path, upstream_env(tiny_model_dir), timeout=120, port=port)
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 200)
        answer = httpx.post(f"{url}/multimodal", data={"text": "Hi"}, timeout=60)
        assert answer.status_code == 200 and answer.json()["model"] == str(tiny_model_dir)
    finally:
        server.close()
        if upstream is not None:
            stop(upstream)


def test_admission_limits_apply_per_upstream(upstreams):
    """MAX_WAITING_REQUESTS=0: each upstream takes one request at a time, so one upstream admits one, two admit two."""
    for count in (1, 2):
        server, url = start_front(front_settings(upstreams[:count], max_waiting_requests=0))
        try:
            with httpx.Client(timeout=120) as http:
                held = []
                for _ in range(count):  # streams that stay open: each holds its upstream
                    form = {"text": "Tell a long story.", "stream": "true", "max_new_tokens": "1500"}
                    stream = http.stream("POST", f"{url}/multimodal", data=form)
                    response = stream.__enter__()
                    assert response.status_code == 200
                    lines = response.iter_lines()  # kept: dropping the iterator would close the connection
                    next(lines)  # the stream began: the request is in flight
                    held.append((stream, lines))
                assert httpx.get(f"{url}/health").json()["generations"]["running"] == count
                refused = httpx.post(f"{url}/multimodal", data={"text": "One more"}, timeout=60)
                assert refused.status_code == 503 and "Retry-After" in refused.headers, refused.text
                for stream, _ in held:
                    stream.__exit__(None, None, None)
        finally:
            server.close()


def test_speech_comes_from_an_upstream_that_speaks(tiny_model_dir, tmp_path):
    env = {**upstream_env(tiny_model_dir), "ENABLE_AUDIO_OUTPUT": "true", "MAX_SPEECH_SECONDS": "2"}
    upstream, upstream_url = start_server(tmp_path, env, timeout=120)
    server, url = start_front(front_settings([upstream_url]))
    try:
        options = {
            "model": "any",
            "messages": [{"role": "user", "content": "Say something."}],  # as test_openai's speech test asks
            "modalities": ["text", "audio"],
            "audio": {"voice": "Ethan", "format": "wav"},
            "max_tokens": 8,
            "temperature": 0,
            "seed": 2,  # the random tiny talker may end before a sound; this one speaks
        }
        answer = client(url).chat.completions.create(**options)
        direct = client(upstream_url).chat.completions.create(**options)
        assert answer.choices[0].message.content == direct.choices[0].message.content
        assert answer.choices[0].message.audio.data  # the upstream's speech, passed on
        spoken = httpx.post(
            f"{url}/multimodal",
            data={"text": "hi", "max_new_tokens": "5", "return_audio": "true", "response_format": "wav", "seed": "1"},
            timeout=120,
        )
        assert spoken.status_code == 200 and spoken.headers["content-type"] == "audio/wav"
        unknown = httpx.post(
            f"{url}/multimodal", data={"text": "Hi", "return_audio": "true", "speaker": "Nobody"}, timeout=60
        )
        assert unknown.status_code == 422 and "unknown speaker 'Nobody'" in unknown.json()["detail"]
    finally:
        server.close()
        stop(upstream)


def test_v1_takes_the_processor_options_the_front_sends(upstreams):
    """This server's own /v1 honours `mm_processor_kwargs` (vLLM's field), so it can be an upstream."""
    video = {"type": "video_url", "video_url": {"url": data_url("video/mp4", make_media.video_bytes(2.0, audio=True))}}
    image = {
        "type": "image_url",
        "image_url": {"url": data_url("image/jpeg", make_media.image_bytes("JPEG", (640, 480)))},
    }

    def usage(content: list, **options) -> dict:
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1, **options}
        answer = httpx.post(f"{upstreams[0]}/v1/chat/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.json()["usage"]["prompt_tokens_details"]["by_modality"]

    assert usage([video])["audio"] > 0
    assert usage([video], mm_processor_kwargs={"use_audio_in_video": True})["audio"] > 0
    assert usage([video], mm_processor_kwargs={"use_audio_in_video": False})["audio"] == 0
    assert usage([image], mm_processor_kwargs={"max_pixels": 28 * 28 * 16})["image"] < usage([image])["image"]
    for options, problem in (({"max_pixels": 10**9}, "MAX_PIXELS_CEILING"), ({"fps": 3}, "fps")):
        body = {"messages": [{"role": "user", "content": "Hi"}], "mm_processor_kwargs": options}
        answer = httpx.post(f"{upstreams[0]}/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code == 400 and problem in answer.json()["error"]["message"], answer.text


def test_an_upstream_answering_5xx_is_retried_once_on_another(upstreams, tiny_model_dir, tmp_path):
    """A busy upstream (MAX_WAITING_REQUESTS=0, one request already running) answers 503 at once."""
    busy, busy_url = start_server(tmp_path, {**upstream_env(tiny_model_dir), "MAX_WAITING_REQUESTS": "0"}, timeout=120)
    server, url = start_front(front_settings([busy_url, upstreams[1]]))
    try:
        wait_until(lambda: all(u["state"] == "up" for u in httpx.get(f"{url}/health").json()["upstreams"]))
        form = {"text": "Tell a long story.", "stream": "true", "max_new_tokens": "1500"}
        with httpx.stream("POST", f"{busy_url}/multimodal", data=form, timeout=120) as holding:
            lines = holding.iter_lines()
            next(lines)  # the busy upstream is generating for someone else
            answer = httpx.post(f"{url}/multimodal", data={"text": "Hi"}, timeout=120)
        assert answer.status_code == 200, answer.text
        busy_report, other = httpx.get(f"{url}/health").json()["upstreams"]
        assert busy_report["failed"] == 1 and "HTTP 503" in busy_report["last_error"]
        assert busy_report["state"] == "up"  # busy is not down
        assert other["served"] >= 1
    finally:
        server.close()
        stop(busy)
