"""The model sees what the official pipeline would give it.

For each case the server's own path (the HTTP route, media decoding, `prompts.PromptBuilder`) is
compared with the reference, built as the model's authors do: qwen-omni-utils `process_mm_info`,
the processor's chat template and `processor(...)` with the same `use_audio_in_video`. There is no
ffmpeg binary here, so the reference gets the media the way it would hold them after reading a
file: the decoded PIL frames and 16 kHz numpy audio (a WAV path goes through its own librosa
reader, and is compared too). Compared: identical input_ids; equal image/video grids and
video_second_per_grid; equal audio feature lengths; pixel values and audio features allclose
(after the server's padding of features to the clip is trimmed); the same greedy tokens.
"""

from __future__ import annotations

import base64
import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

import av
import make_media
import numpy as np
import pytest
import torch
from conftest import CORPUS, tiny_settings
from fastapi.testclient import TestClient
from PIL import Image
from qwen_omni_utils import process_mm_info

from qwen_omni_server.core import media
from qwen_omni_server.core.types import GenerationRequest, GenerationResult, VideoInput
from qwen_omni_server.server import create_app

PHONE_VFR = CORPUS / "video" / "mp4_h264_aac_phone_rot180_vfr__fire2.mp4"
NEW_TOKENS = 8


class Recorder:
    """The tiny engine, recording each request the routes built and its result."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.calls: list[tuple[GenerationRequest, GenerationResult]] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        result = self.engine.generate(request)
        self.calls.append((request, result))
        return result


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_engine):
    recorder = Recorder(tiny_engine)
    settings = tiny_settings(tiny_model_dir, default_max_new_tokens=NEW_TOKENS)
    with TestClient(create_app(settings, engine=recorder)) as client:
        yield client, recorder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("parity")
    made = {
        "photo.png": make_media.image_bytes("PNG", (96, 64)),
        "wide.jpg": make_media.image_bytes("JPEG", (640, 200)),
        "mono16k.wav": make_media.audio_bytes("wav", 1.5, rate=16_000, channels=1),
        "stereo44k.wav": make_media.audio_bytes("wav", 1.5, rate=44_100, channels=2),
        "sounding.mp4": make_media.video_bytes(2.0, fps=10, audio=True),
        "silent.mp4": make_media.video_bytes(2.0, fps=10, audio=False),
        "one_fps.mp4": make_media.video_bytes(8.0, fps=1, audio=True),
    }
    for name, data in made.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in made}


# ---------------------------------------------------------------- the reference


@dataclass
class Case:
    request: GenerationRequest  # what the route handed the engine
    result: GenerationResult
    conversation: list[dict]  # the reference's conversation, media in qwen-omni-utils' form
    use_audio_in_video: bool = False
    fps: float | None = None  # the rate the reference reports for its videos (qwen-omni-utils: the real one)


def reference_inputs(processor, case: Case) -> dict:
    """The official pipeline: process_mm_info, the chat template, processor(...)."""
    audios, images, videos = process_mm_info(case.conversation, use_audio_in_video=False)
    audios = list(audios or [])
    if case.use_audio_in_video:  # the tracks qwen-omni-utils would read with ffmpeg, in conversation order
        plain, audios, owners, index = iter(audios), [], [], 0
        for message in case.conversation:
            for part in message["content"] if isinstance(message["content"], list) else []:
                if part["type"] == "audio":
                    audios.append(next(plain))
                    owners.append(None)
                elif part["type"] == "video":
                    audios.append(part["track"])
                    owners.append(index)
                    index += 1
    text = processor.apply_chat_template(case.conversation, add_generation_prompt=True, tokenize=False)
    kwargs = {}
    if videos:
        kwargs.update(fps=case.fps, do_sample_frames=False)  # process_mm_info's video kwargs (one rate)
    if case.use_audio_in_video:
        kwargs.update(use_audio_in_video=True, audio_from_video_indices=owners)
    return processor(
        text=text, images=images, videos=videos, audio=audios or None, return_tensors="pt", padding=True, **kwargs
    )


def image_part(image, settings) -> dict:
    return {
        "type": "image",
        "image": image,
        "min_pixels": settings.image_min_pixels,
        "max_pixels": settings.image_max_pixels,
    }


def video_part(video: VideoInput, settings, fps: float) -> dict:
    part = {
        "type": "video",
        "video": video.frames,
        "sample_fps": fps,
        "min_pixels": settings.video_min_pixels,
        "max_pixels": settings.video_max_pixels,
        "total_pixels": settings.video_total_pixels,
    }
    if video.audio is not None:
        part["track"] = video.audio
    return part


def assert_parity(engine, case: Case) -> dict:
    """The server's prompt equals the reference's; returns the server's processor inputs."""
    server = engine.prompts.build(case.request)
    reference = reference_inputs(engine.processor, case)
    ours = server.inputs
    assert ours["input_ids"].tolist() == reference["input_ids"].tolist()
    assert server.use_audio_in_video == case.use_audio_in_video
    for key in ("image_grid_thw", "video_grid_thw", "video_second_per_grid"):
        assert (key in ours) == (key in reference), key
        if key in ours:
            assert torch.equal(torch.as_tensor(ours[key]), torch.as_tensor(reference[key])), key
    for key in ("pixel_values", "pixel_values_videos"):
        assert (key in ours) == (key in reference), key
        if key in ours:
            assert ours[key].shape == reference[key].shape, key
            assert torch.allclose(ours[key], reference[key], atol=1e-5), key
    assert ("input_features" in ours) == ("input_features" in reference)
    if "input_features" in ours:
        lengths = ours["feature_attention_mask"].sum(-1)
        assert lengths.tolist() == reference["feature_attention_mask"].sum(-1).tolist()
        for row, length in enumerate(lengths.tolist()):  # the reference pads every clip to 300 s
            assert torch.allclose(
                ours["input_features"][row, :, :length], reference["input_features"][row, :, :length], atol=1e-5
            ), f"audio {row}"
    with torch.inference_mode():
        tokenizer = engine.processor.tokenizer
        sequences = engine.model.thinker.generate(
            **reference,
            use_audio_in_video=case.use_audio_in_video,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")],
            pad_token_id=tokenizer.pad_token_id,
        )
    assert sequences[0, reference["input_ids"].shape[1] :].tolist() == case.result.completion_ids
    return ours


