"""Pipelined speech (SPEECH_PIPELINE): the talker speaks while the thinker writes, and says the same as it
does after the whole text: the same codes, the same audio, for the same request and seed."""

from __future__ import annotations

import dataclasses
import time

import httpx
import numpy as np
import pytest
from conftest import serve, speaker_without_end, spoken_request, tiny_settings
from fastapi.testclient import TestClient

from qwen_omni_server.core.types import GenerationRequest
from qwen_omni_server.local.engine import OmniEngine
from qwen_omni_server.local.pipeline import SpokenSoFar
from qwen_omni_server.local.speaker import Speaker
from qwen_omni_server.local.speech import spoken_token_count, talk
from qwen_omni_server.server import create_app


class Recorded:
    """The talker's codes of each answer, as `talk` hands them on."""

    def __init__(self) -> None:
        self.codes: list[list[int]] = []

    def __call__(self, model, arguments, max_codes, on_codes, stop, until=None):
        stream = talk(model, arguments, max_codes, on_codes, stop, until)
        self.codes.append(stream.codes)
        return stream


def recording(engine: OmniEngine) -> Recorded:
    recorded = Recorded()
    own = engine.speaker
    engine.speaker = Speaker(own.model, own.tokenizer, own.stop_ids, talker=recorded)
    return recorded


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    """The same model speaking after the text and while it is written; then the same pair with a talker
    that speaks until its bound (long speech, so the talker runs beside the thinker)."""
    pairs = {}
    for kind in ("own end", "no end"):
        pair = []
        for pipeline in (False, True):
            if kind == "own end":
                engine = OmniEngine.load(
                    tiny_settings(tiny_model_dir, enable_audio_output=True, speech_pipeline=pipeline)
                )
            else:
                engine = speaker_without_end(tiny_model_dir, 3, speech_seconds_per_token=0.02, speech_pipeline=pipeline)
            pair.append((engine, recording(engine)))
        pairs[kind] = pair
    return pairs


def stop_string_in(engine: OmniEngine, request: GenerationRequest) -> tuple[str, str]:
    """A stop string that cuts the answer mid-way, across a token boundary (its 5th and 6th tokens' text),
    and the text before it."""
    ids = engine.generate(request).completion_ids
    tokenizer = engine.processor.tokenizer
    head = tokenizer.decode(ids[:4], skip_special_tokens=True)
    stop = tokenizer.decode(ids[:6], skip_special_tokens=True)[len(head) :]
    assert stop and tokenizer.decode(ids, skip_special_tokens=True).find(stop) == len(head)
    return stop, head


CASES = [  # (seed, temperature, max_new_tokens, cut)
    (1, 0.0, 16, "length"),
    (2, 0.0, 40, "length"),
    (13, 1.0, 30, "<|im_end|>"),  # ends by itself after 22 tokens
    (25, 1.0, 30, "<|im_end|>"),  # after 11
    (1, 0.0, 16, "stop string"),
    (4, 1.0, 24, "stop string"),
]


@pytest.mark.parametrize("kind", ["own end", "no end"])
@pytest.mark.parametrize("voice", ["Chelsie", "Ethan"])
@pytest.mark.parametrize(("seed", "temperature", "max_new_tokens", "cut"), CASES)
def test_pipelined_speech_equals_speech_after_the_text(engines, kind, voice, seed, temperature, max_new_tokens, cut):
    (after, after_codes), (pipelined, pipelined_codes) = engines[kind]
    request = GenerationRequest(
        "Say something.",
        None,
        max_new_tokens=max_new_tokens,
        return_audio=True,
        speaker=voice,
        seed=seed,
        temperature=temperature,
    )
    head = None
    if cut == "stop string":
        stop, head = stop_string_in(after, request)
        request = dataclasses.replace(request, stop_strings=[stop])
    first, second = after.generate(request), pipelined.generate(request)
    ids = first.completion_ids
    if cut == "<|im_end|>":
        assert ids[-1] in after._stop_ids and len(ids) < max_new_tokens
    elif cut == "length":
        assert len(ids) == max_new_tokens and not set(ids) & set(after._stop_ids)
    else:
        assert first.text == head and len(ids) < max_new_tokens
    assert second.completion_ids == ids and second.text == first.text
    assert pipelined_codes.codes[-1] == after_codes.codes[-1] and len(after_codes.codes[-1]) > 0
    assert first.audio is not None and second.audio is not None and np.array_equal(first.audio, second.audio)
    assert first.warnings == second.warnings


