"""The answer as it is generated: its text handed over piece by piece, its stop strings, the cooperative stop,
and its random draws.

They plug into transformers' `generate()` (a streamer and stopping criteria) on the model's thread; the
HTTP side only sees the `on_text` callback, the stop strings and the stop event of a GenerationRequest.
`RequestDraws`: each request samples from generators of its own, torch's global ones left as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from qwen_omni_server.core.types import GenerationRequest, cut_at_stop

logger = logging.getLogger(__name__)


class TextDeltas(BaseStreamer):
    """Hands the answer's new text to `on_text` token by token (generate() calls put/end on the model thread).

    Text is held back while it ends in an incomplete UTF-8 sequence, or could be the start of a stop
    string, so what was streamed is always a prefix of the final answer. Each token costs the same
    work however long the answer is: only the tokens since the last complete text are decoded
    (incremental detokenization), and stop strings are searched only where a new one could end, in
    the complete characters so far: `done` at the token that completes one.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], object], stop_strings: list[str]) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.stop_strings = [s for s in stop_strings if s]
        self.hold = max((len(s) for s in self.stop_strings), default=1) - 1
        self.tokens: list[int] = []
        self.text = ""  # the decoded answer so far, complete characters only
        self.tail = ""  # complete characters after `text` while the newest tokens end mid-character
        self.prefix_offset = 0  # tokens before this are in `text` and no longer decoded
        self.read_offset = 0  # tokens before this are in `text`
        self.searched = 0  # stop strings cannot start before this index of `text`
        self.sent = 0
        self.prompt_seen = False
        self.done = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.add(value.reshape(-1).tolist())

    def add(self, tokens: list[int]) -> None:
        """Read the answer's next tokens; `done` once its text holds a stop string."""
        if self.done:
            return
        self.tokens.extend(tokens)
        self._read_new_text()
        self._flush(final=False)

    def end(self) -> None:
        if self.done:
            return
        # Once, at the end: the whole answer as the engine will decode it, so nothing is lost or doubled.
        whole, _ = cut_at_stop(self._decode(self.tokens), self.stop_strings)
        streamed = self.text[: self.sent]
        self.tail = ""
        if whole.startswith(streamed):
            self.text, self.searched = whole, len(whole)
        else:  # cannot happen with a byte-level tokenizer; what was sent cannot be taken back
            logger.warning("the streamed text is not a prefix of the decoded answer; the rest was not streamed")
            self.text = streamed
        self._flush(final=True)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _read_new_text(self) -> None:
        """Append the text of the new tokens, decoding only the window since the last complete text."""
        before = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        new = self._decode(self.tokens[self.prefix_offset :])[len(before) :]
        if new and not new.endswith("\ufffd"):
            self.text += new
            self.tail = ""
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        else:  # ends mid-character: the characters before it are final already
            self.tail = new.rstrip("\ufffd")

    def _flush(self, final: bool) -> None:
        text = self.text + self.tail
        start = max(0, self.searched - self.hold)
        cuts = [i for i in (text.find(stop, start) for stop in self.stop_strings) if i >= 0]
        self.searched = len(self.text)
        if cuts:
            ready, self.done = text[: min(cuts)], True
        elif final:
            ready, self.done = self.text, True
        else:
            ready = self.text[: max(0, len(self.text) - self.hold)]
        if len(ready) > self.sent:
            self.on_text(ready[self.sent :])
            self.sent = len(ready)