def ask(server, data: dict | None = None, files: list | None = None) -> tuple[GenerationRequest, GenerationResult]:
    client, recorder = server
    response = client.post("/multimodal", data={"max_new_tokens": str(NEW_TOKENS), **(data or {})}, files=files)
    assert response.status_code == 200, response.text
    return recorder.calls[-1]


def upload(path: Path, field: str) -> tuple[str, tuple[str, bytes]]:
    return (field, (path.name, path.read_bytes()))


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


# ---------------------------------------------------------------- cases


def test_text(server, tiny_engine):
    request, result = ask(server, {"text": "What is the capital of France?"})
    assert_parity(tiny_engine, Case(request, result, [user(text("What is the capital of France?"))]))


def test_system_prompt(server, tiny_engine):
    request, result = ask(server, {"text": "Who are you?", "system_prompt": "You are a pirate."})
    conversation = [{"role": "system", "content": [text("You are a pirate.")]}, user(text("Who are you?"))]
    assert_parity(tiny_engine, Case(request, result, conversation))


def test_one_image(server, tiny_engine, files):
    request, result = ask(server, {"text": "Describe."}, [upload(files["photo.png"], "images")])
    settings = tiny_engine.settings
    conversation = [user(image_part(request.images[0], settings), text("Describe."))]
    assert_parity(tiny_engine, Case(request, result, conversation))


def test_two_images_of_different_sizes(server, tiny_engine, files):
    uploads = [upload(files["photo.png"], "images"), upload(files["wide.jpg"], "images")]
    request, result = ask(server, {"text": "Compare."}, uploads)
    settings = tiny_engine.settings
    conversation = [user(*(image_part(image, settings) for image in request.images), text("Compare."))]
    inputs = assert_parity(tiny_engine, Case(request, result, conversation))
    assert inputs["image_grid_thw"][0].tolist() != inputs["image_grid_thw"][1].tolist()


@pytest.mark.parametrize("name", ["mono16k.wav", "stereo44k.wav"])
def test_audio(server, tiny_engine, files, name):
    request, result = ask(server, {"text": "What do you hear?"}, [upload(files[name], "audios")])
    conversation = [user({"type": "audio", "audio": request.audios[0]}, text("What do you hear?"))]
    assert_parity(tiny_engine, Case(request, result, conversation))
    # qwen-omni-utils reads a WAV path itself (librosa: soundfile, then soxr to 16 kHz, channels averaged).
    (theirs,), _, _ = process_mm_info([user({"type": "audio", "audio": str(files[name])})], use_audio_in_video=False)
    ours = request.audios[0]
    assert abs(len(ours) - len(theirs)) <= 1
    n = min(len(ours), len(theirs))
    if name == "mono16k.wav":  # no resampling: the same samples
        assert np.allclose(ours[:n], theirs[:n], atol=1e-6)
    else:  # two resamplers (libswresample, soxr): the same sound, within 0.5 % of its peak past the edges
        difference, peak = np.abs(ours[:n] - theirs[:n]), np.abs(theirs).max()
        assert difference[64:-64].max() < 0.005 * peak and difference.max() < 0.02 * peak


