"""Shared fixtures: the tiny checkpoint, generated media, settings, and clients (fake and real engine)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
torch.set_num_threads(1)  # torch's pool busy-waits on 2 cores

import make_media  # noqa: E402
import tiny_model  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from servers import free_port  # noqa: E402

from qwen_omni_server.core.engine import BaseEngine  # noqa: E402
from qwen_omni_server.core.errors import SpeechError  # noqa: E402
from qwen_omni_server.core.settings import Settings  # noqa: E402
from qwen_omni_server.core.types import GenerationRequest, GenerationResult  # noqa: E402
from qwen_omni_server.local.engine import OmniEngine  # noqa: E402
from qwen_omni_server.local.speech import Codec  # noqa: E402
from qwen_omni_server.server import create_app  # noqa: E402

CORPUS = ROOT.parent / "shared" / "media-corpus"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny random Qwen2.5-Omni, built once per test run."""
    return tiny_model.build(tmp_path_factory.mktemp("tiny-qwen2.5-omni"))


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    """One file of each everyday kind, made with PyAV and Pillow."""
    folder = tmp_path_factory.mktemp("media")
    files = {
        "image.png": make_media.image_bytes("PNG"),
        "image.jpg": make_media.image_bytes("JPEG", (320, 240)),
        "audio.wav": make_media.audio_bytes("wav", 1.5),
        "audio.mp3": make_media.audio_bytes("mp3", 1.5),
        "audio.flac": make_media.audio_bytes("flac", 1.0),
        "video.mp4": make_media.video_bytes(2.0, audio=True),
        "silent.mp4": make_media.video_bytes(2.0, audio=False),
        "notes.txt": b"this is a text file, not a video\n" * 20,
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def tiny_settings(model_dir: Path, **overrides) -> Settings:
    options = {"device_map": "cpu", "default_max_new_tokens": 8, **overrides}
    return Settings(_env_file=None, model_path=str(model_dir), **options)


class FakeEngine(BaseEngine):
    """Stands in for the model in HTTP-layer tests; records what it was asked."""

    voices = ["Alto", "Bass"]

    def __init__(self, speech: bool = True) -> None:
        self.requests: list[GenerationRequest] = []
        self.speech = speech

    def describe(self) -> dict:
        return {
            "model": "fake",
            "dtype": "float32",
            "devices": ["cpu"],
            "placement": {},
            "audio_output": self.speech,
            "voices": self.voices,
        }

    def check_speech(self, speaker):
        if not self.speech:
            raise SpeechError("speech output is not enabled on this server: start it with ENABLE_AUDIO_OUTPUT=true")
        if speaker is not None and speaker not in self.voices:
            raise SpeechError(f"unknown speaker {speaker!r}; available voices: {', '.join(self.voices)}")
        return speaker or self.voices[0]

    def memory(self) -> dict:
        return {"rss_bytes": 1}

    def generate(self, request: GenerationRequest) -> GenerationResult:
        self.requests.append(request)
        summary = f"{len(request.images)} images, {len(request.audios)} audios, {len(request.videos)} videos"
        audio = np.sin(np.arange(12_000) / 10).astype(np.float32) * 0.5 if request.return_audio else None
        return GenerationResult(
            text=summary,
            prompt_tokens=10,
            completion_tokens=3,
            timings_ms={"prepare": 1.0, "generate": 2.0},
            audio=audio,
            prompt_tokens_by_modality={"text": 10, "image": 0, "audio": 0, "video": 0},
            inputs={
                "images": [{"width": image.width, "height": image.height} for image in request.images],
                "audios": [{"seconds": len(samples) / 16_000} for samples in request.audios],
                "videos": [{"frames": len(video.frames), "fps": video.fps} for video in request.videos],
            },
        )


def input_counts(body: dict) -> dict[str, int]:
    """How many files of each kind a /multimodal JSON answer says the model got."""
    return {kind: len(files) for kind, files in body["inputs"].items()}


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def make_client(tmp_path):
    """Build a TestClient around create_app(settings, engine); closed after the test."""
    clients = []

    def build(engine=None, **overrides) -> TestClient:
        settings = Settings(_env_file=None, model_path=str(tmp_path / "unused"), device_map="cpu", **overrides)
        client = TestClient(create_app(settings, engine=engine))
        clients.append(client.__enter__())
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client, fake_engine) -> TestClient:
    return make_client(fake_engine)


