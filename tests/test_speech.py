"""Speech output: the answer spoken as a WAV, in a chosen voice, with every input kind."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import time
import urllib.parse
from types import SimpleNamespace

import httpx
import make_media
import numpy as np
import openai
import pytest
import soundfile
import torch
from conftest import FakeEngine, serve, speaker_without_end, spoken_request, tiny_settings, upload

from qwen_omni_server.core.conversation import OFFICIAL_SYSTEM_PROMPT
from qwen_omni_server.core.errors import OutOfMemory
from qwen_omni_server.core.types import GenerationRequest
from qwen_omni_server.local.engine import OmniEngine
from qwen_omni_server.local.speaker import Speaker
from qwen_omni_server.local.speech import NO_SPEECH_WARNING, Codec, CodeStream, Token2Wav
from qwen_omni_server.server import create_app


def decode_wav(data: bytes):
    samples, rate = soundfile.read(io.BytesIO(data))
    info = soundfile.info(io.BytesIO(data))
    return samples, rate, info


def spoken(client, data=None, files=None):
    # A seed: the random tiny talker may end before it makes a sound (then there is no audio; see below).
    form = {"max_new_tokens": "5", "return_audio": "true", "seed": "1", **(data or {})}
    response = client.post("/multimodal", data=form, files=files or [])
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
    engine = OmniEngine.load(tiny_settings(tiny_model_dir, enable_audio_output=True, max_speech_seconds=3))
    talker = engine.model.config.talker_config
    assert Codec.of(engine.model.config).ends == (talker.tts_codec_pad_token_id, talker.tts_codec_end_token_id)
    assert Codec.of(engine.model.config).ends == (32, 34)
    assert engine.max_speech_codes() == 150  # 3 s at 24000 / (2 repeats x 240 samples) = 50 codes/s


# ---------------------------------------------------------------- speech that has no sound, and what is spoken


def picture():
    from PIL import Image

    return Image.open(io.BytesIO(make_media.image_bytes("PNG"))).convert("RGB")


@pytest.mark.parametrize("voice", ["Chelsie", "Ethan"])
def test_a_talker_that_ends_at_once_gives_the_text_and_a_warning(speaking_engine, speaking_client, voice):
    # Seed 3: the random talker's first code ends speech (token2wav used to fail on 0 codes: a 500).
    request = GenerationRequest("hi", None, images=[picture()], max_new_tokens=8, return_audio=True, speaker=voice)
    result = speaking_engine.generate(dataclasses.replace(request, seed=3))
    assert result.audio is None and result.text and NO_SPEECH_WARNING in result.warnings
    png = base64.b64encode(make_media.image_bytes("PNG")).decode()
    content = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
        {"type": "text", "text": "hi"},
    ]
    body = {
        "messages": [{"role": "user", "content": content}],
        "modalities": ["text", "audio"],
        "audio": {"voice": voice},
        "max_tokens": 8,
        "temperature": 0,
        "seed": 3,
    }
    response = speaking_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["choices"][0]["message"]["content"] == result.text
    assert "audio" not in answer["choices"][0]["message"] and NO_SPEECH_WARNING in answer["warnings"]
    form = {"text": "hi", "return_audio": "true", "speaker": voice, "max_new_tokens": "8", "seed": "3"}
    response = speaking_client.post(
        "/multimodal", data=form, files=[("images", ("a.png", make_media.image_bytes("PNG")))]
    )
    assert response.status_code == 200, response.text  # the request: it was a 500
    assert response.json()["text"] == result.text and "audio" not in response.json()
    assert NO_SPEECH_WARNING in response.json()["warnings"]


def test_codes_that_are_not_speech_never_reach_token2wav():
    # The released checkpoints' codec (see shared/model-configs): 8448 talker codes, 8193 in token2wav's codebook.
    talker = SimpleNamespace(
        vocab_size=8448,
        tts_codec_pad_token_id=8292,
        tts_codec_start_token_id=8293,
        tts_codec_end_token_id=8294,
        tts_codec_mask_token_id=8296,
    )
    dit = SimpleNamespace(num_embeds=8193)
    real = Codec.of(SimpleNamespace(talker_config=talker, token2wav_config=SimpleNamespace(dit_config=dit)))
    assert real.codebook == 8193 and real.vocabulary == 8448 and real.ends == (8292, 8294)
    suppressed = set(real.suppressed())
    assert {8193, 8293, 8295, 8296, 8447, real.start} <= suppressed and not {8292, 8294, 0, 8192} & suppressed
    received = []
    stream = CodeStream(real, received.extend)
    stream.put(torch.tensor([[1, 2, 3]]))  # the prompt
    for code in [5, 8293, 8296, 8192, 8300, 7, 8294, 9]:
        stream.put(torch.tensor([code]))
    assert received == stream.codes == [5, 8192, 7] and stream.dropped == 3  # nothing after the end code


def test_a_stop_string_cuts_the_speech_with_the_text(speaking_engine):
    """The talker speaks the returned text: cut by a stop string spanning two tokens, or by the length
    bound, the same text gives the same speech (the old wrapper spoke the stop string's first token in
    one case and dropped the answer's last token in the other)."""
    tokenizer = speaking_engine.processor.tokenizer
    base = GenerationRequest("Say hello.", None, max_new_tokens=8, return_audio=True, seed=1)
    ids = speaking_engine.generate(base).completion_ids
    full = tokenizer.decode(ids, skip_special_tokens=True)
    for kept in range(2, len(ids) - 2):
        head = tokenizer.decode(ids[:kept], skip_special_tokens=True)
        stop = tokenizer.decode(ids[: kept + 2], skip_special_tokens=True)[len(head) :]
        if stop and full.startswith(head + stop) and full.find(stop) == len(head):
            break
    else:
        pytest.fail(f"no stop string to test with in {full!r}")
    by_stop = speaking_engine.generate(dataclasses.replace(base, stop_strings=[stop]))
    by_length = speaking_engine.generate(dataclasses.replace(base, max_new_tokens=kept))
    assert by_stop.text == by_length.text == head
    assert by_stop.audio is not None and np.array_equal(by_stop.audio, by_length.audio)


# ---------------------------------------------------------------- chunked synthesis


def some_codes(count: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 32, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_vocoder_reach_bounds_what_bigvgan_reads(speaking_engine):
    synthesis = Token2Wav(speaking_engine.model, "Chelsie", seed=1)
    mel = synthesis.mel(some_codes(100), 0, 200)
    moved = mel.clone()
    moved[:, :, 100] += 1.0
    changed = np.flatnonzero(synthesis.vocode(moved) != synthesis.vocode(mel))
    reach, hop = synthesis.reach, synthesis.hop
    assert changed.size and (100 - reach) * hop <= changed.min() and changed.max() < (101 + reach) * hop


@pytest.mark.parametrize("chunk_blocks", [1, 3])
def test_chunks_decode_to_the_whole_answers_audio(speaking_engine, chunk_blocks):
    """Chunked synthesis (every answer's) against the reference, whole synthesis. Tolerance: 1e-4 of the
    loudest sample. Each chunk's DiT window has the context its block attention reads in one pass and
    BigVGAN gets its full reach on both sides, with the same noise per frame; what is left is the context
    frames feeding back into the kept ones at each of the ODE's DiT evaluations (tiny where frames mix as
    little as in this random DiT; see bench/chunked_speech_bench.py for the real size) and float rounding."""
    codes = some_codes(150)
    synthesis = Token2Wav(speaking_engine.model, "Ethan", seed=11)
    whole = synthesis.whole(codes)
    pieces: list[np.ndarray] = []
    chunked = synthesis.chunked(chunk_blocks, pieces.append)
    for start in range(0, len(codes), 7):  # codes arrive a few at a time, as the talker makes them
        chunked.add(codes[start : start + 7])
        assert sum(map(len, pieces)) <= len(whole)
    assert pieces, "audio must start before the last code"
    chunked.finish()
    streamed = np.concatenate(pieces)
    assert len(pieces) > 2 and len(streamed) == len(whole) == 150 * 2 * 240
    assert np.abs(streamed - whole).max() <= 1e-4 * np.abs(whole).max()
    other_noise = Token2Wav(speaking_engine.model, "Ethan", seed=12).whole(codes)
    assert np.abs(other_noise - whole).max() > 1e-2 * np.abs(whole).max()  # the tolerance can tell noises apart


def test_a_talker_that_does_not_end_stops_soon_after_a_short_answer(tiny_model_dir):
    """SPEECH_SECONDS_PER_TOKEN bounds the talker by the text it speaks: 2 s plus 0.25 s for each of the
    answer's 2 tokens, where MAX_SPEECH_SECONDS alone let it talk for 8 s."""
    engine = speaker_without_end(tiny_model_dir, 8, speech_seconds_per_token=0.25)
    result = engine.generate(GenerationRequest("Say something.", None, max_new_tokens=2, return_audio=True, seed=2))
    assert len(result.completion_ids) == 2 and not set(result.completion_ids) & set(engine._stop_ids)  # both spoken
    seconds = len(result.audio) / 24000 if result.audio is not None else 0
    assert seconds == 2 + 2 * 0.25, f"{seconds} s of speech"
    assert engine.max_speech_codes() == 400  # the absolute bound: 8 s of 50 codes


# ---------------------------------------------------------------- streamed speech over HTTP


@pytest.fixture(scope="module")
def three_seconds(tiny_model_dir):
    engine = speaker_without_end(tiny_model_dir, 3)
    for url in serve(create_app(engine.settings, engine=engine)):
        yield url


def events(response) -> list[dict]:
    lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_speech_streams_in_openai_shape(three_seconds):
    client = openai.OpenAI(base_url=f"{three_seconds}/v1", api_key="none", max_retries=0, timeout=120)
    chunks = list(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **spoken_request())
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    audios = [d.audio.model_dump(exclude_none=True) for d in deltas if getattr(d, "audio", None)]
    pieces = [base64.b64decode(a["data"]) for a in audios if "data" in a]
    assert len({a["id"] for a in audios}) == 1 and audios[-1]["expires_at"] > time.time()
    assert len(pieces) >= 3  # the voice comes in pieces as it is made
    first_audio = next(i for i, a in enumerate(audios) if "data" in a)
    assert all("transcript" in a for a in audios[:first_audio])  # the text comes first, as the transcript
    assert chunks[-1].usage.completion_tokens > 0
    whole = client.chat.completions.create(**{**spoken_request(), "audio": {"voice": "Ethan", "format": "wav"}})
    assert "".join(a.get("transcript", "") for a in audios) == whole.choices[0].message.content
    streamed = np.frombuffer(b"".join(pieces), "<i2")
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(whole.choices[0].message.audio.data)), dtype="int16")
    assert rate == 24000 and len(streamed) == len(samples) == 3 * 24000  # 150 codes of 480 samples
    assert np.array_equal(streamed, samples)  # the same chunks, streamed or collected