def test_video_with_its_own_audio(server, tiny_engine, files):
    request, result = ask(server, {"text": "What happens?"}, [upload(files["sounding.mp4"], "videos")])
    video = request.videos[0]
    assert video.fps == pytest.approx(2.0) and video.audio is not None  # 10 fps source sampled at 2 fps
    conversation = [user(video_part(video, tiny_engine.settings, 2.0), text("What happens?"))]
    assert_parity(tiny_engine, Case(request, result, conversation, use_audio_in_video=True, fps=2.0))
    assert result.inputs["videos"][0]["audio_interleaved"] is True


def test_silent_video(server, tiny_engine, files):
    request, result = ask(server, {"text": "What happens?"}, [upload(files["silent.mp4"], "videos")])
    video = request.videos[0]
    assert video.audio is None
    conversation = [user(video_part(video, tiny_engine.settings, 2.0), text("What happens?"))]
    assert_parity(tiny_engine, Case(request, result, conversation, fps=2.0))
    assert result.inputs["videos"][0]["audio_interleaved"] is False


def test_one_fps_source_keeps_its_real_rate(server, tiny_engine, files):
    """Sampled "at 2 fps", a 1 fps source keeps frames 1 s apart: the model must be told 1 fps, or its
    time positions and the interleaving of its audio (25 positions per second) are squeezed 2x."""
    request, result = ask(server, {"text": "What happens?"}, [upload(files["one_fps.mp4"], "videos")])
    video = request.videos[0]
    assert len(video.frames) == 8 and video.fps == pytest.approx(1.0)
    conversation = [user(video_part(video, tiny_engine.settings, 1.0), text("What happens?"))]
    inputs = assert_parity(tiny_engine, Case(request, result, conversation, use_audio_in_video=True, fps=1.0))
    assert inputs["video_second_per_grid"].tolist() == [2.0]
    assert result.inputs["videos"][0] | {"tokens": 0} == {
        "frames": 8,
        "fps": 1.0,
        "seconds": 8.0,
        "tokens": 0,
        "audio_interleaved": True,
        "audio_seconds": pytest.approx(8.0, abs=0.1),
        "audio_tokens": result.inputs["videos"][0]["audio_tokens"],
    }


def frame_times(path: Path) -> list[float]:
    """Every frame's timestamp in the file, from the first frame (read here with PyAV, independently)."""
    with av.open(str(path)) as container:
        times = sorted(frame.time for frame in container.decode(container.streams.video[0]))
    return [t - times[0] for t in times]


@pytest.mark.skipif(not PHONE_VFR.exists(), reason="the shared media corpus is not beside the repository")
def test_variable_frame_rate_phone_video(server, tiny_engine):
    """A phone video with variable frame rate: the rate given is the real one between the kept frames."""
    request, result = ask(server, {"text": "What happens?"}, [upload(PHONE_VFR, "videos")])
    settings = tiny_engine.settings
    decoded = media.load_video(
        str(PHONE_VFR),
        fps=settings.video_fps,
        max_frames=settings.video_max_frames,
        max_seconds=settings.max_video_seconds,
        frame_max_pixels=settings.video_max_pixels,
    )
    every_frame = frame_times(PHONE_VFR)
    assert all(min(abs(t - s) for s in every_frame) < 1e-6 for t in decoded.frame_times)  # real frames' times
    kept = decoded.frame_times
    real = (len(kept) - 1) / (kept[-1] - kept[0])
    assert request.videos[0].fps == pytest.approx(real) and len(request.videos[0].frames) == len(kept)
    assert real != pytest.approx(settings.video_fps, abs=1e-3)  # the frames fall where the source has them
    conversation = [user(video_part(request.videos[0], settings, real), text("What happens?"))]
    assert_parity(tiny_engine, Case(request, result, conversation, use_audio_in_video=True, fps=real))


