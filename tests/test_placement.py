"""Low-VRAM placement: the planner on the real 3B architecture, and every preset on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, input_counts, tiny_settings, upload
from fastapi.testclient import TestClient
from modeling_low_vram import OmniEngine, load_config, resolve_placement
from multimodal_api import create_app
from placement import (
    COMPONENTS,
    GPU,
    GiB,
    SPLIT,
    build_skeleton,
    component_sizes,
    headroom_bytes,
    module_device_map,
    plan_placement,
)

CONFIG_3B = ROOT.parent / "shared" / "model-configs" / "qwen2.5-omni-3b.config.json"
needs_3b_config = pytest.mark.skipif(not CONFIG_3B.exists(), reason=f"{CONFIG_3B} is absent")


@pytest.fixture(scope="module")
def config_3b():
    return load_config(str(CONFIG_3B))


@needs_3b_config
def test_3b_component_sizes_match_the_released_model(config_3b):
    sizes = component_sizes(build_skeleton(config_3b), torch.float16)
    params = {name: round(size.params / 1e9, 2) for name, size in sizes.items()}
    assert params == {
        "language_model": 3.09,
        "lm_head": 0.31,
        "visual": 0.67,
        "audio_tower": 0.64,
        "talker": 0.38,
        "token2wav": 0.45,
    }
    assert sizes["token2wav"].bytes == sizes["token2wav"].params * 4  # always float32


@needs_3b_config
@pytest.mark.parametrize("gib", [4, 6, 8, 12, 24])
@pytest.mark.parametrize("audio_output", [False, True])
def test_3b_plans_are_sane(config_3b, gib, audio_output):
    plan = plan_placement(config_3b, gib * GiB, torch.float16, audio_output=audio_output)
    on_gpu = {c for c, d in plan.placement.items() if d == GPU}
    if plan.fits:
        assert plan.predicted_gpu_bytes <= gib * GiB  # nothing placed on a GPU it does not fit
    # The language model is the last thing moved off: if anything else is on the GPU, all of it is.
    if on_gpu - {"lm_head"}:
        assert plan.placement["language_model"] == GPU
    # Encoders go first: an encoder on the GPU means everything but the other encoder is there too.
    if {"visual", "audio_tower"} & on_gpu:
        assert plan.placement["language_model"] == GPU
        assert not audio_output or {"talker", "token2wav"} <= on_gpu
    if plan.placement["visual"] == GPU:
        assert plan.placement["audio_tower"] == GPU or audio_output  # audio_tower leaves before visual
    # Room for every component that is on the GPU, its headroom included.
    weights = sum(plan.components[c].bytes for c in on_gpu)
    if plan.language_model_layers is None:
        assert plan.predicted_gpu_bytes == weights + plan.headroom_bytes


@needs_3b_config
def test_3b_fits_8_gib_with_the_encoders_on_cpu(config_3b):
    plan = plan_placement(config_3b, 8 * GiB, torch.float16)
    assert plan.fits and plan.placement == {
        "language_model": GPU,
        "lm_head": GPU,
        "visual": "cpu",
        "audio_tower": "cpu",
    }


@needs_3b_config
@pytest.mark.parametrize("gib", [4, 6])
def test_3b_below_the_language_models_size_splits_it_by_layers(config_3b, gib):
    plan = plan_placement(config_3b, gib * GiB, torch.float16)
    assert plan.placement["language_model"] == SPLIT and plan.fits
    layers = plan.language_model_layers
    assert layers["gpu"] + layers["cpu"] == 36 and 0 < layers["gpu"] < 36
    assert "decoder layers on the GPU" in plan.table()
    assert plan_placement(config_3b, 2 * GiB, torch.float16).fits is False


@needs_3b_config
def test_plan_command_prints_json(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "modeling_low_vram.py"),
            "plan",
            "--model",
            str(CONFIG_3B),
            "--gpu-gib",
            "8",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    plan = json.loads(result.stdout)
    assert plan["fits"] is True and plan["placement"]["visual"] == "cpu"
    assert plan["components"]["language_model"]["params"] == 3085938688
    assert 7 * GiB < plan["predicted_gpu_bytes"] < 8 * GiB


def test_headroom_grows_with_the_context(tiny_model_dir):
    config = load_config(str(tiny_model_dir))
    placement = {"language_model": GPU, "visual": "cpu"}
    assert headroom_bytes(config, 16384, torch.float16, placement) > headroom_bytes(
        config, 8192, torch.float16, placement
    )


# ---------------------------------------------------------------- presets on the tiny model, cpu standing in


def wait_until_ready(client, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while client.get("/health").json()["status"] == "loading" and time.monotonic() < deadline:
        time.sleep(0.05)


def ask_everything(client, media_dir):
    files = [
        ("images", upload(media_dir / "image.png")),
        ("audios", upload(media_dir / "audio.wav")),
        ("videos", upload(media_dir / "video.mp4")),
    ]
    response = client.post("/multimodal", data={"text": "Describe.", "max_new_tokens": "4"}, files=files)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("device_map", ["gpu", "low-vram", "cpu", "auto", '{"visual": "cpu", "lm_head": "gpu"}'])
def test_every_preset_loads_and_serves(tiny_model_dir, media_dir, device_map):
    settings = tiny_settings(tiny_model_dir, device_map=device_map, gpu_device="cpu", gpu_memory_gib=4)
    with TestClient(create_app(settings)) as client:
        wait_until_ready(client)
        health = client.get("/health").json()
        assert health["status"] == "ok", health
        assert set(health["placement"]) == {"language_model", "lm_head", "visual", "audio_tower"}
        assert health["memory"]["rss_bytes"] > 0
        assert input_counts(ask_everything(client, media_dir)) == {"images": 1, "audios": 1, "videos": 1}


def test_auto_splits_the_language_model_when_only_part_fits(tiny_model_dir, media_dir):
    config = load_config(str(tiny_model_dir))
    skeleton = build_skeleton(config)
    sizes = component_sizes(skeleton, torch.float16)
    layer = sum(p.numel() for p in skeleton.thinker.model.language_model.layers[0].parameters()) * 2
    needed = (
        sizes["language_model"].bytes
        + sizes["lm_head"].bytes
        + headroom_bytes(config, 8192, torch.float16, {"language_model": GPU})
    )
    settings = tiny_settings(
        tiny_model_dir, device_map="auto", gpu_device="cpu", gpu_memory_gib=(needed - layer // 2) / GiB
    )
    placement = resolve_placement(settings, config, cuda_available=False)
    assert placement.components["language_model"] == SPLIT and placement.gpu_layers == 1
    device_map = module_device_map(skeleton, placement.components, placement.gpu_layers, "cuda")
    assert device_map["thinker.model.language_model.layers.0"] == "cuda"
    assert device_map["thinker.model.language_model.layers.1"] == "cpu"
    assert device_map["thinker.model.language_model.embed_tokens"] == "cuda"
    engine = OmniEngine.load(settings)  # the same split, with the cpu standing in for the GPU
    assert engine.describe()["language_model_gpu_layers"] == 1
    with TestClient(create_app(settings, engine=engine)) as client:
        assert ask_everything(client, media_dir)["usage"]["completion_tokens"] >= 1


def test_device_map_resolves_against_the_real_module_tree(tiny_model_dir):
    skeleton = build_skeleton(load_config(str(tiny_model_dir)))
    device_map = module_device_map(skeleton, dict.fromkeys(COMPONENTS, "cpu"))
    assert device_map == {
        "thinker.model.language_model": "cpu",
        "thinker.lm_head": "cpu",
        "thinker.model.visual": "cpu",
        "thinker.model.audio_tower": "cpu",
        "talker": "cpu",
        "token2wav": "cpu",
    }


@pytest.mark.parametrize("enabled", [False, True])
def test_talker_is_loaded_only_with_speech_output(tiny_model_dir, enabled):
    engine = OmniEngine.load(tiny_settings(tiny_model_dir, enable_audio_output=enabled))
    assert hasattr(engine.model, "talker") is enabled and hasattr(engine.model, "token2wav") is enabled
    assert ("talker" in engine.describe()["placement"]) is enabled
