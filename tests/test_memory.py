"""Memory at run time, on the tiny model: last-position logits, weights resident before ready, a
warm-up through every component, encoders that compute on the CPU, DTYPE=auto on the CPU, and a
request that runs out of memory answered with a 503 while the next one is served."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from accelerate import cpu_offload
from conftest import tiny_settings
from fastapi.testclient import TestClient

from qwen_omni_server.core.types import GenerationRequest
from qwen_omni_server.local import devices
from qwen_omni_server.local.devices import cpu_dtype
from qwen_omni_server.local.engine import OmniEngine
from qwen_omni_server.local.loading import load_config
from qwen_omni_server.local.placement import GiB
from qwen_omni_server.local.residency import keep_last_logits, run_on_cpu, warm_up
from qwen_omni_server.server import create_app


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> OmniEngine:
    return OmniEngine.load(tiny_settings(tiny_model_dir))


def logits_shapes(engine: OmniEngine, request: GenerationRequest) -> tuple[list[int], list[tuple]]:
    shapes = []
    handle = engine.model.thinker.lm_head.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    try:
        ids = engine.generate(request).completion_ids
    finally:
        handle.remove()
    return ids, shapes


def test_prefill_computes_the_logits_of_the_last_position_only(engine):
    request = GenerationRequest(text="Tell me about the sea and the sky.", system_prompt=None, max_new_tokens=6)
    ids, shapes = logits_shapes(engine, request)
    lm_head = engine.model.thinker.lm_head
    hooks = dict(lm_head._forward_pre_hooks)
    lm_head._forward_pre_hooks.clear()  # the thinker as transformers ships it
    try:
        reference_ids, reference_shapes = logits_shapes(engine, request)
    finally:
        lm_head._forward_pre_hooks.update(hooks)
    assert ids == reference_ids and len(ids) == 6  # the same greedy tokens
    prompt = reference_shapes[0][1]
    assert prompt > 20 and shapes[0] == (1, 1, reference_shapes[0][2])  # [1, prompt, vocab] became [1, 1, vocab]
    assert all(shape[1] == 1 for shape in shapes[1:])
    # The prefill's largest tensor shrank by the prompt's length.
    assert prompt * shapes[0][2] == reference_shapes[0][1] * reference_shapes[0][2]


def test_keep_last_logits_leaves_single_positions_alone():
    head = torch.nn.Linear(4, 3)
    keep_last_logits(head)
    assert head(torch.ones(1, 5, 4)).shape == (1, 1, 3)
    assert head(torch.ones(1, 1, 4)).shape == (1, 1, 3)


def checkpoint_mappings() -> list[tuple[int, int]]:
    """Address ranges of the process's memory-mapped checkpoint files."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].endswith(".safetensors"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def test_weights_are_resident_and_warmed_up_before_ready(tiny_model_dir):
    engine = OmniEngine.load(tiny_settings(tiny_model_dir))
    mapped = checkpoint_mappings()
    in_file = [n for n, p in engine.model.named_parameters() if any(a <= p.data_ptr() < b for a, b in mapped)]
    assert not in_file, f"{len(in_file)} weights still read from the checkpoint file, e.g. {in_file[:3]}"
    startup = engine.describe()["startup"]
    assert startup["load_seconds"] > 0 and startup["warmup_seconds"] > 0 and startup["resident_bytes"] > 10**6
    with TestClient(create_app(tiny_settings(tiny_model_dir), engine=engine)) as client:
        about = client.get("/").json()
    assert about["model"]["startup"]["warmup_seconds"] == startup["warmup_seconds"]


