"""Streamed text: incremental (the work per token does not grow with the answer), and always a prefix
of the final answer, whatever the tokens split (multi-byte characters, stop strings across tokens)."""

from __future__ import annotations

import pytest
import tiny_model
import torch

from qwen_omni_server.core.types import cut_at_stop
from qwen_omni_server.local.streaming import RequestDraws, TextDeltas, cuda_devices


class CountingTokenizer:
    """A tokenizer that counts the tokens each decode() call is given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoded = 0

    def decode(self, tokens, **kwargs) -> str:
        self.decoded += len(tokens)
        return self.tokenizer.decode(tokens, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_model.build_tokenizer()


def stream(tokenizer, ids: list[int], stop_strings: list[str] = ()) -> tuple[list[str], list[int]]:
    """Feed `ids` one by one as generate() does; the pieces sent and the tokens decoded at each step."""
    pieces: list[str] = []
    counting = CountingTokenizer(tokenizer)
    deltas = TextDeltas(counting, pieces.append, list(stop_strings))
    deltas.put(torch.tensor([[1, 2, 3]]))  # the prompt
    work = []
    for token in ids:
        before = counting.decoded
        deltas.put(torch.tensor([token]))
        work.append(counting.decoded - before)
    deltas.end()
    return pieces, work


def test_work_per_token_does_not_grow_with_the_answer(tokenizer):
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 40)
    assert len(ids) > 300
    pieces, work = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(work[-50:]) <= max(work[:50]) <= 8  # re-decoding everything would cost ~len(ids) per token


@pytest.mark.parametrize(
    ("text", "stops"),
    [
        ("Bonjour, ¿qué tal? Grüße, 你好, こんにちは, привет. " * 3, []),
        ("The quick brown fox. STOP here and not after.", ["STOP"]),
        ("abc 你好 def 你好", ["好 d"]),
        ("no stop in here at all", ["zzz"]),
        ("𝄞 music ✓ 𝄞", ["✓"]),
        ("hello! and more", ["hello!"]),  # a stop string at the start: the first tokens were sent
    ],
)
def test_streamed_text_is_a_prefix_of_the_answer_and_complete_at_the_end(tokenizer, text, stops):
    ids = tokenizer.encode(text)
    pieces, _ = stream(tokenizer, ids, stops)
    final, _ = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stops)
    sent = ""
    for piece in pieces:
        sent += piece
        assert final.startswith(sent) and "\ufffd" not in piece
    assert sent == final


def test_the_http_layer_imports_without_torch():
    """The HTTP modules and their data types (generation.py, media.py, uploads.py) need no torch or
    Transformers: only the engine loads them, and only for a local model."""
    import subprocess
    import sys

    from conftest import ROOT

    script = (
        "import sys; sys.modules['torch'] = sys.modules['transformers'] = None; "
        "import media, qwen_omni_server.server, qwen_omni_server.api.app, qwen_omni_server.upstream; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ---------------------------------------------------------------- each request's own random draws


@pytest.fixture
def cuda_stand_in(monkeypatch) -> list[torch.Generator]:
    """Two CPU generators standing in for two CUDA devices' default generators (no GPU needed)."""
    generators = [torch.Generator().manual_seed(10 + index) for index in range(2)]
    monkeypatch.setattr(torch.cuda, "default_generators", tuple(generators))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=0: generators[device].get_state())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=0: generators[device].set_state(state))
    return generators


def draw(generators: list[torch.Generator]) -> list[list[float]]:
    """What sampling on the CPU and on each (stand-in) CUDA device draws."""
    return [torch.rand(3).tolist(), *(torch.rand(3, generator=g).tolist() for g in generators)]


def test_own_draws_leave_the_cpu_and_cuda_generators_as_they_were(cuda_stand_in):
    torch.manual_seed(99)
    before = [torch.random.get_rng_state(), *(g.get_state() for g in cuda_stand_in)]
    draws = RequestDraws.of(7, [0, 1])
    with draws.thinker.drawing():
        first = draw(cuda_stand_in)
    after = [torch.random.get_rng_state(), *(g.get_state() for g in cuda_stand_in)]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    with RequestDraws.of(7, [0, 1]).thinker.drawing():
        assert draw(cuda_stand_in) == first  # the same seed, the same draws, on every device
    with draws.thinker.drawing():
        assert draw(cuda_stand_in) != first  # a stream goes on from where it got to
    with RequestDraws.of(7, [0, 1]).talker.drawing():
        assert draw(cuda_stand_in) != first  # the talker's stream is another


def test_unseeded_draws_are_fresh():
    assert RequestDraws.of(None).seed != RequestDraws.of(None).seed
    assert RequestDraws.of(-5).seed == -5  # a client's seed is used as it is (torch takes any 64-bit one)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_own_draws_on_a_real_cuda_device_leave_its_generator_as_it_was():
    before = torch.cuda.get_rng_state(0)
    with RequestDraws.of(7, [0]).thinker.drawing():
        first = torch.rand(3, device="cuda:0")
    assert torch.equal(torch.cuda.get_rng_state(0), before)
    with RequestDraws.of(7, [0]).thinker.drawing():
        assert torch.equal(torch.rand(3, device="cuda:0"), first)


def test_the_cuda_devices_a_model_draws_on():
    """Where its weights are, and where accelerate's hooks run offloaded ones (here: none on CUDA, and a stand-in
    hook that runs a layer on cuda:1)."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert cuda_devices(model) == []
    model[1]._hf_hook = type("Hook", (), {"execution_device": 1})()
    assert cuda_devices(model) == [1]
