"""Streamed text: incremental (the work per token does not grow with the answer), and always a prefix
of the final answer, whatever the tokens split (multi-byte characters, stop strings across tokens)."""

from __future__ import annotations

import pytest
import tiny_model
import torch

from qwen_omni_server.core.types import cut_at_stop
from qwen_omni_server.local.streaming import TextDeltas


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