def test_warm_up_runs_every_loaded_component(engine):
    thinker = engine.model.thinker
    modules = {
        "visual": thinker.model.visual,
        "audio_tower": thinker.model.audio_tower,
        "language_model": thinker.model.language_model,
        "lm_head": thinker.lm_head,
    }
    calls = dict.fromkeys(modules, 0)
    handles = [
        module.register_forward_hook(lambda *_a, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, module in modules.items()
    ]
    try:
        assert warm_up(engine) > 0
    finally:
        for handle in handles:
            handle.remove()
    assert all(calls.values()), calls


def test_an_offloaded_encoder_can_be_made_to_compute_on_the_cpu(engine):
    """accelerate's offload hooks keep weights off the module (meta) and stream them in at each call;
    run_on_cpu brings them back and computes where they are, with the same result."""
    visual = engine.model.thinker.model.visual
    pixels = torch.randn(16, 1176)
    grid = torch.tensor([[1, 4, 4]])
    with torch.inference_mode():
        expected = visual(pixels, grid_thw=grid).pooler_output
        cpu_offload(visual, execution_device="cpu")
        try:
            assert visual.blocks[0].mlp.gate_proj.weight.device.type == "meta"
            run_on_cpu(visual)
            assert all(p.device.type == "cpu" for p in visual.parameters())
            assert not hasattr(visual.blocks[0].mlp.gate_proj, "_hf_hook")
            assert torch.equal(visual(pixels, grid_thw=grid).pooler_output, expected)
        finally:
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(visual, recurse=True)


# Seconds of the 3B thinker's MLP product for a decoding step and a 64-token prefill, 1 thread: measured on
# a CPU with AVX512-BF16, and bfloat16 4x slower than float32 as on an AVX2-only CPU.
BF16_FASTER = {torch.float32: (0.0036, 0.0295), torch.bfloat16: (0.0022, 0.0069)}
FP32_FASTER = {torch.float32: (0.0036, 0.0295), torch.bfloat16: (0.0144, 0.118)}


class Paces:
    """Hands `cpu_dtype` the given paces instead of measuring them, and remembers which dtypes it asked for."""

    def __init__(self, seconds: dict[torch.dtype, tuple[float, float]]) -> None:
        self.seconds, self.asked = seconds, []

    def __call__(self, dtype: torch.dtype) -> devices.MatmulPace:
        self.asked.append(dtype)
        return devices.MatmulPace(*self.seconds[dtype])


@pytest.fixture(scope="module")
def config_3b():
    from conftest import ROOT

    return load_config(str(ROOT / "configs" / "qwen2.5-omni-3b.config.json"))


def test_dtype_auto_on_the_cpu_takes_bfloat16_where_it_is_faster(tiny_model_dir, config_3b):
    settings = tiny_settings(tiny_model_dir, dtype="auto")
    dtype, why = cpu_dtype(settings, config_3b, available_bytes=64 * GiB, pace=Paces(BF16_FASTER))  # both fit
    assert dtype == torch.bfloat16, why
    assert "x0.42 the time" in why and "float32: 3.6 ms a decoding step, 29.5 ms a 64-token prefill" in why
    assert "bfloat16: 2.2 ms a decoding step" in why and "GiB of RAM" in why and "64.0 GiB is free" in why


def test_dtype_auto_on_the_cpu_takes_float32_where_it_is_faster_and_fits(tiny_model_dir, config_3b):
    settings = tiny_settings(tiny_model_dir, dtype="auto")
    dtype, why = cpu_dtype(settings, config_3b, available_bytes=64 * GiB, pace=Paces(FP32_FASTER))
    assert dtype == torch.float32 and "x4.00 the time" in why, why
    dtype, why = cpu_dtype(settings, load_config(str(tiny_model_dir)), available_bytes=4 * GiB)  # measured here
    assert dtype == torch.float32 and "a model this small" in why, why  # fast in either: the exact one


def test_dtype_auto_on_the_cpu_takes_bfloat16_where_only_it_fits(tiny_model_dir, config_3b):
    settings = tiny_settings(tiny_model_dir, dtype="auto")
    paces = Paces(FP32_FASTER)
    dtype, why = cpu_dtype(settings, config_3b, available_bytes=16 * GiB, pace=paces)  # float32 needs about 21.5 GiB
    assert dtype == torch.bfloat16 and why.startswith("only bfloat16 fits") and not paces.asked


def test_the_cpu_pace_is_measured_on_the_thinkers_shapes(config_3b):
    assert devices.thinker_widths(config_3b) == (2048, 11008)
    pace = devices.measure_matmul_pace(torch.bfloat16, 64, 96, tokens=8, seconds=0.01)
    assert 0 < pace.decode_s and 0 < pace.prefill_s and pace.prefill_tokens == 8


# ---------------------------------------------------------------- out of memory, injected into a real generation


class OutOfMemoryAt:
    """A forward hook on a decoder layer that raises torch.OutOfMemoryError at its n-th call, once,
    and keeps a weak reference to the hidden states it saw (to show they are freed afterwards)."""

    def __init__(self, layer: torch.nn.Module, call: int) -> None:
        self.call, self.calls, self.seen = call, 0, None
        self.handle = layer.register_forward_hook(self)

    def __call__(self, _module, inputs, _output):
        self.calls += 1
        if self.calls == self.call:
            self.seen = weakref.ref(inputs[0])
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.fixture
def failing_client(tiny_model_dir, engine):
    layer = engine.model.thinker.model.language_model.layers[1]
    with TestClient(create_app(tiny_settings(tiny_model_dir), engine=engine)) as client:
        faults = []

        def fail_at(call: int) -> OutOfMemoryAt:
            faults.append(OutOfMemoryAt(layer, call))
            return faults[-1]

        yield client, fail_at
        for fault in faults:
            fault.handle.remove()


def assert_freed(fault: OutOfMemoryAt) -> None:
    gc.collect()
    assert fault.calls >= fault.call and fault.seen is not None and fault.seen() is None


def test_out_of_memory_is_a_503_on_multimodal_and_the_next_request_is_served(failing_client):
    client, fail_at = failing_client
    fault = fail_at(3)  # the prefill passes, decoding runs out
    response = client.post("/multimodal", data={"text": "Describe the sea.", "max_new_tokens": "6"})
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "10"
    detail = response.json()["detail"]
    for setting in ("IMAGE_MAX_PIXELS", "VIDEO_TOTAL_PIXELS", "MAX_CONTEXT_TOKENS", "DEVICE_MAP=low-vram"):
        assert setting in detail
    assert_freed(fault)
    fault.handle.remove()
    again = client.post("/multimodal", data={"text": "Describe the sea.", "max_new_tokens": "6"})
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] >= 1