def speaker_without_end(tiny_model_dir, seconds: float, **settings):
    """The tiny model with a talker that speaks until MAX_SPEECH_SECONDS (SPEECH_SECONDS_PER_TOKEN as long, so
    that even a one-token answer may take it all, unless `settings` say otherwise): its end codes' output
    weights are zeroed and the others scaled up, so an end code's probability is nil (a random talker ends
    within a few dozen codes)."""
    settings = {"speech_seconds_per_token": seconds, "speech_chunk_blocks": 1, **settings}
    engine = OmniEngine.load(
        tiny_settings(tiny_model_dir, enable_audio_output=True, max_speech_seconds=seconds, **settings)
    )
    with torch.no_grad():
        head = engine.model.talker.codec_head.weight
        head.mul_(1000)
        head[list(Codec.of(engine.model.config).ends)] = 0
    return engine


def spoken_request(**extra) -> dict:
    """A greedy, seeded /v1 request for a streamed-speech-shaped spoken answer (8 tokens unless `extra` says)."""
    return {
        "model": "m",
        "messages": [{"role": "user", "content": "Say something."}],
        "modalities": ["text", "audio"],
        "audio": {"voice": "Ethan", "format": "pcm16"},
        "max_tokens": 8,
        "temperature": 0,
        "seed": 2,
        **extra,
    }


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir) -> OmniEngine:
    return OmniEngine.load(tiny_settings(tiny_model_dir))


@pytest.fixture(scope="session")
def speaking_engine(tiny_model_dir) -> OmniEngine:
    """The tiny model with speech output on (short speech)."""
    return OmniEngine.load(tiny_settings(tiny_model_dir, enable_audio_output=True, max_speech_seconds=2))


@pytest.fixture(scope="session")
def speaking_client(speaking_engine):
    """The real server code around the tiny model with speech output on."""
    with TestClient(create_app(speaking_engine.settings, engine=speaking_engine)) as client:
        yield client


@pytest.fixture(scope="session")
def live_server(speaking_engine):
    """A real uvicorn server on a free local port around the speaking tiny model; yields its base URL."""
    yield from serve(create_app(speaking_engine.settings, engine=speaking_engine))


def serve(app):
    """Run `app` with uvicorn in a background thread until the generator is closed."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="session")
def tiny_client(tiny_model_dir, tiny_engine):
    """The real server code around the tiny model, shared by the end-to-end tests."""
    with TestClient(create_app(tiny_settings(tiny_model_dir), engine=tiny_engine)) as client:
        yield client


def upload(path: Path, content_type: str = "application/octet-stream") -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), content_type)


class CountingEngine:
    """The real engine, counting the tokens its thinker produces as it produces them (one lm_head call each),
    and how many there were when the request's stop event was set: proof that a generation was running when
    it was stopped, and of how soon it stopped."""

    def __init__(self, engine: OmniEngine) -> None:
        self.engine = engine
        self.tokens = 0
        self.at_stop: int | None = None
        self.results: list[GenerationResult] = []
        self.running = threading.Event()
        self._hook = engine.model.thinker.lm_head.register_forward_hook(self._count)

    def _count(self, *args) -> None:
        self.tokens += 1
        if self.tokens >= 3:
            self.running.set()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        self.tokens, self.at_stop = 0, None
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                if request.stop.wait(0.005):
                    self.at_stop = self.tokens
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            result = self.engine.generate(request)
            self.results.append(result)
            return result
        finally:
            done.set()
            watcher.join()

    def close(self) -> None:
        self._hook.remove()


@pytest.fixture
def counting_engine(tiny_engine):
    engine = CountingEngine(tiny_engine)
    yield engine
    engine.close()