def test_multimodal_streams_speech_the_same_way(three_seconds):
    form = {"text": "Say something.", "return_audio": "true", "stream": "true", "max_new_tokens": "8"}
    with httpx.Client(timeout=120) as http, http.stream("POST", f"{three_seconds}/multimodal", data=form) as response:
        assert response.status_code == 200
        chunks = events(response)
    audios = [c["choices"][0]["delta"]["audio"] for c in chunks if c["choices"] and "audio" in c["choices"][0]["delta"]]
    pcm = b"".join(base64.b64decode(a["data"]) for a in audios if "data" in a)
    assert len(pcm) == 3 * 24000 * 2 and "usage" in chunks[-1]


def test_a_client_leaving_mid_speech_stops_the_talker(tiny_model_dir):
    engine = speaker_without_end(tiny_model_dir, 60)  # 3000 codes: minutes of work if nothing stops it
    talker_steps: list[float] = []
    hook = engine.model.talker.register_forward_hook(lambda *args: talker_steps.append(time.monotonic()))
    try:
        for url in serve(create_app(engine.settings, engine=engine)):
            with httpx.Client(timeout=60) as http:
                with http.stream("POST", f"{url}/v1/chat/completions", json=spoken_request(stream=True)) as response:
                    for line in response.iter_lines():
                        if '"data"' in line:  # the first audio: the talker is running
                            break
                    steps_before_leaving = len(talker_steps)
                    left = time.monotonic()
                deadline = left + 2
                while http.get(f"{url}/health").json()["generations"]["running"] and time.monotonic() < deadline:
                    time.sleep(0.05)
                freed = time.monotonic() - left
                time.sleep(0.5)
            assert steps_before_leaving > 0 and freed < 2
            assert talker_steps[-1] - left < 2 and len(talker_steps) < 1000
    finally:
        hook.remove()