def test_out_of_memory_is_a_503_on_the_openai_api_too(failing_client):
    client, fail_at = failing_client
    body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "Describe the sea."}]}
    fault = fail_at(1)  # the prefill itself runs out
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 503 and response.headers["Retry-After"] == "10"
    error = response.json()["error"]
    assert "IMAGE_MAX_PIXELS" in error["message"] and error["type"] == "server_error"
    assert_freed(fault)
    fault.handle.remove()
    fault = fail_at(2)
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    streamed = json.loads(events[-2])["error"]
    assert streamed["code"] == "out_of_memory" and "MAX_CONTEXT_TOKENS" in streamed["message"]
    fault.handle.remove()
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_cpu_budgets_left_at_their_defaults_are_lowered_to_finish_in_time(tiny_model_dir, engine):
    from qwen_omni_server.local.devices import cpu_budgets

    hurried = tiny_settings(tiny_model_dir, request_timeout_seconds=1e-4, video_total_pixels=4096 * 784)
    updates, said = cpu_budgets(hurried, engine.model, torch.float32)
    assert "IMAGE_MAX_PIXELS=1003520 costs about" in said and "GFLOP/s" in said
    assert 784 <= updates["image_max_pixels"] < hurried.image_max_pixels  # a default: lowered
    assert "video_total_pixels" not in updates and "VIDEO_TOTAL_PIXELS" in said  # set by the user: kept, advised
    relaxed = tiny_settings(tiny_model_dir)
    assert cpu_budgets(relaxed, engine.model, torch.float32)[0] == {}  # the tiny model finishes in time


def test_offloaded_weights_are_made_resident_too():
    """Weights behind accelerate's offload hooks are copied as well, each once (tied ones stay tied)."""
    from qwen_omni_server.local.residency import make_resident

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    model[1].weight = model[0].weight  # tied
    expected = model(torch.ones(1, 8))
    cpu_offload(model, execution_device="cpu")
    store = model[0]._hf_hook.weights_map.dataset
    before = {key: tensor.data_ptr() for key, tensor in store.items()}
    assert make_resident(model) > 0
    assert all(store[key].data_ptr() != pointer for key, pointer in before.items())
    assert store["0.weight"].data_ptr() == store["1.weight"].data_ptr()
    with torch.inference_mode():
        assert torch.equal(model(torch.ones(1, 8)), expected)
