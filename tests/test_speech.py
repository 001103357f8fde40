"""Speech output: the answer spoken as a WAV, in a chosen voice, with every input kind."""

from __future__ import annotations

import base64
import io
import urllib.parse

import pytest
import soundfile

from conftest import FakeEngine, upload
from generation import GenerationRequest
from modeling_low_vram import OFFICIAL_SYSTEM_PROMPT


def decode_wav(data: bytes):
    samples, rate = soundfile.read(io.BytesIO(data))
    info = soundfile.info(io.BytesIO(data))
    return samples, rate, info


def spoken(client, data=None, files=None):
    response = client.post(
        "/multimodal", data={"max_new_tokens": "5", "return_audio": "true", **(data or {})}, files=files or []
    )
    assert response.status_code == 200, response.text
    return response


# ---------------------------------------------------------------- HTTP layer (fake engine)


def test_json_answer_carries_a_base64_wav(client):
    audio = spoken(client, {"text": "hi"}).json()["audio"]
    samples, rate, info = decode_wav(base64.b64decode(audio["data"]))
    assert audio["format"] == "wav" and audio["sample_rate"] == rate == 24000
    assert info.channels == 1 and info.subtype == "PCM_16"
    assert audio["seconds"] == pytest.approx(len(samples) / 24000, abs=1e-3) and len(samples) == 12000


def test_wav_response_format_returns_the_file_and_the_text_header(client):
    response = spoken(client, {"text": "hi", "response_format": "wav"})
    assert response.headers["content-type"] == "audio/wav"
    assert urllib.parse.unquote(response.headers["x-text"]) == "0 images, 0 audios, 0 videos"
    samples, rate, _ = decode_wav(response.content)
    assert rate == 24000 and len(samples) == 12000


def test_speaker_reaches_the_engine_and_defaults_to_the_first_voice(client, fake_engine):
    spoken(client, {"text": "hi", "speaker": "Bass"})
    spoken(client, {"text": "hi"})
    assert [r.speaker for r in fake_engine.requests] == ["Bass", "Alto"]


@pytest.mark.parametrize(
    ("engine", "data", "status", "detail"),
    [
        (FakeEngine(), {"speaker": "Nobody"}, 400, "available voices: Alto, Bass"),
        (FakeEngine(speech=False), {}, 400, "ENABLE_AUDIO_OUTPUT=true"),
        (FakeEngine(), {"return_audio": "false", "response_format": "wav"}, 422, "return_audio=true"),
        (FakeEngine(), {"response_format": "mp3"}, 422, "response_format"),
    ],
)
def test_speech_errors(make_client, engine, data, status, detail):
    response = make_client(engine).post("/multimodal", data={"text": "hi", "return_audio": "true", **data})
    assert response.status_code == status and detail in response.json()["detail"]


# ---------------------------------------------------------------- the tiny model, speech on


@pytest.mark.parametrize("voice", ["Chelsie", "Ethan"])
def test_each_voice_speaks(speaking_client, voice):
    body = spoken(speaking_client, {"text": "Say hello.", "speaker": voice}).json()
    samples, rate, info = decode_wav(base64.b64decode(body["audio"]["data"]))
    assert rate == 24000 and info.channels == 1 and len(samples) > 0
    assert body["audio"]["seconds"] == pytest.approx(len(samples) / rate, abs=1e-3)
    assert body["audio"]["seconds"] <= 2.0 + 0.5  # MAX_SPEECH_SECONDS bounds the talker


def test_speech_with_image_audio_and_video_inputs(speaking_client, media_dir):
    files = [
        ("images", upload(media_dir / "image.png")),
        ("audios", upload(media_dir / "audio.wav")),
        ("videos", upload(media_dir / "video.mp4")),
    ]
    response = spoken(speaking_client, {"text": "Describe.", "response_format": "wav"}, files)
    samples, rate, _ = decode_wav(response.content)
    assert rate == 24000 and len(samples) > 0 and response.headers["x-text"] is not None


def test_unknown_voice_lists_the_checkpoints_voices(speaking_client):
    response = speaking_client.post("/multimodal", data={"text": "hi", "return_audio": "true", "speaker": "Zed"})
    assert response.status_code == 400 and "Chelsie, Ethan" in response.json()["detail"]


def test_speech_is_refused_clearly_when_the_talker_is_not_loaded(tiny_client):
    response = tiny_client.post("/multimodal", data={"text": "hi", "return_audio": "true"})
    assert response.status_code == 400 and "ENABLE_AUDIO_OUTPUT=true" in response.json()["detail"]


def test_about_lists_voices_and_speech_state(speaking_client, tiny_client):
    assert speaking_client.get("/").json()["model"]["voices"] == ["Chelsie", "Ethan"]
    assert speaking_client.get("/").json()["model"]["audio_output"] is True
    assert tiny_client.get("/").json()["model"]["audio_output"] is False


def test_speech_uses_the_official_system_prompt_and_gives_a_persona_as_the_authors_advise(tiny_engine):
    """Qwen2.5-Omni README, "Customization Settings": with speech the persona is a user turn the model
    acknowledges ("Sure, I got it."), under the official system prompt."""
    plain = tiny_engine.prompts.turns(GenerationRequest("Hi", None, return_audio=True))
    assert plain[0].parts == [OFFICIAL_SYSTEM_PROMPT] and plain[1].parts == ["Hi"]
    persona = tiny_engine.prompts.turns(GenerationRequest("Hi", "You are a pirate.", return_audio=True))
    assert [(turn.role, turn.parts) for turn in persona] == [
        ("system", [OFFICIAL_SYSTEM_PROMPT]),
        ("user", ["You are a pirate."]),
        ("assistant", ["Sure, I got it."]),
        ("user", ["Hi"]),
    ]
    text_only = tiny_engine.prompts.turns(GenerationRequest("Hi", "You are a pirate."))
    assert text_only[0].parts == ["You are a pirate."]


def test_talker_stop_codes_and_length_come_from_the_checkpoint(tiny_model_dir):
    from conftest import tiny_settings
    from modeling_low_vram import OmniEngine

    engine = OmniEngine.load(tiny_settings(tiny_model_dir, enable_audio_output=True, max_speech_seconds=3))
    kwargs = engine._speech_kwargs("Ethan")
    talker = engine.model.config.talker_config
    assert kwargs["talker_eos_token_id"] == [talker.tts_codec_pad_token_id, talker.tts_codec_end_token_id] == [32, 34]
    assert kwargs["talker_max_new_tokens"] == 150  # 3 s at 24000 / (2 repeats x 240 samples) = 50 codes/s