# ---------------------------------------------------------------- each request's own random draws


def sampled(engine, seed: int | None = None, **extra):
    request = GenerationRequest("Write anything.", None, max_new_tokens=12, temperature=1.0, seed=seed, **extra)
    return engine.generate(request)


def test_a_seeded_request_leaves_torchs_global_generator_as_it_was(speaking_engine):
    """A request's seed seeded torch's global generator (torch.manual_seed): whatever drew from it next drew
    numbers the client had chosen. Now the thinker and the talker draw from streams of their own."""
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    sampled(speaking_engine, seed=5)
    sampled(speaking_engine, seed=5, return_audio=True)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_unseeded_requests_after_the_same_seeded_one_differ(speaking_engine):
    """An unseeded request used to go on from where the seeded one before it left the global generator:
    after the same seeded request, the same "random" answer."""
    answers = []
    for _ in range(2):
        sampled(speaking_engine, seed=5)
        answers.append(sampled(speaking_engine).completion_ids)
    assert answers[0] != answers[1]
    assert sampled(speaking_engine, seed=5).completion_ids == sampled(speaking_engine, seed=5).completion_ids


def test_the_talkers_draws_do_not_depend_on_the_thinkers(speaking_engine):
    """The same seed, the thinker greedy (no draws) or sampling (a draw a token): the talker draws the same
    numbers. It used to go on from where the thinker left the one global generator."""
    draws: list[torch.Tensor] = []

    def talk(model, arguments, max_codes, on_codes, stop, until=None) -> CodeStream:
        draws.append(torch.rand(4))  # what the talker's sampling would draw
        return CodeStream(Codec.of(model.config), on_codes)  # no codes: a silent answer

    own = speaking_engine.speaker
    speaking_engine.speaker = Speaker(own.model, own.tokenizer, own.stop_ids, talker=talk)
    try:
        for temperature in (0.0, 1.0):
            request = GenerationRequest("Say hello.", None, max_new_tokens=8, return_audio=True, seed=4)
            speaking_engine.generate(dataclasses.replace(request, temperature=temperature))
    finally:
        speaking_engine.speaker = own
    assert len(draws) == 2 and torch.equal(draws[0], draws[1])


