"""Low-VRAM placement: the planner on the real 3B and 7B architectures (meta device), and every preset
on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, input_counts, tiny_settings, upload
from fastapi.testclient import TestClient

from qwen_omni_server.core.settings import Settings
from qwen_omni_server.local.devices import planning_budgets, resolve_placement
from qwen_omni_server.local.engine import OmniEngine
from qwen_omni_server.local.loading import load_config
from qwen_omni_server.local.placement import (
    COMPONENTS,
    CPU,
    GPU,
    OFFLOAD,
    PRESETS,
    SPLIT,
    Budgets,
    GiB,
    activation_bytes,
    build_skeleton,
    component_sizes,
    headroom_bytes,
    module_device_map,
    plan_placement,
)
from qwen_omni_server.server import create_app

CONFIGS = {
    "3b": ROOT / "configs" / "qwen2.5-omni-3b.config.json",
    "7b": ROOT / "configs" / "qwen2.5-omni-7b.derived.config.json",
}
BUDGETS_GIB = [2, 4, 6, 8, 12, 24]


@pytest.fixture(scope="module")
def config_3b():
    return load_config(str(CONFIGS["3b"]))


@pytest.fixture(scope="module")
def skeletons():
    """The 3B and 7B architectures on the meta device, with and without the speech modules."""
    built = {}
    for name, path in CONFIGS.items():
        for speech in (False, True):
            config = load_config(str(path))
            config.enable_audio_output = speech
            built[name, speech] = (config, build_skeleton(config))
    return built


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


def default_budgets() -> dict:
    return planning_budgets(Settings(_env_file=None))


@pytest.mark.parametrize("model", ["3b", "7b"])
@pytest.mark.parametrize("speech", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_plan_never_says_fits_for_a_budget_it_exceeds(skeletons, model, speech, dtype):
    config, skeleton = skeletons[model, speech]
    for gib in BUDGETS_GIB:
        plan = plan_placement(config, gib * GiB, dtype, audio_output=speech, skeleton=skeleton, **default_budgets())
        resident = sum(cost.gpu_bytes for cost in plan.costs.values())
        assert plan.predicted_gpu_bytes == resident + plan.headroom_bytes
        assert plan.fits == (plan.predicted_gpu_bytes <= gib * GiB), plan.table()
        acts = plan.activations
        assert plan.headroom_bytes >= acts["kv_cache"] + acts["prefill"] + acts["talker_states"]
        for encoder, activation in (("visual", "vision"), ("audio_tower", "audio")):
            if plan.placement[encoder] != CPU:  # gpu or offload: it computes on the GPU
                assert plan.headroom_bytes >= acts[activation]
        # The language model is split only when nothing else can leave the GPU.
        if plan.placement["language_model"] == SPLIT:
            assert plan.placement["visual"] == plan.placement["audio_tower"] == CPU
            assert plan.moved_per_token >= plan.language_model_layers["cpu"] * (
                plan.costs["language_model"].host_bytes // max(1, plan.language_model_layers["cpu"])
            )
        verdict = next(line for line in plan.table().splitlines() if line.startswith("predicted peak"))
        assert verdict.endswith(": fits") == plan.fits


def test_3b_text_image_and_audio_fit_8_gib_with_the_whole_language_model_on_the_gpu(config_3b):
    """The goal: bf16, a 1 MP image and 30 s of audio (the defaults allow far more), text answer."""
    settings = Settings(_env_file=None)
    assert settings.image_max_pixels >= 1_000_000 and settings.max_audio_seconds >= 30
    plan = plan_placement(config_3b, 8 * GiB, torch.bfloat16, **default_budgets())
    assert plan.fits and plan.placement["language_model"] == GPU and plan.placement["lm_head"] == GPU
    assert plan.moved_per_token == 0 and not plan.language_model_layers
    # The encoders leave the GPU: the vision encoder on the largest image the defaults admit (32,768 patches)
    # needs 1.42 GiB, which the memory check tracks (scripts/memory_check.py); offloaded, its weights would
    # still cross PCIe for each request, and with them the plan is 0.05 GiB over 8 GiB: they run on the CPU.
    assert plan.placement["visual"] == plan.placement["audio_tower"] == CPU
    assert plan.activations["vision"] > 1.4 * GiB and plan.costs["visual"].host_bytes == plan.components["visual"].bytes


def test_offload_and_cpu_encoders_are_costed_honestly(config_3b):
    budgets = default_budgets()
    plans = {
        preset: plan_placement(config_3b, 24 * GiB, torch.bfloat16, placement=PRESETS[preset], **budgets)
        for preset in ("gpu", "low-vram", "low-vram-cpu")
    }
    on_gpu, offload, cpu = plans["gpu"], plans["low-vram"], plans["low-vram-cpu"]
    visual = on_gpu.components["visual"].bytes + on_gpu.components["audio_tower"].bytes
    # offload: the weights leave the GPU, but cross PCIe once per request; the activations stay on the GPU.
    assert offload.costs["visual"].gpu_bytes == 0 and offload.costs["visual"].host_bytes > 0
    assert offload.moved_per_request == visual and offload.moved_per_token == 0
    assert offload.headroom_bytes >= on_gpu.activations["vision"]
    assert on_gpu.predicted_gpu_bytes - visual < offload.predicted_gpu_bytes < on_gpu.predicted_gpu_bytes
    # cpu: nothing of the encoders on the GPU, nothing moved but embeddings; slow, and said so.
    assert cpu.moved_per_request == 0 and cpu.predicted_gpu_bytes < offload.predicted_gpu_bytes
    assert "CPU" in cpu.costs["visual"].slow and "visual" in cpu.table()
    assert cpu.host_bytes > offload.host_bytes  # the encoders' activations live on the host
    assert not on_gpu.slow and not offload.slow


def test_a_split_language_model_moves_its_offloaded_layers_every_token(config_3b):
    plan = plan_placement(config_3b, 4 * GiB, torch.bfloat16, **default_budgets())
    assert plan.fits and plan.placement["language_model"] == SPLIT
    layers = plan.language_model_layers
    assert layers["gpu"] + layers["cpu"] == 36 and 0 < layers["gpu"] < 36
    layer = build_skeleton(config_3b).thinker.model.language_model.layers[0]
    assert plan.moved_per_token == layers["cpu"] * sum(p.numel() for p in layer.parameters()) * 2
    assert "cross PCIe every token" in plan.table() and plan.slow
    assert plan_placement(config_3b, 1 * GiB, torch.bfloat16).fits is False


def test_activations_follow_the_budgets(config_3b):
    base = activation_bytes(config_3b, Budgets(8192, 4096, 30, 60), torch.bfloat16, audio_output=False)
    assert activation_bytes(config_3b, Budgets(8192, 4096, 300, 60), torch.bfloat16, False)["audio"] > base["audio"]
    assert activation_bytes(config_3b, Budgets(16384, 4096, 30, 60), torch.bfloat16, False)["kv_cache"] == (
        2 * base["kv_cache"]
    )
    assert activation_bytes(config_3b, Budgets(8192, 8192, 30, 60), torch.bfloat16, False)["vision"] > base["vision"]
    # Audio is bounded by what the context admits (25 tokens a second), not only by MAX_AUDIO_SECONDS.
    assert activation_bytes(config_3b, Budgets(2048, 4096, 300, 60), torch.bfloat16, False)["audio_seconds"] == 81
    speech = activation_bytes(config_3b, Budgets(8192, 4096, 30, 60), torch.bfloat16, audio_output=True)
    text = config_3b.thinker_config.text_config
    # The talker reads the prompt's first and last layer, then each token's as it comes (SPEECH_PIPELINE); after
    # the whole text, it read every layer's states of every token.
    assert speech["talker_states"] == 2 * 8192 * text.hidden_size * 2
    after_text = activation_bytes(config_3b, Budgets(8192, 4096, 30, 60, 3, False), torch.bfloat16, audio_output=True)
    assert after_text["talker_states"] == (text.num_hidden_layers + 1) * 8192 * text.hidden_size * 2
    assert speech["talker"] > 0 and speech["token2wav"] > 0
    # Logits for the last position only: the prefill holds far less than a [8192, vocab] tensor.
    assert base["prefill"] < 8192 * text.vocab_size * 2 / 3


def test_host_ram_of_a_cpu_plan(config_3b):
    plan = plan_placement(config_3b, 0, torch.float32, placement=PRESETS["cpu"], **default_budgets())
    weights = sum(size.bytes for size in plan.components.values())
    assert weights > 18 * 10**9  # the 3B thinker in float32, as the issue measured
    assert plan.host_bytes > weights and plan.predicted_gpu_bytes == 0
    half = plan_placement(config_3b, 0, torch.bfloat16, placement=PRESETS["cpu"], **default_budgets())
    assert half.host_bytes < plan.host_bytes * 0.6


@pytest.mark.parametrize("model", ["3b", "7b"])
def test_plan_command_needs_no_download(tmp_path, model):
    """`plan --model 3b` reads the configs the repository carries, from any folder."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "modeling_low_vram.py"), "plan", "--model", model, "--gpu-gib", "8", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    plan = json.loads(result.stdout)
    assert plan["fits"] is True and plan["host_bytes"] > 0
    expected = {"3b": 3085938688, "7b": 7070619136}[model]
    assert abs(plan["components"]["language_model"]["params"] - expected) < 10**7
    if model == "3b":
        assert plan["placement"]["visual"] == "cpu" and 7 * GiB < plan["predicted_gpu_bytes"] <= 8 * GiB
    text = subprocess.run(
        [sys.executable, str(ROOT / "modeling_low_vram.py"), "plan", "--model", model, "--gpu-gib", "8"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    ).stdout
    assert "host RAM needed" in text and "moved/token" in text


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


@pytest.mark.parametrize(
    "device_map", ["gpu", "low-vram", "low-vram-cpu", "cpu", "auto", '{"visual": "cpu", "lm_head": "gpu"}']
)
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


def test_cpu_beside_a_gpu_means_offload_except_for_the_encoders():
    """accelerate runs a `cpu` module of a GPU map on the GPU (offload hooks): only the encoders
    really compute on the CPU, so anything else on `cpu` is called what it is."""
    settings = Settings(_env_file=None, device_map='{"language_model": "cuda", "visual": "cpu"}')
    components = resolve_placement(settings, cuda_available=True).components
    assert components["language_model"] == "cuda" and components["visual"] == CPU
    assert components["lm_head"] == OFFLOAD and components["audio_tower"] == CPU
    assert resolve_placement(
        Settings(_env_file=None, device_map="cpu"), cuda_available=True
    ).components == dict.fromkeys(["language_model", "lm_head", "visual", "audio_tower"], CPU)
    low_vram_cpu = resolve_placement(Settings(_env_file=None, device_map="low-vram-cpu"), cuda_available=True)
    assert low_vram_cpu.components["visual"] == CPU and low_vram_cpu.components["language_model"] == "cuda"