@pytest.mark.parametrize(
    "flags",
    [
        {"extract_video_frame": "true"},
        {"extract_video_audio": "true"},
        {"extract_video_frame": "true", "extract_video_audio": "true"},
    ],
)
def test_extract_flags(server, tiny_engine, files, flags):
    request, result = ask(server, {"text": "What happens?", **flags}, [upload(files["sounding.mp4"], "videos")])
    assert not request.videos
    parts = [image_part(image, tiny_engine.settings) for image in request.images]
    parts += [{"type": "audio", "audio": samples} for samples in request.audios]
    assert len(parts) == len(flags)
    assert_parity(tiny_engine, Case(request, result, [user(*parts, text("What happens?"))]))


def test_multi_turn_chat_with_media_in_an_earlier_turn(server, tiny_engine, files):
    client, recorder = server
    picture = "data:image/png;base64," + base64.b64encode(files["photo.png"].read_bytes()).decode()
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": picture}}, {"type": "text", "text": "What is it?"}],
        },
        {"role": "assistant", "content": "A gradient."},
        {"role": "user", "content": "Which colours?"},
    ]
    response = client.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0}
    )
    assert response.status_code == 200, response.text
    request, result = recorder.calls[-1]
    image = request.turns[1].parts[0]
    conversation = [
        {"role": "system", "content": [text("Answer briefly.")]},
        user(image_part(image, tiny_engine.settings), text("What is it?")),
        {"role": "assistant", "content": [text("A gradient.")]},
        user(text("Which colours?")),
    ]
    assert_parity(tiny_engine, Case(request, result, conversation))


def test_reference_fed_a_wrong_rate_would_differ(tiny_engine, files):
    """The comparison can fail: telling the processor 2 fps for the 1 fps source changes the prompt."""
    decoded = media.load_video(
        str(files["one_fps.mp4"]), fps=2.0, max_frames=64, max_seconds=60, frame_max_pixels=768 * 28 * 28
    )
    video = VideoInput(decoded.frames, decoded.fps, decoded.audio.samples)
    request = GenerationRequest("What happens?", None, videos=[video])
    conversation = [user(video_part(video, tiny_engine.settings, 2.0), text("What happens?"))]
    server = tiny_engine.prompts.build(request)
    squeezed = reference_inputs(tiny_engine.processor, Case(request, None, conversation, True, fps=2.0))
    assert server.inputs["input_ids"].tolist() != squeezed["input_ids"].tolist()


def test_json_answer_says_what_each_file_became(server, files):
    """`inputs`: images after resizing, audio seconds, video frames, their real rate and seconds; tokens of each."""
    client, recorder = server
    uploads = [
        upload(files["wide.jpg"], "images"),
        upload(files["stereo44k.wav"], "audios"),
        upload(files["one_fps.mp4"], "videos"),
    ]
    response = client.post("/multimodal", data={"text": "Describe.", "max_new_tokens": "2"}, files=uploads)
    assert response.status_code == 200, response.text
    body = response.json()
    (image,), (audio,), (video,) = body["inputs"]["images"], body["inputs"]["audios"], body["inputs"]["videos"]
    assert (image["width"], image["height"]) == (644, 196)  # 640x200 resized to multiples of 28
    assert image["tokens"] == 644 * 196 // 28**2
    assert audio == {"seconds": 1.5, "tokens": 37}  # 150 feature frames, halved twice by the audio tower
    assert video["frames"] == 8 and video["fps"] == 1.0 and video["seconds"] == 8.0
    assert video["audio_interleaved"] is True and video["audio_seconds"] == pytest.approx(8.0, abs=0.1)
    by_modality = body["usage"]["prompt_tokens_by_modality"]
    assert by_modality["image"] == image["tokens"] and by_modality["video"] == video["tokens"]
    assert by_modality["audio"] == audio["tokens"] + video["audio_tokens"]


# ---------------------------------------------------------------- deviations on purpose (README table)


