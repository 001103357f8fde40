"""The real server code on the tiny random Qwen2.5-Omni: every input kind answers 200, bad ones a 4xx."""

from __future__ import annotations

import pytest
from conftest import input_counts, upload


def ask(client, data=None, files=None, status=200):
    response = client.post("/multimodal", data={"max_new_tokens": "6", **(data or {})}, files=files or [])
    assert response.status_code == status, response.text
    return response.json()


def test_text_only(tiny_client):
    body = ask(tiny_client, {"text": "Hello, who are you?"})
    assert isinstance(body["text"], str) and 1 <= body["usage"]["completion_tokens"] <= 6
    assert input_counts(body) == {"images": 0, "audios": 0, "videos": 0}


def test_greedy_answers_are_reproducible(tiny_client):
    first = ask(tiny_client, {"text": "Say something."})
    assert ask(tiny_client, {"text": "Say something."})["text"] == first["text"]


def test_system_prompt_reaches_the_prompt(tiny_client):
    short = ask(tiny_client, {"text": "hi", "system_prompt": "Be brief."})
    longer = ask(tiny_client, {"text": "hi", "system_prompt": "Be brief. Answer in French, and in rhyme, please."})
    assert longer["usage"]["prompt_tokens"] > short["usage"]["prompt_tokens"]


@pytest.mark.parametrize("name", ["image.png", "image.jpg"])
def test_image(tiny_client, media_dir, name):
    text_only = ask(tiny_client, {"text": "What is this?"})
    body = ask(tiny_client, {"text": "What is this?"}, [("images", upload(media_dir / name))])
    assert input_counts(body)["images"] == 1
    assert body["usage"]["prompt_tokens"] > text_only["usage"]["prompt_tokens"] + 4  # image tokens were added


@pytest.mark.parametrize("name", ["audio.wav", "audio.mp3", "audio.flac"])
def test_audio_without_text(tiny_client, media_dir, name):
    body = ask(tiny_client, files=[("audios", upload(media_dir / name))])
    assert input_counts(body)["audios"] == 1 and body["usage"]["prompt_tokens"] > 30


def test_video_as_video_brings_its_audio(tiny_client, media_dir):
    with_sound = ask(tiny_client, {"text": "What happens?"}, [("videos", upload(media_dir / "video.mp4"))])
    silent = ask(tiny_client, {"text": "What happens?"}, [("videos", upload(media_dir / "silent.mp4"))])
    assert input_counts(with_sound) == input_counts(silent) == {"images": 0, "audios": 0, "videos": 1}
    # Same frames; the sounding one also carries its interleaved audio tokens.
    assert with_sound["usage"]["prompt_tokens"] > silent["usage"]["prompt_tokens"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"extract_video_audio": "true"}, {"images": 0, "audios": 1, "videos": 0}),
        ({"extract_video_frame": "true"}, {"images": 1, "audios": 0, "videos": 0}),
        ({"extract_video_audio": "true", "extract_video_frame": "true"}, {"images": 1, "audios": 1, "videos": 0}),
    ],
)
def test_split_video(tiny_client, media_dir, flags, expected):
    body = ask(tiny_client, {"text": "Describe.", **flags}, [("videos", upload(media_dir / "video.mp4"))])
    assert input_counts(body) == expected


def test_several_files_of_each_kind_at_once(tiny_client, media_dir):
    files = [
        ("images", upload(media_dir / "image.png")),
        ("images", upload(media_dir / "image.jpg")),
        ("audios", upload(media_dir / "audio.wav")),
        ("audios", upload(media_dir / "audio.mp3")),
        ("videos", upload(media_dir / "video.mp4")),
        ("videos", upload(media_dir / "silent.mp4")),
    ]
    body = ask(tiny_client, {"text": "Compare them all."}, files)
    assert input_counts(body) == {"images": 2, "audios": 2, "videos": 2}


@pytest.mark.parametrize(
    ("data", "files", "status"),
    [
        ({}, [], 422),
        ({"text": "hi", "extract_video_frame": "perhaps"}, [], 422),
        ({}, [("videos", "notes.txt")], 415),
        ({}, [("images", "corrupt.png")], 400),
    ],
)
def test_bad_inputs(tiny_client, media_dir, data, files, status):
    (media_dir / "corrupt.png").write_bytes((media_dir / "image.png").read_bytes()[:100])
    response = tiny_client.post("/multimodal", data=data, files=[(f, upload(media_dir / n)) for f, n in files])
    assert response.status_code == status and response.json()["detail"]
    assert ask(tiny_client, {"text": "still serving?"})["text"] is not None


def test_a_picture_the_model_cannot_take_is_a_422(tiny_client):
    import io

    from PIL import Image

    sliver = io.BytesIO()
    Image.new("RGB", (900, 2)).save(sliver, "PNG")  # 450:1, over qwen-omni-utils' 200:1 limit
    response = tiny_client.post("/multimodal", files=[("images", ("sliver.png", sliver.getvalue()))])
    assert response.status_code == 422 and "aspect ratio" in response.json()["detail"]


def test_a_clip_of_a_few_samples_still_answers(tiny_client):
    import io

    import numpy as np
    import soundfile

    clip = io.BytesIO()
    soundfile.write(clip, np.full(5, 0.1, np.float32), 44100, format="WAV")
    assert input_counts(ask(tiny_client, files=[("audios", ("five.wav", clip.getvalue()))]))["audios"] == 1


def test_about_describes_the_loaded_model(tiny_client, tiny_model_dir):
    model = tiny_client.get("/").json()["model"]
    assert model["model"] == str(tiny_model_dir) and model["devices"] == ["cpu"] and model["dtype"] == "float32"
    assert "talker" not in model["placement"]  # speech output is off by default


def test_audio_features_padded_to_the_clip_give_the_same_answer(tiny_model_dir, media_dir):
    """Padding features to the clip instead of Whisper's 300 s changes the cost, not the greedy answer."""
    from conftest import tiny_settings

    from qwen_omni_server.core import media
    from qwen_omni_server.core.types import GenerationRequest
    from qwen_omni_server.local.engine import OmniEngine

    engine = OmniEngine.load(tiny_settings(tiny_model_dir))
    clips = [media.load_audio(str(media_dir / name), max_seconds=60).samples for name in ("audio.wav", "audio.mp3")]
    request = GenerationRequest("What do you hear?", None, audios=clips, max_new_tokens=12)
    fitted = engine.generate(request)
    features = engine.prompts.build(request).inputs
    engine.prompts.audio_padding = "whisper"
    padded = engine.generate(request)
    full_features = engine.prompts.build(request).inputs
    assert fitted.completion_ids == padded.completion_ids and fitted.prompt_tokens == padded.prompt_tokens
    assert features["input_features"].shape[-1] == 150 + 3  # the 1.5 s clip in 10 ms frames and a window, not 30000
    assert full_features["input_features"].shape[-1] == 30000
