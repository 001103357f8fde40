"""Requests generated together (MAX_BATCH_SIZE > 1): each row answers as it would alone, and ends on its own."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch
from conftest import tiny_settings
from fastapi.testclient import TestClient
from PIL import Image

from qwen_omni_server.core.errors import OutOfMemory, QueueFull
from qwen_omni_server.core.settings import Settings
from qwen_omni_server.core.types import GenerationRequest, GenerationResult, VideoInput
from qwen_omni_server.core.worker import ModelWorker
from qwen_omni_server.local.engine import OmniEngine
from qwen_omni_server.server import create_app

ROWS = 4


@pytest.fixture(scope="module")
def batched(tiny_model_dir) -> OmniEngine:
    return OmniEngine.load(tiny_settings(tiny_model_dir, max_batch_size=ROWS))


def tone(seconds: float) -> np.ndarray:
    return (0.3 * np.sin(np.arange(int(16_000 * seconds)) / 7)).astype(np.float32)


def mixed_requests() -> list[GenerationRequest]:
    """Requests of other lengths and media: text, an image, audio, a video with its sound, a sampled one."""
    frames = [Image.new("RGB", (112, 84), (20 * i, 90, 160)) for i in range(4)]
    return [
        GenerationRequest("Tell me a story about a lighthouse keeper.", None, max_new_tokens=30),
        GenerationRequest(
            "What is in it?", None, images=[Image.new("RGB", (150, 90), (200, 30, 30))], max_new_tokens=12
        ),
        GenerationRequest("Hear this.", "Answer briefly.", audios=[tone(1.5)], max_new_tokens=20),
        GenerationRequest("And this?", None, videos=[VideoInput(frames, 2.0, audio=tone(2.0))], max_new_tokens=16),
        GenerationRequest("Pick a word.", None, max_new_tokens=10, temperature=0.9, top_p=0.9, seed=11),
        GenerationRequest("x " * 60, None, max_new_tokens=24),
    ]


def together(engine: OmniEngine, requests: list[GenerationRequest]) -> list[GenerationResult | BaseException]:
    """The requests sent at once, each from a thread of its own (as the server's worker does)."""
    results: list[GenerationResult | BaseException | None] = [None] * len(requests)

    def run(index: int) -> None:
        try:
            results[index] = engine.generate(requests[index])
        except BaseException as error:  # noqa: BLE001 - the test reads it
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results  # type: ignore[return-value]


def steps(engine: OmniEngine) -> dict[int, int]:
    assert engine.batcher is not None
    return dict(engine.batcher.snapshot()["steps_by_rows"])


def batched_steps(engine: OmniEngine, before: dict[int, int]) -> int:
    """Decoding steps with more than one row since `before`."""
    after = steps(engine)
    return sum(count - before.get(rows, 0) for rows, count in after.items() if rows > 1)


def same_answer(alone: GenerationResult, batched: GenerationResult) -> None:
    assert batched.completion_ids == alone.completion_ids
    assert (batched.text, batched.finish_reason) == (alone.text, alone.finish_reason)
    assert batched.prompt_tokens_by_modality == alone.prompt_tokens_by_modality


def test_rows_of_a_batch_answer_as_they_would_alone(tiny_engine, batched):
    requests = mixed_requests()
    alone = [tiny_engine.generate(r) for r in requests]
    before = steps(batched)
    hook = slow_steps(batched, 0.005)  # the first row still decodes when the last thread gets going
    try:
        results = together(batched, requests)
    finally:
        hook.remove()
    for one, many in zip(alone, results):
        assert isinstance(many, GenerationResult), many
        same_answer(one, many)
    assert max(steps(batched)) == ROWS  # they were decoded together, as many as a batch holds
    assert batched_steps(batched, before) > 10


def test_a_row_stopped_mid_answer_ends_and_the_others_go_on(tiny_engine, batched):
    """A client leaving or a timeout sets its request's stop: that row leaves at its next token."""
    requests = mixed_requests()[:3]
    stop = threading.Event()
    pieces: list[str] = []

    def on_text(text: str) -> None:
        pieces.append(text)
        if len(pieces) == 3:
            stop.set()

    requests[0] = dataclasses.replace(requests[0], stop=stop, on_text=on_text, max_new_tokens=200)
    alone = [tiny_engine.generate(dataclasses.replace(r, stop=None, on_text=None)) for r in requests]
    assert alone[0].completion_tokens == 200  # it would have gone on
    results = together(batched, requests)
    stopped = results[0]
    assert isinstance(stopped, GenerationResult)
    assert 3 <= stopped.completion_tokens < 20  # it ran, then stopped at once
    assert stopped.completion_ids == alone[0].completion_ids[: stopped.completion_tokens]
    for one, many in zip(alone[1:], results[1:]):
        same_answer(one, many)  # type: ignore[arg-type]


def test_stop_strings_and_streams_are_each_rows_own(tiny_engine, batched):
    requests = mixed_requests()[:4]
    alone = [tiny_engine.generate(r) for r in requests]
    cut = alone[0].text[len(alone[0].text) // 2 :][:3]
    streamed: dict[int, list[str]] = {i: [] for i in range(len(requests))}
    requests = [dataclasses.replace(r, on_text=streamed[i].append) for i, r in enumerate(requests)]
    requests[0] = dataclasses.replace(requests[0], stop_strings=[cut])
    with_stop = tiny_engine.generate(dataclasses.replace(requests[0], on_text=None))
    assert with_stop.text == alone[0].text[: alone[0].text.index(cut)] and with_stop.finish_reason == "stop"
    results = together(batched, requests)
    same_answer(with_stop, results[0])  # type: ignore[arg-type]
    for one, many in zip(alone[1:], results[1:]):
        same_answer(one, many)  # type: ignore[arg-type]
    for index, result in enumerate(results):
        assert "".join(streamed[index]) == result.text  # type: ignore[union-attr]


def test_out_of_memory_in_a_prefill_fails_that_request_only(tiny_engine, batched):
    requests = mixed_requests()[:3]  # the third brings audio
    alone = [tiny_engine.generate(r) for r in requests]

    def no_memory(_module, _args):
        raise torch.OutOfMemoryError("CUDA out of memory (a test)")

    hook = batched.model.thinker.model.audio_tower.register_forward_pre_hook(no_memory)
    try:
        results = together(batched, requests)
    finally:
        hook.remove()
    assert isinstance(results[2], OutOfMemory)
    for one, many in zip(alone[:2], results[:2]):
        same_answer(one, many)  # type: ignore[arg-type]


def test_out_of_memory_in_a_step_gives_up_the_longest_row_and_the_others_go_on(tiny_engine, batched):
    """The step failed after every layer's cache had grown: the cache is taken back to its length first."""
    requests = [mixed_requests()[i] for i in (0, 1, 5)]  # the last has the longest prompt
    alone = [tiny_engine.generate(r) for r in requests]
    failed = threading.Event()

    def no_memory_once(_module, args):
        if args[0].shape[0] == 3 and not failed.is_set():  # a step of the three rows
            failed.set()
            raise torch.OutOfMemoryError("CUDA out of memory (a test)")

    hook = batched.model.thinker.lm_head.register_forward_pre_hook(no_memory_once)
    try:
        results = together(batched, requests)
    finally:
        hook.remove()
    assert failed.is_set()
    assert isinstance(results[2], OutOfMemory)
    for one, many in zip(alone[:2], results[:2]):
        same_answer(one, many)  # type: ignore[arg-type]


def test_a_request_given_up_while_waiting_never_starts(batched):
    stop = threading.Event()
    stop.set()
    with pytest.raises(Exception, match="cancelled|given up"):
        batched.generate(GenerationRequest("Hello", None, stop=stop))


def test_the_worker_admits_the_rows_running_and_max_waiting_more():
    worker = ModelWorker(max_waiting=2, threads=ROWS)
    for _ in range(ROWS + 2):
        worker.reserve()
    with pytest.raises(QueueFull):
        worker.reserve()
    worker.shutdown()


# ---------------------------------------------------------------- through the API


def slow_steps(engine: OmniEngine, seconds: float):
    """Each thinker step takes `seconds` longer (a hook on lm_head)."""
    return engine.model.thinker.lm_head.register_forward_pre_hook(lambda _m, _a: time.sleep(seconds))


def test_both_apis_batch_streamed_and_not_and_answer_as_alone(tiny_model_dir, tiny_engine, batched):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    calls = [
        ("/v1/chat/completions", {"json": {"messages": messages, "max_tokens": 24, "temperature": 0}}),
        ("/v1/chat/completions", {"json": {"messages": messages, "max_tokens": 16, "temperature": 0, "stream": True}}),
        ("/multimodal", {"data": {"text": "Hello there!", "max_new_tokens": "20"}}),
        ("/multimodal", {"data": {"text": "Hello there!", "max_new_tokens": "12", "stream": "true"}}),
    ]

    def answers(engine: OmniEngine) -> list[str]:
        found: list[str] = [""] * len(calls)
        with TestClient(create_app(engine.settings, engine=engine)) as client:

            def call(index: int) -> None:
                path, arguments = calls[index]
                response = client.post(path, **arguments)
                assert response.status_code == 200, response.text
                found[index] = response.text if "stream" in str(arguments) else str(response.json())

            threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        return found

    before = steps(batched)
    hook = slow_steps(batched, 0.01)
    try:
        together_answers = answers(batched)
    finally:
        hook.remove()
    alone_answers = answers(tiny_engine)
    assert batched_steps(batched, before) > 0
    for one, many in zip(alone_answers, together_answers):
        assert strip_ids(one) == strip_ids(many)


def strip_ids(text: str) -> str:
    """An answer without what differs between two runs of it: ids, timestamps and timings."""
    import re

    text = re.sub(r"chatcmpl-[0-9a-f]+|\"created\": ?\d+|'created': \d+", "", text)
    return re.sub(r"'timings_ms': \{[^}]*\}|\"timings_ms\": ?\{[^}]*\}|'request_id': '[^']*'", "", text)


def test_a_timed_out_row_ends_and_the_rows_beside_it_are_answered(tiny_model_dir, tiny_engine):
    engine = OmniEngine.load(tiny_settings(tiny_model_dir, max_batch_size=ROWS, request_timeout_seconds=1.5))
    alone = tiny_engine.generate(GenerationRequest("Hello there!", None, max_new_tokens=20))
    hook = slow_steps(engine, 0.03)
    codes: dict[str, int] = {}
    try:
        with TestClient(create_app(engine.settings, engine=engine)) as client:

            def call(name: str, tokens: int) -> None:
                data = {"text": "Hello there!", "max_new_tokens": str(tokens)}
                response = client.post("/multimodal", data=data)
                codes[name] = response.status_code
                if name == "short":
                    assert response.json()["text"] == alone.text

            threads = [threading.Thread(target=call, args=a) for a in (("long", 400), ("short", 20))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            stats = client.get("/metrics").text
    finally:
        hook.remove()
    assert codes == {"long": 504, "short": 200}
    assert 'omni_batch_steps_total{rows="2"}' in stats
    assert "omni_batch_rows_finished_early_total 1.0" in stats  # the short one left while the long one ran


def test_the_root_says_how_many_rows_a_batch_holds(batched):
    with TestClient(create_app(batched.settings, engine=batched)) as client:
        assert client.get("/").json()["model"]["batching"] == {"max_batch_size": ROWS, "rows": ROWS}


# ---------------------------------------------------------------- memory


@pytest.fixture(scope="module")
def config_3b():
    from conftest import ROOT

    from qwen_omni_server.local.loading import load_config

    return load_config(str(ROOT / "configs" / "qwen2.5-omni-3b.config.json"))


def test_the_plan_costs_each_row_of_a_batch_its_cache_at_the_whole_context(config_3b):
    import copy

    from qwen_omni_server.local.placement import GiB, plan_placement

    plans = {
        rows: plan_placement(copy.deepcopy(config_3b), 40 * GiB, torch.bfloat16, context_tokens=8192, batch_size=rows)
        for rows in (1, 4)
    }
    one, four = plans[1].activations, plans[4].activations
    assert one["other_rows"] == 0
    assert four["other_rows"] == 3 * (one["kv_cache"] + config_3b.thinker_config.text_config.vocab_size * 4)
    assert plans[4].predicted_gpu_bytes - plans[1].predicted_gpu_bytes == four["other_rows"]


def test_auto_takes_the_most_rows_the_gpu_budget_admits(config_3b):
    import copy

    from qwen_omni_server.local.devices import batch_size_for, planning_budgets, resolve_placement
    from qwen_omni_server.local.placement import GiB, plan_placement

    settings = Settings(_env_file=None, max_batch_size="auto", gpu_memory_gib=16, dtype="bfloat16")
    placement = resolve_placement(settings, copy.deepcopy(config_3b), cuda_available=True)
    rows = batch_size_for(settings, config_3b, placement, torch.bfloat16)

    def fits(count: int) -> bool:
        budgets = {**planning_budgets(settings), "batch_size": count}
        chosen = {c: "gpu" if d == "cuda" else d for c, d in placement.components.items()}
        plan = plan_placement(copy.deepcopy(config_3b), 16 * GiB, torch.bfloat16, placement=chosen, **budgets)
        return plan.fits

    assert 1 < rows < 64 and fits(rows) and not fits(rows + 1)
    fixed = settings.model_copy(update={"max_batch_size": 3})
    assert batch_size_for(fixed, config_3b, placement, torch.bfloat16) == 3


def test_auto_on_the_cpu_takes_the_rows_the_free_memory_admits(config_3b):
    from qwen_omni_server.local.devices import Placement, batch_size_for
    from qwen_omni_server.local.placement import GiB, PRESETS

    settings = Settings(_env_file=None, max_batch_size="auto", device_map="cpu")
    placement = Placement(dict(PRESETS["cpu"]))
    small, large = (
        batch_size_for(settings, config_3b, placement, torch.bfloat16, available_bytes=gib * GiB) for gib in (12, 24)
    )
    assert 1 <= small < large


def test_a_spoken_answer_runs_alone_between_batches_and_speaks_as_alone(tiny_model_dir, speaking_engine):
    """Speech (the pipelined talker reads the thinker step by step) waits for the batch to empty and runs on
    its own: the same text and the same audio as on an engine that does not batch, and the text rows beside it
    answer as alone."""
    engine = OmniEngine.load(
        tiny_settings(tiny_model_dir, enable_audio_output=True, max_speech_seconds=2, max_batch_size=ROWS)
    )
    spoken = GenerationRequest("Say something.", None, max_new_tokens=8, return_audio=True, seed=2)
    texts = mixed_requests()[:2]
    alone = [speaking_engine.generate(r) for r in (spoken, *texts)]
    assert alone[0].audio is not None and alone[0].audio.size > 0
    hook = slow_steps(engine, 0.005)
    try:
        results = together(engine, [texts[0], spoken, texts[1]])
    finally:
        hook.remove()
    for one, many in zip(alone[1:], (results[0], results[2])):
        same_answer(one, many)  # type: ignore[arg-type]
    voiced = results[1]
    assert isinstance(voiced, GenerationResult) and voiced.audio is not None
    assert voiced.completion_ids == alone[0].completion_ids and np.array_equal(voiced.audio, alone[0].audio)