def test_long_video_is_sampled_at_a_halved_rate_within_its_frame_budget(tiny_engine, tmp_path):
    """Over VIDEO_MAX_FRAMES at VIDEO_FPS, the rate halves (frames keep their size); the model is told the
    halved rate, the frames stay within the budget, and the prompt equals the reference at that rate."""
    path = tmp_path / "long.mp4"
    path.write_bytes(make_media.video_bytes(10.0, fps=10, audio=True))
    decoded = media.load_video(str(path), fps=2.0, max_frames=8, max_seconds=60, frame_max_pixels=768 * 28 * 28)
    assert len(decoded.frames) <= 8 and decoded.fps == pytest.approx(0.5)  # 20 frames at 2 fps, halved twice
    video = VideoInput(decoded.frames, decoded.fps, decoded.audio.samples)
    request = GenerationRequest("What happens?", None, videos=[video])
    result = tiny_engine.generate(dataclasses.replace(request, max_new_tokens=NEW_TOKENS))
    conversation = [user(video_part(video, tiny_engine.settings, 0.5), text("What happens?"))]
    inputs = assert_parity(tiny_engine, Case(request, result, conversation, use_audio_in_video=True, fps=0.5))
    assert result.prompt_tokens_by_modality["video"] <= tiny_engine.settings.video_total_pixels // 28**2
    assert inputs["video_second_per_grid"].tolist() == [4.0]


def test_image_budget_is_about_one_megapixel_not_the_official_twelve(tiny_engine):
    """IMAGE_MAX_PIXELS (1280 tokens of 28x28, ~1 MP) instead of qwen-omni-utils' default 16384 tokens."""
    from qwen_omni_utils.v2_5.vision_process import fetch_image

    photo = Image.new("RGB", (2000, 1500), (200, 100, 50))
    prompt = tiny_engine.prompts.build(GenerationRequest("Describe.", None, images=[photo]))
    budget = tiny_engine.settings.image_max_pixels // 28**2
    assert budget == 1280 and budget - 60 <= prompt.by_modality["image"] <= budget
    official = fetch_image({"image": photo})  # the official default budget
    assert official.width * official.height // 28**2 > 2.9 * budget  # the 3 MP photo kept whole: 3834 tokens


def test_videos_in_one_request_share_the_slowest_real_rate():
    """The processor takes one rate: a 2 fps video next to a 1 fps one keeps every other frame; rates that
    cannot be matched by keeping every k-th frame are said in a warning, not silently mistimed."""
    from qwen_omni_server.local.prompts import common_rate

    frames = [Image.new("RGB", (56, 56))] * 8
    matched, warnings = common_rate([VideoInput(frames, 2.0), VideoInput(frames, 1.0)])
    assert [(len(v.frames), v.fps) for v in matched] == [(4, 1.0), (8, 1.0)] and warnings == []
    matched, warnings = common_rate([VideoInput(frames, 1.5), VideoInput(frames, 1.0)])
    assert [len(v.frames) for v in matched] == [4, 8] and "video 1 at 0.75 fps" in warnings[0]  # 1.5 fps / 2


# ---------------------------------------------------------------- the fixes (each test fails on the code before)


def test_video_rate_is_the_real_one_between_the_kept_frames(files):
    """Item 1: a 1 fps source sampled "at 2 fps" keeps frames 1 s apart and says 1 fps."""
    decoded = media.load_video(
        str(files["one_fps.mp4"]), fps=2.0, max_frames=64, max_seconds=60, frame_max_pixels=768 * 28 * 28
    )
    assert len(decoded.frames) == 8 and decoded.fps == pytest.approx(1.0)


def checkpoint_copy(tiny_model_dir: Path, folder: Path, **changes) -> Path:
    """The tiny checkpoint with some of its JSON files changed ({file name: {key: value}})."""
    import json
    import shutil

    shutil.copytree(tiny_model_dir, folder)
    for name, values in changes.items():
        path = folder / f"{name}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))
    return folder


class AlwaysSays(torch.nn.Module):
    """An lm_head whose greedy choice is always one token."""

    def __init__(self, token: int, vocab: int) -> None:
        super().__init__()
        self.token, self.vocab = token, vocab

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*hidden.shape[:-1], self.vocab, dtype=hidden.dtype)
        logits[..., self.token] = 1.0
        return logits


def test_im_end_ends_the_answer_whatever_the_tokenizer_calls_eos(tiny_model_dir, tmp_path):
    """Item 3: a checkpoint whose tokenizer names <|endoftext|> as eos still stops at <|im_end|>."""
    from qwen_omni_server.local.engine import OmniEngine

    folder = checkpoint_copy(tiny_model_dir, tmp_path / "eos", tokenizer_config={"eos_token": "<|endoftext|>"})
    engine = OmniEngine.load(tiny_settings(folder))
    tokenizer = engine.processor.tokenizer
    assert tokenizer.eos_token == "<|endoftext|>"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    engine.model.thinker.lm_head = AlwaysSays(im_end, engine.model.thinker.lm_head.out_features)
    result = engine.generate(GenerationRequest("Hello", None, max_new_tokens=6))
    assert result.completion_ids == [im_end] and result.finish_reason == "stop" and result.text == ""


