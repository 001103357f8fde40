"""Spoken answers' memory does not grow with their length: token2wav makes every answer chunk by chunk."""

from __future__ import annotations

import torch

from qwen_omni_server.core.types import GenerationRequest
from qwen_omni_server.local.live_bytes import LiveBytes
from qwen_omni_server.local.speaker import Speaker
from qwen_omni_server.local.speech import Codec, CodeStream, Token2Wav


def talker_saying(codes: list[int]):
    """Stands in for `talk`: hands `codes` on one at a time, as the talker samples them."""

    def talk(model, arguments, max_codes, on_codes, stop, until=None) -> CodeStream:
        stream = CodeStream(Codec.of(model.config), on_codes)
        stream.put(torch.tensor([[0]]))  # the prompt
        for code in codes[:max_codes]:
            stream.put(torch.tensor([code]))
        return stream

    return talk


def peak_bytes_of_answer(engine, codes: list[int]) -> int:
    """The most tensor bytes alive at once while a non-streamed answer of `codes` is voiced."""
    voice = Speaker(engine.model, engine.processor.tokenizer, [], talker=talker_saying(codes))
    request = GenerationRequest("hi", None, return_audio=True, seed=1)
    synthesis = Token2Wav(engine.model, "Chelsie", seed=1)
    with LiveBytes() as live:
        audio, _ = voice.voice({}, synthesis, request, len(codes), 3)
    assert audio is not None and len(audio) == len(codes) * 2 * 240  # 2 mel frames of 240 samples
    return live.peak


def test_a_long_non_streamed_answer_needs_no_more_memory_than_a_short_one(speaking_engine):
    """3 s against 6 s of speech. Solved in one piece, N mel frames build [2, heads, N, N] attention masks
    and scores in every DiT layer (11 MB at 6 s here; 29 GiB at 180 s for the real model); chunk by chunk,
    no DiT window is over 144 frames whatever the length (3 s already has full windows). The collected
    audio is host memory (numpy, 96 kB a second), not counted."""
    codes = torch.randint(0, 32, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    short = peak_bytes_of_answer(speaking_engine, codes[:150])
    long = peak_bytes_of_answer(speaking_engine, codes)
    assert long <= 1.2 * short, f"peak {long:,} B at 300 codes against {short:,} B at 150"