class StopAtStopStrings(StoppingCriteria):
    """Ends generation at the token whose text completes a stop string, read as the streamer reads it.

    Each sequence's text is decoded incrementally by a `TextDeltas` that sends nowhere: about 11 us a token.
    transformers' StopStringCriteria reads the whole vocabulary for each request instead (151,665 tokens:
    0.25 s on the model's thread, 0.5 s for stop strings it has not seen; bench/stop_strings_bench.py).
    generate() calls stopping criteria before it hands the new token to the streamer, so this criterion
    reads the tokens from `input_ids`, and stops at the same token as StopStringCriteria would, except
    that the prompt's text is not part of the answer here.
    """

    def __init__(self, tokenizer, stop_strings: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.answers: list[TextDeltas] = []
        self.read = 0  # positions of input_ids already read

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if not self.answers:  # the first call: the prompt and the first new token
            self.answers = [TextDeltas(self.tokenizer, _discard, self.stop_strings) for _ in range(len(input_ids))]
            self.read = input_ids.shape[1] - 1
        for answer, tokens in zip(self.answers, input_ids[:, self.read :].tolist()):
            answer.add(tokens)
        self.read = input_ids.shape[1]
        return torch.tensor([answer.done for answer in self.answers], dtype=torch.bool, device=input_ids.device)


def _discard(_text: str) -> None:
    """Where a stop-string check's text goes: it is read, not sent."""


class StopWhenSet(StoppingCriteria):
    """Ends generation at the next token once the event is set (a thread cannot be killed)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def decoding_arguments(tokenizer: Any, request: GenerationRequest, sampling: dict[str, Any]) -> dict[str, Any]:
    """generate()'s arguments for `request`: its `sampling` ones, its stop strings, its stop event and its streamer."""
    decoding = dict(sampling)
    criteria = StoppingCriteriaList()
    if request.stop_strings:  # not generate()'s stop_strings: those build tables over the whole vocabulary
        criteria.append(StopAtStopStrings(tokenizer, request.stop_strings))
    if request.stop is not None:
        criteria.append(StopWhenSet(request.stop))
    if criteria:
        decoding["stopping_criteria"] = criteria
    if request.on_text is not None:
        decoding["streamer"] = TextDeltas(tokenizer, request.on_text, request.stop_strings)
    return decoding


# ---------------------------------------------------------------- random draws


class OwnDraws:
    """One sampler's random draws (the thinker's or the talker's), of its own. transformers' generate() takes no
    generator: it draws from torch's global ones. Inside `drawing` they hold this stream's state (on the CPU and
    on the CUDA devices `cuda`); after it, the stream keeps where it got to and theirs is back as it was. So the
    same seed gives the same draws, whatever else draws before, between or after."""

    def __init__(self, seed: int, cuda: Sequence[int] = ()) -> None:
        self.seed, self.cuda = seed, list(cuda)
        self._states: list[torch.Tensor] | None = None  # where the stream got to, once it has drawn

    @contextlib.contextmanager
    def drawing(self) -> Iterator[None]:
        """torch's global generators draw this stream's numbers within the block (generate() runs in one)."""
        with forked(self.cuda):
            self.enter()
            try:
                yield
            finally:
                self.leave()

    def leave(self) -> None:
        """Keep where the stream got to (torch's generators then draw something else's numbers)."""
        self._states = [torch.random.get_rng_state(), *(torch.cuda.get_rng_state(i) for i in self.cuda)]

    def enter(self) -> None:
        """torch's global generators draw this stream's numbers from here on (where it got to, or its seed)."""
        if self._states is None:
            torch.random.default_generator.manual_seed(self.seed)
            for index in self.cuda:
                torch.cuda.default_generators[index].manual_seed(self.seed)
            return
        torch.random.set_rng_state(self._states[0])
        for index, state in zip(self.cuda, self._states[1:]):
            torch.cuda.set_rng_state(state, index)


def forked(cuda: Sequence[int]) -> contextlib.AbstractContextManager[Any]:
    """torch's global generators (the CPU's and those of the CUDA devices `cuda`) restored as they were after
    the block, whatever drew from them inside it."""
    return torch.random.fork_rng(devices=list(cuda), device_type="cuda")


def derived_seed(seed: int, name: str) -> int:
    """A seed of its own for `name`'s draws, fixed by `seed` (63 bits)."""
    digest = hashlib.blake2b(f"{name}:{seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass(frozen=True)
class RequestDraws:
    """A request's random draws: `seed` (the request's, else fresh entropy) fixes all of them; the thinker draws
    from its stream (seeded with `seed` itself), the talker from another, so neither's draws depend on the
    other's. token2wav's noise is seeded with `seed` too (`speech.Token2Wav`)."""

    seed: int
    thinker: OwnDraws
    talker: OwnDraws

    @classmethod
    def of(cls, seed: int | None, cuda: Sequence[int] = ()) -> RequestDraws:
        seed = secrets.randbits(63) if seed is None else seed
        return cls(seed, OwnDraws(seed, cuda), OwnDraws(derived_seed(seed, "talker"), cuda))


def cuda_devices(model: Any) -> list[int]:
    """The CUDA devices `model` computes on: where its weights are, and where accelerate's hooks run the
    offloaded ones."""
    devices = {tensor.device for tensor in itertools.chain(model.parameters(), model.buffers())}
    for module in model.modules():
        execution = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if execution is not None:
            devices.add(torch.device(execution))
    return sorted(
        {d.index if d.index is not None else torch.cuda.current_device() for d in devices if d.type == "cuda"}
    )