def test_v1_samples_with_the_checkpoints_generation_config_when_the_client_sends_none(tiny_model_dir, tmp_path):
    """Item 4: with top_k=1 in the checkpoint's generation_config, an unset top_k samples from one token:
    every seed gives the greedy answer (at temperature 1 over the whole vocabulary they would differ)."""
    from qwen_omni_server.local.engine import OmniEngine

    sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 1}
    folder = checkpoint_copy(tiny_model_dir, tmp_path / "sampling", generation_config=sampling)
    engine = OmniEngine.load(tiny_settings(folder))
    with TestClient(create_app(engine.settings, engine=engine)) as client:
        messages = [{"role": "user", "content": "Say something long."}]

        def answer(**options) -> str:
            response = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 12, **options})
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]["content"]

        greedy = answer(temperature=0)
        assert [answer(seed=seed) for seed in (1, 2, 3)] == [greedy] * 3
        assert answer(seed=1, top_k=0) != greedy  # a client's own value still wins
        about = client.get("/").json()["decoding"]
        assert about["checkpoint_sampling"] == {"temperature": 0.7, "top_p": 0.8, "top_k": 1}


def test_multimodal_accepts_temperature_top_p_and_seed(server):
    client, _ = server

    def answer(**fields) -> str:
        response = client.post("/multimodal", data={"text": "Say something.", "max_new_tokens": "12", **fields})
        assert response.status_code == 200, response.text
        return response.json()["text"]

    greedy = answer()
    assert answer() == greedy  # greedy unless asked
    sampled = answer(temperature="1.0", top_p="1.0", seed="5")
    assert answer(temperature="1.0", top_p="1.0", seed="5") == sampled != greedy


def test_very_short_audio_is_scaled_like_any_other(tmp_path):
    """Item 5: a 5-sample PCM_16 WAV at 44.1 kHz is too short to resample; its samples are still in [-1, 1]."""
    path = tmp_path / "five.wav"
    path.write_bytes(wav(np.full(5, 0.1, np.float32), 44_100))
    samples = media.load_audio(str(path), max_seconds=10).samples
    assert samples.size == 2 and np.allclose(samples, 0.1, atol=1e-3)


def wav(samples: np.ndarray, rate: int) -> bytes:
    import soundfile

    out = io.BytesIO()
    soundfile.write(out, samples, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


# ---------------------------------------------------------------- batched (MAX_BATCH_SIZE > 1)


def test_every_case_batched_with_others_answers_as_alone(server, tiny_model_dir):
    """Every request the cases above sent (the reference's tokens, checked alone), sent again all at once to
    an engine batching four rows: each row meets others of other lengths and media, joining as rows leave.
    The same greedy tokens; where one differs, its two best logits alone were a near-tie (within 1e-4)."""
    import threading

    from qwen_omni_server.local.engine import OmniEngine

    _, recorder = server
    calls = [(dataclasses.replace(r, stop=None, on_text=None), result) for r, result in recorder.calls]
    assert len(calls) >= 10, "run with the cases above"
    engine = OmniEngine.load(tiny_settings(tiny_model_dir, max_batch_size=4))
    answers: list[GenerationResult | None] = [None] * len(calls)

    def run(index: int) -> None:
        answers[index] = engine.generate(calls[index][0])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert engine.batcher is not None and max(engine.batcher.snapshot()["steps_by_rows"]) == 4
    for (request, alone), batched in zip(calls, answers):
        assert batched is not None and batched.prompt_tokens == alone.prompt_tokens
        if batched.completion_ids != alone.completion_ids:
            assert_near_tie(engine, request, alone.completion_ids, batched.completion_ids)


def assert_near_tie(engine, request: GenerationRequest, alone: list[int], batched: list[int]) -> None:
    """At the first token where the two answers part, the alone run's two best logits were within 1e-4."""
    at = next(i for i, (a, b) in enumerate(zip(alone, batched)) if a != b)
    prompt = engine.prompts.build(request)
    with torch.inference_mode():
        output = engine.model.thinker.generate(
            **prompt.inputs,
            max_new_tokens=at + 1,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            use_audio_in_video=prompt.use_audio_in_video,
        )
    best, second = output.logits[at][0].float().topk(2).values.tolist()
    assert best - second <= 1e-4, f"token {at} differs, not a near-tie ({best} vs {second})"
