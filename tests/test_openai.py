"""The OpenAI-compatible API, driven over HTTP by the real `openai` package, on the tiny model."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import make_media
import openai
import pytest
import soundfile
from conftest import ROOT, FakeEngine, serve

from qwen_omni_server.core.settings import Settings
from qwen_omni_server.server import create_app


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server}/v1", api_key="not-needed", max_retries=0, timeout=120)


def ask(client, messages, **options):
    options = {"max_tokens": 8, "temperature": 0, **options}
    return client.chat.completions.create(model="qwen2.5-omni", messages=messages, **options)


def test_models_lists_the_served_model(client, tiny_model_dir):
    assert [m.id for m in client.models.list().data] == [str(tiny_model_dir)]


def test_plain_chat(client):
    answer = ask(client, [{"role": "user", "content": "Hello there"}])
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens <= 8 and answer.usage.total_tokens > answer.usage.prompt_tokens


def test_multi_turn_with_system_and_assistant_turns(client):
    short = ask(client, [{"role": "user", "content": "Hi"}])
    long = ask(
        client,
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me more."},
        ],
    )
    assert long.usage.prompt_tokens > short.usage.prompt_tokens + 10


def test_media_parts_reach_the_model(client):
    content = [
        {"type": "text", "text": "Describe these."},
        {"type": "image_url", "image_url": {"url": data_url("image/png", make_media.image_bytes("PNG"))}},
        {
            "type": "input_audio",
            "input_audio": {"data": base64.b64encode(make_media.audio_bytes("wav", 1.0)).decode(), "format": "wav"},
        },
        {"type": "audio_url", "audio_url": {"url": data_url("audio/mpeg", make_media.audio_bytes("mp3", 1.0))}},
        {"type": "video_url", "video_url": {"url": data_url("video/mp4", make_media.video_bytes(2.0))}},
    ]
    text_only = ask(client, [{"role": "user", "content": "Describe these."}])
    answer = ask(client, [{"role": "user", "content": content}])
    assert answer.usage.prompt_tokens > text_only.usage.prompt_tokens + 100
    by_modality = answer.usage.prompt_tokens_details.model_extra["by_modality"]
    assert by_modality["image"] > 0 and by_modality["audio"] > 0 and by_modality["video"] > 0


def test_seed_makes_sampling_reproducible(client):
    messages = [{"role": "user", "content": "Write anything."}]
    first = ask(client, messages, temperature=1.0, seed=7, max_tokens=12).choices[0].message.content
    again = ask(client, messages, temperature=1.0, seed=7, max_tokens=12).choices[0].message.content
    assert first == again


def test_stop_strings_end_the_answer_before_them(client):
    messages = [{"role": "user", "content": "Say something."}]
    full = ask(client, messages, max_tokens=16).choices[0].message.content
    stop = full.strip()[len(full.strip()) // 2 :][:2]
    assert stop
    cut = ask(client, messages, max_tokens=16, stop=[stop])
    assert cut.choices[0].message.content == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_streaming_sends_text_as_it_is_generated(client):
    stream = ask(
        client,
        [{"role": "user", "content": "Tell me a story."}],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    finals = [i for i, c in enumerate(chunks) if c.choices and c.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(texts) >= 3 and len(finals) == 1  # several text chunks arrive before the last one
    assert chunks[-1].usage.completion_tokens == 24 or chunks[-1].usage.completion_tokens > 0
    whole = ask(client, [{"role": "user", "content": "Tell me a story."}], max_tokens=24)
    assert "".join(texts) == whole.choices[0].message.content


def test_speech_in_openai_shape(client):
    answer = ask(
        client,
        [{"role": "user", "content": "Say something."}],
        modalities=["text", "audio"],
        audio={"voice": "Ethan", "format": "wav"},
        temperature=0,
        seed=2,  # the random tiny talker may end before a sound; this one speaks
    )
    audio = answer.choices[0].message.audio
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(audio.data)))
    assert rate == 24000 and len(samples) > 0 and audio.id.startswith("audio_")
    assert audio.transcript == answer.choices[0].message.content and audio.expires_at > time.time()


@pytest.mark.parametrize(
    ("options", "messages", "param", "fragment"),
    [
        (
            {},
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.org/a.png"}}]}],
            "messages[0].content[0]",
            "remote URLs are refused",
        ),
        (
            {},
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}],
            "messages[0].content[0]",
            "not valid base64",
        ),
        (
            {"modalities": ["text", "audio"], "audio": {"voice": "Nobody", "format": "wav"}},
            None,
            "audio.voice",
            "available voices: Chelsie, Ethan",
        ),
        (
            {"stream": True, "modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": "wav"}},
            None,
            "audio.format",
            "streamed speech arrives as pcm16",
        ),
        ({"max_tokens": 10**6}, None, "max_tokens", "MAX_NEW_TOKENS_LIMIT"),
        ({"n": 2}, None, "n", "less than or equal to 1"),
        ({"extra_body": {"tools": [{"type": "function"}]}}, None, "tools", "Extra inputs are not permitted"),
    ],
)
def test_errors_in_openai_shape(client, options, messages, param, fragment):
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, messages or [{"role": "user", "content": "hi"}], **options)
    body = error.value.body
    assert error.value.status_code == 400 and fragment in body["message"]
    assert body["type"] == "invalid_request_error" and body["param"] == param


def test_a_picture_that_is_not_one_gets_a_415(client):
    part = {"type": "image_url", "image_url": {"url": data_url("image/png", b"plain text, not an image")}}
    with pytest.raises(openai.APIStatusError) as error:
        ask(client, [{"role": "user", "content": [part]}])
    assert error.value.status_code == 415 and "not a recognised" in error.value.body["message"]


def test_api_key_works_as_the_openai_clients_key(tmp_path):
    app = create_app(Settings(_env_file=None, model_path=str(tmp_path), api_key="key-for-tests"), engine=FakeEngine())
    for url in serve(app):
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="key-for-tests", max_retries=0)
        assert good.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}]).choices
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong-key", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as error:
            bad.models.list()
        assert error.value.body["code"] == "invalid_api_key"


def test_disconnecting_mid_stream_frees_the_model(live_server):
    payload = {
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 1500,
        "temperature": 0,
        "stream": True,
    }
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{live_server}/v1/chat/completions", json=payload) as response:
            first = next(response.iter_lines())
            assert first.startswith("data: ")
        # The client is gone: the generation must stop at its next token and free the model.
        deadline = time.monotonic() + 10
        while http.get(f"{live_server}/health").json()["generations"]["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.get(f"{live_server}/health").json()["generations"]["running"] == 0
        started = time.monotonic()
        quick = http.post(
            f"{live_server}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert quick.status_code == 200 and time.monotonic() - started < 5


def test_multimodal_streams_the_same_way(live_server):
    with httpx.Client(timeout=60) as http:
        with http.stream(
            "POST",
            f"{live_server}/multimodal",
            data={"text": "Tell me a story.", "max_new_tokens": "16", "stream": "true"},
            files=[("images", ("a.png", make_media.image_bytes("PNG")))],
        ) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert sum(1 for e in events if e["choices"] and e["choices"][0]["delta"].get("content")) >= 2
    assert events[-1]["usage"]["prompt_tokens_details"]["by_modality"]["image"] > 0


def test_the_readme_openai_examples_run_as_written(live_server, tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- openai-example:begin -->")[1].split("<!-- openai-example:end -->")[0]
    code = block.split("```python")[1].split("```")[0].replace("http://localhost:8000", live_server)
    (tmp_path / "photo.jpg").write_bytes(make_media.image_bytes("JPEG", (320, 240)))
    (tmp_path / "speech.wav").write_bytes(make_media.audio_bytes("wav", 1.5))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - our own README's example
    printed = capsys.readouterr().out
    for label in ("plain:", "media:", "stream:", "speech:", "streamed speech:"):
        assert label in printed
    assert soundfile.info(str(tmp_path / "answer.wav")).samplerate == 24000
    assert soundfile.info(str(tmp_path / "streamed.wav")).frames > 0


def test_remote_media_only_from_listed_hosts_within_limits(tmp_path, tiny_engine):
    """MEDIA_URL_HOSTS lets /v1 fetch from a listed host (here a loopback file server), size-bounded,
    never following redirects."""
    import functools
    import http.server
    import threading

    (tmp_path / "photo.png").write_bytes(make_media.image_bytes("PNG", (64, 48)))
    (tmp_path / "big.bin").write_bytes(b"x" * 200_000)

    class Files(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            if self.path == "/elsewhere":
                self.send_response(302)
                self.send_header("Location", "http://example.org/photo.png")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Files, directory=str(tmp_path)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    settings = tiny_engine.settings.model_copy(
        update={
            "media_url_hosts": ["127.0.0.1"],
            "max_file_mb": 0.1,
            "media_url_allow_private": True,  # the file server is on loopback
            "media_url_ports": [files.server_address[1]],
        }
    )
    try:
        for url in serve(create_app(settings, engine=tiny_engine)):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)

            def ask_about(image_url: str):
                part = {"type": "image_url", "image_url": {"url": image_url}}
                return client.chat.completions.create(
                    model="m", max_tokens=2, messages=[{"role": "user", "content": [part]}]
                )

            assert ask_about(f"{base}/photo.png").usage.prompt_tokens > 30
            with pytest.raises(openai.APIStatusError) as too_big:
                ask_about(f"{base}/big.bin")
            assert too_big.value.status_code == 413 and "MAX_FILE_MB" in too_big.value.body["message"]
            with pytest.raises(openai.BadRequestError) as redirected:
                ask_about(f"{base}/elsewhere")
            assert "HTTP 302" in redirected.value.body["message"]
            with pytest.raises(openai.BadRequestError) as unlisted:
                ask_about(f"http://localhost:{files.server_address[1]}/photo.png")
            assert "MEDIA_URL_HOSTS" in unlisted.value.body["message"]
    finally:
        files.shutdown()


def test_what_a_damaged_file_yielded_is_reported_not_dropped(client, live_server):
    """A truncated upload is used for what it still holds, and both APIs say so (plain and streamed)."""
    flac = make_media.audio_bytes("flac", 3.0)
    cut = flac[: len(flac) // 3]
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(cut).decode(), "format": "flac"}}
    answer = ask(client, [{"role": "user", "content": [part]}])
    assert any(w.startswith("messages[0].content[0]: audio is damaged") for w in answer.model_extra["warnings"])
    stream = list(ask(client, [{"role": "user", "content": [part]}], stream=True))
    assert "audio is damaged" in stream[0].model_extra["warnings"][0]
    with httpx.Client(timeout=60) as http:
        with http.stream(
            "POST",
            f"{live_server}/multimodal",
            data={"max_new_tokens": "4", "stream": "true"},
            files=[("audios", ("cut.flac", cut))],
        ) as response:
            first = json.loads(next(line for line in response.iter_lines() if line.startswith("data: "))[6:])
    assert first["warnings"][0].startswith("audios[0] 'cut.flac': audio is damaged")


def test_the_default_answer_bound_is_held_to_the_limit_too(tmp_path):
    """A /v1 request that sends no max_tokens gets DEFAULT_MAX_NEW_TOKENS, which MAX_NEW_TOKENS_LIMIT bounds as
    it bounds a request's own."""
    settings = Settings(
        _env_file=None, model_path=str(tmp_path), default_max_new_tokens=4096, max_new_tokens_limit=2048
    )
    from fastapi.testclient import TestClient

    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        answer = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert answer.status_code == 400 and "MAX_NEW_TOKENS_LIMIT" in answer.json()["error"]["message"]
    assert answer.json()["error"]["param"] == "max_tokens"


