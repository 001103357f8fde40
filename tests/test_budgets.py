"""Token budgets: pixel settings reach the processor, prompts are counted by modality and fitted to the context."""

from __future__ import annotations

import make_media
import pytest
import torch
from conftest import tiny_settings, upload
from fastapi.testclient import TestClient

from qwen_omni_server.core.settings import Settings
from qwen_omni_server.local.devices import largest_visual_patches
from qwen_omni_server.local.engine import OmniEngine
from qwen_omni_server.local.loading import load_config
from qwen_omni_server.local.placement import GPU, headroom_bytes
from qwen_omni_server.server import create_app


@pytest.fixture
def client_with(tiny_model_dir):
    clients = []

    def build(**overrides) -> TestClient:
        settings = tiny_settings(tiny_model_dir, **overrides)
        client = TestClient(create_app(settings, engine=OmniEngine.load(settings))).__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def big_photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "photo.jpg"
    path.write_bytes(make_media.image_bytes("JPEG", (1600, 1200)))
    return path


def usage(client, files, data=None):
    response = client.post("/multimodal", data={"max_new_tokens": "2", **(data or {})}, files=files)
    assert response.status_code == 200, response.text
    return response.json()["usage"]


def test_image_budget_sets_the_image_token_count(client_with, big_photo):
    small = usage(client_with(image_max_pixels=64 * 28 * 28), [("images", upload(big_photo))])
    large = usage(client_with(image_max_pixels=256 * 28 * 28), [("images", upload(big_photo))])
    assert 48 <= small["prompt_tokens_by_modality"]["image"] <= 64
    assert 192 <= large["prompt_tokens_by_modality"]["image"] <= 256


def test_video_budget_sets_the_video_token_count(client_with, tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(make_media.video_bytes(2.0, size=(640, 480), audio=False))
    few = usage(client_with(video_total_pixels=64 * 28 * 28, video_min_pixels=4 * 28 * 28), [("videos", upload(clip))])
    many = usage(
        client_with(video_total_pixels=512 * 28 * 28, video_min_pixels=4 * 28 * 28), [("videos", upload(clip))]
    )
    assert few["prompt_tokens_by_modality"]["video"] < many["prompt_tokens_by_modality"]["video"]
    assert many["prompt_tokens_by_modality"]["video"] <= 512


def test_usage_counts_every_modality_and_a_videos_audio_as_audio(tiny_client, media_dir):
    counts = usage(
        tiny_client,
        [("images", upload(media_dir / "image.png")), ("videos", upload(media_dir / "video.mp4"))],
        {"text": "Describe."},
    )
    by_modality = counts["prompt_tokens_by_modality"]
    assert set(by_modality) == {"text", "image", "audio", "video"}
    assert by_modality["image"] > 0 and by_modality["video"] > 0 and by_modality["audio"] > 0
    assert sum(by_modality.values()) == counts["prompt_tokens"]


def test_request_may_ask_for_fewer_or_more_pixels_up_to_the_ceiling(client_with, big_photo):
    client = client_with(image_max_pixels=128 * 28 * 28, max_pixels_ceiling=512 * 28 * 28)
    default = usage(client, [("images", upload(big_photo))])["prompt_tokens_by_modality"]["image"]
    fewer = usage(client, [("images", upload(big_photo))], {"max_pixels": str(32 * 28 * 28)})
    more = usage(client, [("images", upload(big_photo))], {"max_pixels": str(512 * 28 * 28)})
    assert fewer["prompt_tokens_by_modality"]["image"] <= 32 < default < more["prompt_tokens_by_modality"]["image"]
    response = client.post(
        "/multimodal", data={"max_pixels": str(1024 * 28 * 28)}, files=[("images", upload(big_photo))]
    )
    assert response.status_code == 422 and "MAX_PIXELS_CEILING" in response.json()["detail"]


def test_prompt_over_the_context_is_refused_with_counts_and_advice(client_with, big_photo):
    client = client_with(max_context_tokens=256)
    response = client.post("/multimodal", data={"text": "What is this?"}, files=[("images", upload(big_photo))])
    assert response.status_code == 413
    detail = response.json()["detail"]
    assert "MAX_CONTEXT_TOKENS=256" in detail and "image " in detail and "text " in detail
    assert "max_pixels" in detail  # which field would make it fit


def test_answer_bound_is_shortened_to_fit_the_context(client_with):
    client = client_with(max_context_tokens=256)
    response = client.post("/multimodal", data={"text": "hi", "max_new_tokens": "2000"})
    body = response.json()
    assert response.status_code == 200 and any("max_new_tokens lowered" in w for w in body["warnings"])
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] <= 256


def test_planner_headroom_follows_the_pixel_budgets(tiny_model_dir):
    config = load_config(str(tiny_model_dir))
    placement = {"language_model": GPU, "visual": GPU}
    tight = largest_visual_patches(
        Settings(
            _env_file=None,
            image_max_pixels=64 * 784,
            max_pixels_ceiling=64 * 784,
            video_total_pixels=64 * 784,
            max_files_per_field=1,
        )
    )
    roomy = largest_visual_patches(Settings(_env_file=None))
    assert tight == 2 * 64 * 4
    assert headroom_bytes(config, 8192, torch.float16, placement, tight) < headroom_bytes(
        config, 8192, torch.float16, placement, roomy
    )
