"""Stop strings end an answer at the token whose text completes one, as transformers' StopStringCriteria
would, but from the answer's text decoded incrementally: no table over the whole vocabulary is built for
a request (151,665 tokens for the real tokenizer; bench/stop_strings_bench.py)."""

from __future__ import annotations

import dataclasses

import pytest
import tiny_model
import torch
from transformers.generation.stopping_criteria import StopStringCriteria

from qwen_omni_server.core.types import GenerationRequest, GenerationResult, cut_at_stop
from qwen_omni_server.local import engine, streaming

TEXTS = [
    "The quick brown fox. STOP here and not after.",
    "abc 你好 def 你好 ghi",
    "𝄞 music ✓ 𝄞 more music",
    "Bonjour, ¿qué tal? Grüße, привет.",
    "line one\n\nline two\n\nline three",
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_model.build_tokenizer()


def stopping_step(criterion, prompt: list[int], answer: list[int]) -> int | None:
    """The index of the answer token at which `criterion` ends generation (generate() calls it once a token)."""
    ids = list(prompt)
    for step, token in enumerate(answer):
        ids.append(token)
        if bool(criterion(torch.tensor([ids]), None)[0]):
            return step
    return None


@pytest.mark.parametrize("text", TEXTS)
def test_stops_at_the_same_token_as_transformers_stop_string_criteria(tokenizer, text):
    """Every substring of up to 4 characters as a stop string: inside a token, across tokens, across the
    bytes of a character split between tokens."""
    prompt = tokenizer.encode("<|im_start|>")  # a special token: no stop string can begin in the prompt
    answer = tokenizer.encode(text)
    stops = sorted({text[i : i + n] for n in range(1, 5) for i in range(len(text) - n + 1)})
    differ = [
        (stop, expected, got)
        for stop in stops
        if (expected := stopping_step(StopStringCriteria(tokenizer, [stop]), prompt, answer))
        != (got := stopping_step(streaming.StopAtStopStrings(tokenizer, [stop]), prompt, answer))
    ]
    assert len(stops) > 50 and not differ


def test_the_prompt_is_not_part_of_the_answer(tokenizer):
    """StopStringCriteria reads the prompt too: the chat template's prompt ends in a newline, so a stop string
    that begins with one ended answers at a token whose answer holds no stop string."""
    prompt = tokenizer.encode("<|im_start|>assistant\n")
    answer = tokenizer.encode("line one\n\nline two")
    decoded = [tokenizer.decode(answer[: k + 1]) for k in range(len(answer))]
    expected = next(k for k, text in enumerate(decoded) if "\nlin" in text)
    assert stopping_step(streaming.StopAtStopStrings(tokenizer, ["\nlin"]), prompt, answer) == expected
    assert stopping_step(StopStringCriteria(tokenizer, ["\nlin"]), prompt, answer) < expected


def test_each_sequence_of_a_batch_stops_on_its_own(tokenizer):
    start = tokenizer.encode("<|im_start|>")
    quiet, stopping = tokenizer.encode("no stop in here at all, none"), tokenizer.encode("one STOP two")
    criterion = streaming.StopAtStopStrings(tokenizer, ["STOP"])
    steps = range(len(stopping))
    stopped = [
        criterion(torch.tensor([start + quiet[: k + 1], start + stopping[: k + 1]]), None).tolist() for k in steps
    ]
    expected = stopping_step(streaming.StopAtStopStrings(tokenizer, ["STOP"]), start, stopping)
    assert expected is not None and 0 < expected < len(stopping) - 1
    assert stopped == [[False, k >= expected] for k in steps]


class VocabularyReads:
    """Counts the vocabulary entries a tokenizer hands out (get_vocab, tokens converted one by one to strings):
    StopStringCriteria reads all of them to build its tables."""

    def __init__(self, tokenizer, monkeypatch) -> None:
        self.entries = 0
        for name in ("get_vocab", "convert_ids_to_tokens", "_convert_id_to_token", "convert_tokens_to_string"):
            monkeypatch.setattr(tokenizer, name, self._counted(getattr(tokenizer, name)))

    def _counted(self, method):
        def counted(*args, **kwargs):
            result = method(*args, **kwargs)
            self.entries += len(result) if isinstance(result, (dict, list)) else 1
            return result

        return counted


def a_sampled_answer(engine) -> tuple[GenerationRequest, list[int], str]:
    """A request whose answer is varied text (sampled with a seed), its tokens and its text."""
    request = GenerationRequest("Write anything.", None, max_new_tokens=16, temperature=1.0, seed=3)
    ids = engine.generate(request).completion_ids
    return request, ids, engine.processor.tokenizer.decode(ids, skip_special_tokens=True)


def test_a_request_with_stop_strings_reads_no_vocabulary(tiny_engine, monkeypatch):
    request, _, text = a_sampled_answer(tiny_engine)
    stop = text.strip()[len(text.strip()) // 2 :][:3]
    reads = VocabularyReads(tiny_engine.processor.tokenizer, monkeypatch)
    streamed: list[str] = []
    tiny_engine.generate(dataclasses.replace(request, stop_strings=[stop, "zzz"], on_text=streamed.append))
    assert "".join(streamed) and reads.entries == 0, f"{reads.entries} vocabulary entries read"


def test_answers_and_stops_are_those_of_generates_own_stop_strings(tiny_engine):
    """The same tokens, text and finish reason as generate(stop_strings=...), for stop strings that end
    the answer at several places (none begins with a newline: see the prompt test above)."""
    request, ids, text = a_sampled_answer(tiny_engine)
    tokenizer = tiny_engine.processor.tokenizer
    stops = [s for s in dict.fromkeys(text[i : i + 2] for i in range(1, len(text) - 2, 3)) if "\n" not in s][:4]
    stops.append("zzz")
    assert len(stops) >= 3
    ours = [tiny_engine.generate(dataclasses.replace(request, stop_strings=[stop])) for stop in stops]

    def generates_own(request: GenerationRequest) -> GenerationResult:
        """The request answered by generate() with its own stop strings, drawing as the engine draws."""
        prepared = tiny_engine._prepare(request)
        arguments = engine.sampling_arguments(tiny_engine.sampling(request))
        stop_ids = engine.stop_token_ids(tokenizer)
        with torch.inference_mode(), streaming.RequestDraws.of(request.seed).thinker.drawing():
            sequences = tiny_engine.model.thinker.generate(
                **prepared.inputs,
                max_new_tokens=request.max_new_tokens,
                eos_token_id=stop_ids,
                stop_strings=request.stop_strings,
                tokenizer=tokenizer,
                **arguments,
            )
        answer = engine.Answer(prepared, sequences[0, prepared.prompt_tokens :])
        return engine.result_of(answer, tokenizer, stop_ids, 0.0)

    theirs = [generates_own(dataclasses.replace(request, stop_strings=[stop])) for stop in stops]
    for stop, mine, reference in zip(stops, ours, theirs):
        assert (mine.completion_ids, mine.text, mine.finish_reason) == (
            reference.completion_ids,
            reference.text,
            reference.finish_reason,
        ), stop
        assert mine.text == cut_at_stop(text, [stop])[0]
    assert any(len(mine.completion_ids) < len(ids) for mine in ours)  # some stopped early