def test_the_video_options_turn_a_video_into_its_frame_and_sound_as_on_multimodal(client, live_server):
    """`extract_video_frame` / `extract_video_audio` (an extension, as on /multimodal): the video reaches the
    model as its last frame and its sound track, in its place, and the answer's `inputs` say so; the prompt is
    the one /multimodal makes of the same file with the same flags."""
    video = make_media.video_bytes(2.0, audio=True)
    content = [
        {"type": "text", "text": "What happens?"},
        {"type": "video_url", "video_url": {"url": data_url("video/mp4", video)}},
    ]
    options = {"extract_video_frame": True, "extract_video_audio": True}
    answer = ask(client, [{"role": "user", "content": content}], extra_body=options)
    inputs = answer.model_extra["inputs"]
    assert len(inputs["images"]) == 1 and len(inputs["audios"]) == 1 and not inputs.get("videos")
    form = {
        "text": "What happens?",
        "max_new_tokens": "8",
        "extract_video_frame": "true",
        "extract_video_audio": "true",
    }
    direct = httpx.post(f"{live_server}/multimodal", data=form, files=[("videos", ("v.mp4", video))], timeout=120)
    assert direct.json()["inputs"] == inputs
    assert direct.json()["usage"]["prompt_tokens"] == answer.usage.prompt_tokens
    silent = [
        {"type": "video_url", "video_url": {"url": data_url("video/mp4", make_media.video_bytes(1.0, audio=False))}}
    ]
    alone = ask(client, [{"role": "user", "content": silent}], extra_body={"extract_video_audio": True})
    assert len(alone.model_extra["inputs"]["videos"]) == 1  # no sound to send: the video goes whole
    assert [w.split(": ", 1)[1] for w in alone.model_extra["warnings"]][:2] == [
        "has no audio track, so no audio was extracted",
        "sent whole as a video instead",
    ]


def test_v1_answers_say_what_the_model_got_of_each_file(client):
    content = [
        {"type": "text", "text": "Describe it."},
        {"type": "image_url", "image_url": {"url": data_url("image/png", make_media.image_bytes("PNG", (320, 240)))}},
    ]
    answer = ask(client, [{"role": "user", "content": content}])
    picture = answer.model_extra["inputs"]["images"][0]
    assert picture["tokens"] > 0 and picture["width"] % 28 == 0
    chunks = list(ask(client, [{"role": "user", "content": content}], stream=True))
    last = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert last.model_extra["inputs"] == answer.model_extra["inputs"]


def test_the_server_page_gives_its_defaults(live_server, speaking_engine):
    about = httpx.get(f"{live_server}/", timeout=30).json()
    settings = speaking_engine.settings
    assert about["defaults"] == {
        "system_prompt": settings.default_system_prompt,
        "max_new_tokens": settings.default_max_new_tokens,
    }