# ---------------------------------------------------------------- out of memory while speaking


class OutOfMemoryIn:
    """A forward hook that raises torch.OutOfMemoryError at each call of its module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.handle = module.register_forward_hook(self)

    def __call__(self, *_args) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("where", ["talker", "token2wav", "thinker"])
def test_out_of_memory_while_speaking_names_the_speech_settings_first(speaking_engine, where):
    """The advice named the pixel budgets only, whatever ran out; the talker and token2wav are bounded by
    MAX_SPEECH_SECONDS and SPEECH_CHUNK_BLOCKS."""
    model = speaking_engine.model
    module = {
        "talker": model.talker,
        "token2wav": model.token2wav.code2wav_dit_model,
        "thinker": model.thinker.model.language_model.layers[0],
    }[where]
    fault = OutOfMemoryIn(module)
    try:
        with pytest.raises(OutOfMemory) as raised:
            speaking_engine.generate(GenerationRequest("Say hello.", None, max_new_tokens=8, return_audio=True, seed=1))
    finally:
        fault.handle.remove()
    message = str(raised.value)
    assert "IMAGE_MAX_PIXELS" in message
    if where == "thinker":
        assert "SPEECH_CHUNK_BLOCKS" not in message and "while speaking" not in message
    else:
        assert "while speaking" in message
        assert message.index("SPEECH_CHUNK_BLOCKS (now 3") < message.index("IMAGE_MAX_PIXELS")
        assert message.index("MAX_SPEECH_SECONDS (now 2") < message.index("IMAGE_MAX_PIXELS")
    assert speaking_engine.generate(GenerationRequest("Say hello.", None, max_new_tokens=8, return_audio=True, seed=1))