def test_the_talker_speaks_while_the_thinker_writes_and_never_ahead_of_it(tiny_model_dir):
    """Each talker step reads one more token's states: step t needs the thinker's token t written (and its
    states computed, one step later). The first audio comes long before the text's end."""
    engine = speaker_without_end(tiny_model_dir, 20, speech_seconds_per_token=0.02)  # 4.4 s: 220 codes
    thinker_steps: list[float] = []
    talker_steps: list[int] = []  # thinker steps done at each talker step
    audio: list[int] = []
    hooks = [
        engine.model.thinker.register_forward_hook(lambda *_: thinker_steps.append(time.monotonic())),
        engine.model.talker.register_forward_hook(lambda *_: talker_steps.append(len(thinker_steps))),
    ]
    request = GenerationRequest(
        "Say something.",
        None,
        max_new_tokens=120,
        return_audio=True,
        seed=2,
        on_audio=lambda _: audio.append(len(thinker_steps)),
    )
    try:
        result = engine.generate(request)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(result.completion_ids) == 120 and len(thinker_steps) == 121  # one step more: the last states
    during = [done for done in talker_steps if done < len(thinker_steps)]
    assert len(during) > 100  # the talker ran beside the thinker, a step for each token
    for step, done in enumerate(talker_steps[1:], start=1):  # step 0 is the talker's prompt: token 0
        assert done >= min(step + 2, len(thinker_steps)), f"talker step {step} ran after thinker step {done}"
    assert audio[0] < 60, f"the first audio came after {audio[0]} of 121 thinker steps"


def test_what_may_be_spoken_waits_for_the_stop_strings_and_whole_characters(tiny_model_dir):
    """SpokenSoFar counts only tokens whose text no stop string can still cut (the text streamer's hold), in
    whole characters, before any stop token and within the length bound; at the end as many as are spoken."""
    tokenizer = OmniEngine.load(tiny_settings(tiny_model_dir)).processor.tokenizer
    ids = tokenizer.encode("hello w\u00f6rld \U0001f600, this is the end")
    text = tokenizer.decode(ids)
    assert any(tokenizer.decode(ids[:n]).endswith("\ufffd") for n in range(len(ids)))  # a character split
    stop = "is the"
    counts = SpokenSoFar(tokenizer, [400], [stop], limit=100)
    cut = text.index(stop)
    for read in range(1, len(ids) + 1):
        count = counts.add(ids[read - 1 : read])
        spoken = tokenizer.decode(ids[:count])
        written = tokenizer.decode(ids[:read])
        assert text[:cut].startswith(spoken) and not spoken.endswith("\ufffd")
        assert len(spoken) <= max(0, len(written.rstrip("\ufffd")) - (len(stop) - 1))
    assert count == spoken_token_count(tokenizer, ids, text[:cut], [400]) > 0
    assert SpokenSoFar(tokenizer, [400], [], limit=100).add(ids[:3] + [400] + ids[3:]) == 3
    assert SpokenSoFar(tokenizer, [400], [], limit=2).add(ids) == 2


# ---------------------------------------------------------------- stops while the thinker still writes


class Steps:
    """When the thinker, the talker and token2wav's DiT last ran, and how often."""

    def __init__(self, engine: OmniEngine) -> None:
        self.thinker: list[float] = []
        self.talker: list[float] = []
        model = engine.model
        self.hooks = [
            model.thinker.register_forward_hook(lambda *_: self.thinker.append(time.monotonic())),
            model.talker.register_forward_hook(lambda *_: self.talker.append(time.monotonic())),
            model.token2wav.code2wav_dit_model.register_forward_hook(lambda *_: self.talker.append(time.monotonic())),
        ]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def test_a_client_leaving_while_the_thinker_writes_stops_thinker_talker_and_token2wav(tiny_model_dir):
    engine = speaker_without_end(tiny_model_dir, 600)  # 2000 tokens and 30,000 codes: minutes of work
    steps = Steps(engine)
    try:
        for url in serve(create_app(engine.settings, engine=engine)):
            with httpx.Client(timeout=60) as http:
                body = spoken_request(max_tokens=2000, stream=True)
                with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                    for line in response.iter_lines():
                        if '"data"' in line:  # the first audio
                            break
                    thinker_before, talker_before = len(steps.thinker), len(steps.talker)
                    left = time.monotonic()
                deadline = left + 2
                while http.get(f"{url}/health").json()["generations"]["running"] and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert time.monotonic() < deadline
                time.sleep(0.5)
        assert 0 < thinker_before < 1000 and talker_before > 0  # both were running when the client left
        assert steps.thinker[-1] - left < 2 and steps.talker[-1] - left < 2
        assert len(steps.thinker) < 1000
    finally:
        steps.remove()


@pytest.mark.parametrize("max_tokens", [8, 2000], ids=["after the text", "while the thinker writes"])
def test_a_504_stops_thinker_talker_and_token2wav(tiny_model_dir, max_tokens):
    """A non-streamed spoken answer over REQUEST_TIMEOUT_SECONDS: the 504 stops the thinker, the talker and
    token2wav (which checks at each ODE step); the model is free again at once."""
    engine = speaker_without_end(tiny_model_dir, 600, request_timeout_seconds=1.5)  # it could talk for 30,000 codes
    steps = Steps(engine)
    try:
        with TestClient(create_app(engine.settings, engine=engine)) as client:
            started = time.monotonic()
            response = client.post("/v1/chat/completions", json=spoken_request(max_tokens=max_tokens))
            answered = time.monotonic()
            assert response.status_code == 504 and answered - started < 5
            deadline = answered + 2
            while client.get("/health").json()["generations"]["running"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert time.monotonic() < deadline
        assert steps.thinker and steps.talker  # both ran
        assert steps.thinker[-1] - answered < 2 and steps.talker[-1] - answered < 2
        assert len(steps.thinker) < 2000 and len(steps.talker) < engine.max_speech_codes()  # it ran, then stopped
    finally:
        steps.remove()
