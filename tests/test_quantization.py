"""QUANTIZATION=int8/nf4 (bitsandbytes, on the CPU) and pre-quantized GPTQ checkpoints, on the tiny model
through the server; the planner's bytes for quantized language models against the loaded ones."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from conftest import ROOT, tiny_settings, upload
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file
from servers import run_until_exit, start_server

from qwen_omni_server.core.types import GenerationRequest
from qwen_omni_server.local import quantization
from qwen_omni_server.local.engine import OmniEngine
from qwen_omni_server.local.loading import load_config
from qwen_omni_server.local.placement import (
    COMPONENT_PATHS,
    GiB,
    build_skeleton,
    component_sizes,
    find_component,
    plan_placement,
)
from qwen_omni_server.server import create_app

SCHEMES = ("int8", "nf4")
CONFIGS = ROOT / "configs"  # the 3B and derived 7B architectures


@pytest.fixture(scope="module")
def engines(tiny_model_dir) -> dict[str, OmniEngine]:
    """The tiny model loaded plain, in int8 and in nf4 (with speech, so the talker and token2wav load too)."""
    return {
        scheme: OmniEngine.load(
            tiny_settings(tiny_model_dir, quantization=scheme, enable_audio_output=True, max_speech_seconds=1)
        )
        for scheme in ("none", *SCHEMES)
    }


@pytest.fixture(scope="module")
def clients(engines):
    with TestClient(create_app(engines["int8"].settings, engine=engines["int8"])) as int8:
        with TestClient(create_app(engines["nf4"].settings, engine=engines["nf4"])) as nf4:
            yield {"int8": int8, "nf4": nf4}


def ask(client, data=None, files=None) -> dict:
    response = client.post("/multimodal", data={"max_new_tokens": "4", **(data or {})}, files=files or [])
    assert response.status_code == 200, response.text
    return response.json()


def language_model(engine: OmniEngine) -> torch.nn.Module:
    return engine.model.get_submodule(find_component(engine.model, "language_model"))


# ---------------------------------------------------------------- loading and answering


@pytest.mark.parametrize("scheme", SCHEMES)
def test_decoder_layers_are_quantized_and_the_rest_keeps_its_dtype(engines, scheme):
    model = engines[scheme].model
    layer = language_model(engines[scheme]).layers[0]
    expected = {"int8": "Linear8bitLt", "nf4": "Linear4bit"}[scheme]
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert type(layer.get_submodule(name)).__name__ == expected, name
    assert layer.self_attn.q_proj.weight.dtype == {"int8": torch.int8, "nf4": torch.uint8}[scheme]
    # Every component in the documented list keeps DTYPE (float32 here; token2wav is float32 anyway).
    for component in quantization.KEPT_IN_DTYPE:
        module = model.get_submodule(find_component(model, component))
        dtypes = {p.dtype for p in module.parameters()}
        assert dtypes == {torch.float32}, (component, dtypes)
        assert not any("bitsandbytes" in type(m).__module__ for m in module.modules()), component
    kept = language_model(engines[scheme])
    assert kept.embed_tokens.weight.dtype == kept.norm.weight.dtype == torch.float32


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(
    ("field", "name", "data"),
    [
        (None, None, {"text": "Hello, who are you?"}),
        ("images", "image.png", {"text": "What is this?"}),
        ("audios", "audio.wav", {}),
        ("videos", "video.mp4", {"text": "What happens?"}),
    ],
)
def test_every_modality_answers(clients, engines, media_dir, scheme, field, name, data):
    files = [(field, upload(media_dir / name))] if field else []
    body = ask(clients[scheme], data, files)
    assert body["text"] is not None and 1 <= body["usage"]["completion_tokens"] <= 4
    # The same prompt reached the quantized model as the plain one: quantization touches weights only.
    with TestClient(create_app(engines["none"].settings, engine=engines["none"])) as plain:
        reference = ask(plain, data, files)
    assert body["usage"]["prompt_tokens_by_modality"] == reference["usage"]["prompt_tokens_by_modality"]
    if field:
        assert body["usage"]["prompt_tokens_by_modality"][field[:-1]] > 0


def test_nf4_answers_aloud(clients):
    # A seed: unseeded, the random tiny talker may end before it makes a sound (then there is no audio).
    body = ask(clients["nf4"], {"text": "Say hi.", "return_audio": "true", "seed": "1"})
    assert body["audio"]["format"] == "wav" and body["audio"]["seconds"] > 0


@pytest.mark.parametrize("scheme", SCHEMES)
def test_root_and_health_say_what_is_quantized(clients, scheme):
    about = clients[scheme].get("/").json()["model"]["quantization"]
    assert about["scheme"] == scheme
    assert about["quantized"] == "language_model: 14 linear layers of its decoder layers"  # 2 layers x 7
    assert set(about["kept_in_dtype"]) >= set(quantization.KEPT_IN_DTYPE)
    health = clients[scheme].get("/health").json()
    assert health["quantization"] == about


def test_unquantized_engine_says_none(engines):
    assert engines["none"].describe()["quantization"] == {"scheme": "none"}


# ---------------------------------------------------------------- bytes: planner against the loaded model


def independent_weight_bytes(module: torch.nn.Module) -> int:
    """Parameters, plus bitsandbytes' quantization state (4-bit absmax/code/offset, nested; int8 scales)."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    for layer in module.modules():
        weight = getattr(layer, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            assert state.nested  # double quant, as loaded
            extra = [state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
            total += sum(t.numel() * t.element_size() for t in extra)
        # int8: the row scales sit on the weight until the first product, then on the layer's state.
        scales = getattr(weight, "SCB", None)
        scales = scales if scales is not None else getattr(getattr(layer, "state", None), "SCB", None)
        if scales is not None:
            total += scales.numel() * scales.element_size()
    return total


def load_directly(model_dir: Path, scheme: str) -> torch.nn.Module:
    """The tiny model as bitsandbytes quantizes it at load, with the server's config, before any product:
    the engine's warm-up runs one, and on a CPU with AVX512-BF16 bitsandbytes then repacks 4-bit weights
    for its CPU kernel (absmax un-nested, in bf16). The planner sizes the layout as loaded (the GPU's)."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    kept = quantization.kept_module_paths(COMPONENT_PATHS)
    return Qwen2_5OmniForConditionalGeneration.from_pretrained(
        str(model_dir),
        dtype=torch.float32,
        device_map="cpu",
        quantization_config=quantization.bitsandbytes_config(scheme, torch.float32, kept, ["cpu"]),
    ).eval()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_language_model_bytes_drop_as_the_planner_predicts(engines, tiny_model_dir, scheme):
    skeleton = build_skeleton(load_config(str(tiny_model_dir)))
    predicted = component_sizes(skeleton, torch.float32, scheme)["language_model"].bytes
    plain = component_sizes(skeleton, torch.float32)["language_model"].bytes
    model = load_directly(tiny_model_dir, scheme)
    loaded = independent_weight_bytes(model.get_submodule(find_component(model, "language_model")))
    assert independent_weight_bytes(language_model(engines["none"])) == plain
    assert loaded == predicted == quantization.loaded_weight_bytes(model.thinker.model.language_model)
    assert engines[scheme].describe()["quantization"]["language_model_bytes"] == loaded  # measured before warm-up
    assert loaded < 0.5 * plain  # the tiny model's embeddings (kept in DTYPE) are 27% of it


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantizing_a_built_model_in_place_matches_loading_quantized(engines, tiny_model_dir, scheme):
    """What a GPU check with random real-size weights uses (no checkpoint to load through bitsandbytes):
    the same layers, bytes and logits as QUANTIZATION at load."""
    built = OmniEngine.load(tiny_settings(tiny_model_dir))
    path = find_component(built.model, "language_model")
    assert quantization.quantize_in_place(built.model, scheme, torch.float32, path) == 14
    loaded = load_directly(tiny_model_dir, scheme)
    assert quantization.loaded_weight_bytes(language_model(built)) == quantization.loaded_weight_bytes(
        loaded.thinker.model.language_model
    )
    ids = torch.randint(0, 390, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = engines[scheme].model.thinker(input_ids=ids).logits
        assert torch.equal(built.model.thinker(input_ids=ids).logits, expected)
    assert {p.dtype for p in built.model.thinker.model.visual.parameters()} == {torch.float32}


def test_decoder_layer_bytes_per_weight_at_real_shapes():
    """At 7B shapes (3584 x 18944) the formulas give what bitsandbytes stores: 4.13 bits a weight for
    nf4 with double quant, 8 bits plus a row scale for int8."""
    weights = 3584 * 18944
    nf4 = quantization.linear_weight_bytes(3584, 18944, "nf4", torch.bfloat16)
    int8 = quantization.linear_weight_bytes(3584, 18944, "int8", torch.bfloat16)
    assert 4.12 < nf4 * 8 / weights < 4.14
    assert int8 == weights + 3584 * 4
    assert quantization.linear_weight_bytes(3584, 18944, "none", torch.bfloat16) == 2 * weights


@pytest.mark.parametrize(
    ("config", "budget_gib", "context"),
    [("qwen2.5-omni-7b.derived.config.json", 8, 8192), ("qwen2.5-omni-3b.config.json", 4, 8192)],
)
def test_goals_fit_with_nf4_where_they_do_not_without(config, budget_gib, context):
    """7B in 8 GiB and 3B in 4 GiB with nf4, for the default 8192-token context and the image and audio
    budgets: the whole language model on the GPU. Without quantization neither fits whole."""
    model_config = load_config(str(CONFIGS / config))
    plan = plan_placement(model_config, budget_gib * GiB, torch.float16, context_tokens=context, quantization="nf4")
    assert plan.fits and plan.placement["language_model"] == "gpu" and plan.placement["lm_head"] == "gpu"
    assert plan.quantization == "nf4" and "language model nf4" in plan.table()
    plain = plan_placement(load_config(str(CONFIGS / config)), budget_gib * GiB, torch.float16, context_tokens=context)
    assert plain.placement["language_model"] == "split"


def test_a_split_keeps_more_quantized_layers_on_the_gpu():
    config = CONFIGS / "qwen2.5-omni-7b.derived.config.json"
    layers = {}
    for scheme in ("none", "int8", "nf4"):
        plan = plan_placement(load_config(str(config)), 6 * GiB, torch.float16, quantization=scheme)
        layers[scheme] = plan.language_model_layers["gpu"] if plan.language_model_layers else 28
    assert layers["none"] < layers["int8"] < layers["nf4"]


def test_plan_command_takes_the_quantization():
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "modeling_low_vram.py"),
            "plan",
            "--model",
            str(CONFIGS / "qwen2.5-omni-7b.derived.config.json"),
            "--quantization",
            "nf4",
            "--gpu-gib",
            "8",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["quantization"] == "nf4" and plan["fits"]
    assert plan["components"]["language_model"]["bytes"] < 4.5 * GiB  # 7.07 B parameters, 2.1 GiB of them in DTYPE


# ---------------------------------------------------------------- close to the unquantized answers


@pytest.mark.parametrize(("scheme", "max_error", "min_agreement"), [("int8", 0.03, 0.85), ("nf4", 0.2, 0.7)])
def test_next_token_choices_stay_close(engines, scheme, max_error, min_agreement):
    """Teacher-forced over 40 positions of a fixed prompt: the next-token logits of the quantized model
    against the plain one's. The random tiny model's top two logits are often within 0.02 of each other
    (its logits' spread is about 0.16), so some greedy choices flip under any rounding; where the plain
    model's margin exceeds twice the largest logit deviation, the choice must be the same."""
    ids = torch.randint(0, 390, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # every position's logits (the engine's lm_head hook keeps the last one only)
        plain, quantized = (
            torch.nn.functional.linear(
                language_model(engine)(input_ids=ids).last_hidden_state[0], engine.model.thinker.lm_head.weight
            ).float()
            for engine in (engines["none"], engines[scheme])
        )
    error = ((quantized - plain).norm(dim=-1) / plain.norm(dim=-1)).mean()
    assert error < max_error
    agree = quantized.argmax(-1) == plain.argmax(-1)
    assert agree.float().mean() >= min_agreement
    top = plain.topk(2, dim=-1).values
    clear = (top[:, 0] - top[:, 1]) > 2 * (quantized - plain).abs().max(-1).values
    assert clear.any() and agree[clear].all()


def test_greedy_answers_through_the_engine_start_the_same(engines):
    request = GenerationRequest(text="Hello, who are you?", system_prompt=None, max_new_tokens=4)
    first = {scheme: engines[scheme].generate(request).completion_ids[0] for scheme in ("none", *SCHEMES)}
    assert first["int8"] == first["nf4"] == first["none"]


# ---------------------------------------------------------------- start-up checks


def test_bitsandbytes_config_skips_the_documented_modules():
    kept = quantization.kept_module_paths(COMPONENT_PATHS)
    config = quantization.bitsandbytes_config("nf4", torch.bfloat16, kept, ["cuda", "cuda"])
    assert set(config.llm_int8_skip_modules) >= {"thinker.model.visual", "thinker.model.audio_tower", "thinker.lm_head"}
    assert {"talker", "token2wav"} <= set(config.llm_int8_skip_modules)
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert not config.llm_int8_enable_fp32_cpu_offload
    # A map that leaves decoder layers on the CPU must say so, or transformers refuses to load.
    assert quantization.bitsandbytes_config(
        "int8", torch.float16, kept, ["cuda", "cpu"]
    ).llm_int8_enable_fp32_cpu_offload
    assert quantization.bitsandbytes_config("none", torch.float16, kept, ["cpu"]) is None


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 instruction sets")
@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_cpu_without_avx2_gets_a_clear_message(scheme):
    with pytest.raises(quantization.QuantizationError, match=f"QUANTIZATION={scheme} on the CPU needs AVX2"):
        quantization.check_bitsandbytes(scheme, "cpu", torch.float32, cpu_capability="DEFAULT")
    quantization.check_bitsandbytes(scheme, "cpu", torch.float32)  # this CPU can


def test_a_device_where_the_quantized_product_fails_is_refused_with_one_line():
    with pytest.raises(quantization.QuantizationError, match=r"^QUANTIZATION=nf4: bitsandbytes cannot run on meta"):
        quantization.check_bitsandbytes("nf4", "meta", torch.float32)


# ---------------------------------------------------------------- pre-quantized (GPTQ) checkpoints


GROUP = 32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ's GEMM format interleaves the 8 nibbles of an int32


def pack_nibbles(values: torch.Tensor, dim: int, order=tuple(range(8))) -> torch.Tensor:
    """Eight 4-bit values along `dim` into one int32, the k-th in bits 4k..4k+3 (taken in `order`)."""
    values = values.movedim(dim, -1)
    grouped = values.reshape(*values.shape[:-1], -1, 8)
    packed = torch.zeros(grouped.shape[:-1], dtype=torch.int32)
    for k, index in enumerate(order):
        packed |= grouped[..., index] << (4 * k)
    return packed.movedim(-1, dim).contiguous()


def write_quantized_checkpoint(source: Path, target: Path, reference: Path, method: str, **config_extra) -> None:
    """The tiny checkpoint with its decoder layers' linear weights in 4-bit `method` (gptq: format v1,
    symmetric; awq: GEMM, with zero points), groups of 32, as GPTQModel / AutoAWQ write them; `reference`
    gets the same weights dequantized, in the plain format, so that the two must answer alike. The keys
    keep the saved (transformers 4.x) layout."""
    shutil.copytree(source, target)
    shutil.copytree(source, reference)
    state = load_file(source / "model.safetensors")
    packed, dequantized = {}, dict(state)
    for key, weight in state.items():
        if not (key.startswith("thinker.model.layers.") and key.endswith("proj.weight")):
            packed[key] = weight
            continue
        base = key.removesuffix(".weight")
        rows, columns = weight.shape
        grouped = weight.float().reshape(rows, columns // GROUP, GROUP)
        if method == "gptq":
            scales = (grouped.abs().amax(-1).clamp(min=1e-8) / 7).half()
            zeros = torch.full(scales.shape, 8, dtype=torch.int32)
        else:
            low, high = grouped.amin(-1), grouped.amax(-1)
            scales = ((high - low).clamp(min=1e-8) / 15).half()
            zeros = torch.round(-low / scales.float()).clamp(0, 15).to(torch.int32)
        codes = (torch.round(grouped / scales.float()[..., None]) + zeros[..., None]).clamp(0, 15).to(torch.int32)
        dequantized[key] = ((codes - zeros[..., None]).float() * scales.float()[..., None]).reshape(rows, columns)
        by_input = codes.reshape(rows, columns).t()  # [in, out]
        if method == "gptq":
            packed |= {
                f"{base}.qweight": pack_nibbles(by_input, 0),
                f"{base}.qzeros": pack_nibbles(zeros.t() - 1, 1),  # v1 stores zero - 1
                f"{base}.scales": scales.t().contiguous(),
                f"{base}.g_idx": torch.arange(columns, dtype=torch.int32) // GROUP,
            }
        else:
            packed |= {
                f"{base}.qweight": pack_nibbles(by_input, 1, AWQ_ORDER),
                f"{base}.qzeros": pack_nibbles(zeros.t(), 1, AWQ_ORDER),
                f"{base}.scales": scales.t().contiguous(),
            }
    save_file(packed, target / "model.safetensors", metadata={"format": "pt"})
    save_file(dequantized, reference / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": GROUP, **config_extra}
    if method == "gptq":
        config["quantization_config"] |= {"desc_act": False, "sym": True, "checkpoint_format": "gptq"}
    else:
        config["quantization_config"] |= {"zero_point": True, "version": "gemm"}
    (target / "config.json").write_text(json.dumps(config, indent=2))


class Packed(torch.nn.Module):
    """Stands in for a GPTQ/AWQ layer: what check_loaded looks for is its packed `qweight`."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("qweight", torch.zeros(1, dtype=torch.int32))


def test_quantized_layers_under_other_names_are_refused_after_loading(tiny_model_dir):
    skeleton = build_skeleton(load_config(str(tiny_model_dir)))
    path = find_component(skeleton, "language_model")
    with pytest.raises(quantization.QuantizationError, match="^14 linear layers of the language model were not"):
        quantization.check_loaded(skeleton, "gptq", path)
    for layer in skeleton.get_submodule(path).layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(layer.self_attn, name, Packed())
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(layer.mlp, name, Packed())
    quantization.check_loaded(skeleton, "awq", path)  # the decoder layers only: as it should be
    skeleton.thinker.model.visual.blocks[0].mlp.up_proj = Packed()
    with pytest.raises(quantization.QuantizationError, match="quantizes thinker.model.visual.blocks.0.mlp.up_proj"):
        quantization.check_loaded(skeleton, "awq", path)
    quantization.check_loaded(skeleton, "nf4", path)  # QUANTIZATION's own layers are not checked


def start_quietly(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    return run_until_exit(tmp_path, 18437, **env)


@pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("gptqmodel", "optimum")),
    reason="pip install -r requirements-gptq.txt",
)
@pytest.mark.parametrize(
    ("method", "names"),
    [
        ("gptq", {}),
        ("gptq", {"block_name_to_quantize": "thinker.model.layers"}),
        ("awq", {}),
        ("awq", {"modules_to_not_convert": ["thinker.visual", "thinker.audio_tower", "talker", "token2wav"]}),
    ],
)
def test_a_prequantized_checkpoint_serves_its_own_weights(tiny_model_dir, tmp_path, method, names):
    """Through GPTQModel, as its own server process (GPTQModel changes process-wide settings on import).
    GPTQ: without a block name optimum finds no decoder layers; with the 4.x name it left them randomly
    initialised. AWQ: every linear layer not listed as kept (by any name) was converted, the encoders'
    too. The server names transformers 5's paths, and answers as the dequantized weights do."""
    checkpoint, reference = tmp_path / method, tmp_path / "reference"
    write_quantized_checkpoint(tiny_model_dir, checkpoint, reference, method, **names)
    question = {"text": "Hello, who are you?", "max_new_tokens": "8"}
    server, url = start_server(
        tmp_path, {"MODEL_PATH": str(checkpoint), "DEVICE_MAP": "cpu"}, timeout=180, stderr=subprocess.DEVNULL
    )
    try:
        about = httpx.get(f"{url}/", timeout=10).json()["model"]["quantization"]
        answer = httpx.post(f"{url}/multimodal", data=question, timeout=120).json()
    finally:
        server.terminate()
        server.wait(30)
    assert about["scheme"] == method and about["quantized"] == "language_model: 14 linear layers of its decoder layers"
    plain = OmniEngine.load(tiny_settings(reference))
    expected = plain.generate(GenerationRequest(text=question["text"], system_prompt=None, max_new_tokens=8))
    assert answer["text"] == expected.text and answer["usage"]["completion_tokens"] == expected.completion_tokens


def test_a_quantized_checkpoint_with_quantization_set_is_refused_at_start(tiny_model_dir, tmp_path):
    write_quantized_checkpoint(tiny_model_dir, tmp_path / "gptq", tmp_path / "reference", "gptq")
    result = start_quietly(tmp_path, MODEL_PATH=str(tmp_path / "gptq"), QUANTIZATION="nf4")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "MODEL_PATH is already quantized (gptq); set QUANTIZATION=none" in result.stderr
    assert "Started server" not in result.stderr


@pytest.mark.parametrize(("method", "bits"), [("fp8", 8), ("gptq", 8)])
def test_another_method_or_width_is_refused_at_start_with_one_line(tiny_model_dir, tmp_path, method, bits):
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": bits}
    (other / "config.json").write_text(json.dumps(config))
    result = start_quietly(tmp_path, MODEL_PATH=str(other))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    expected = (
        f"MODEL_PATH's checkpoint is quantized with {method.upper()} ({bits}-bit), which this server does not load"
    )
    assert expected in result.stderr


def test_a_gptq_checkpoint_without_gptqmodel_is_refused_with_what_to_install(tiny_model_dir):
    config = load_config(str(tiny_model_dir))
    config.quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    with pytest.raises(quantization.QuantizationError, match="no_such_module is not installed: pip install -r "):
        quantization.check_prequantized(config, "none", needs=("optimum", "no_such_module"))
