"""The answer as it is generated: its text handed over piece by piece, and the cooperative stop.

Both plug into transformers' `generate()` (a streamer and a stopping criterion) on the model's
thread; the HTTP side only sees the `on_text` callback and the stop event of a GenerationRequest.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from qwen_omni_server.core.types import cut_at_stop

logger = logging.getLogger(__name__)


class TextDeltas(BaseStreamer):
    """Hands the answer's new text to `on_text` token by token (generate() calls put/end on the model thread).

    Text is held back while it ends in an incomplete UTF-8 sequence, or could be the start of a stop
    string, so what was streamed is always a prefix of the final answer. Each token costs the same
    work however long the answer is: only the tokens since the last complete text are decoded
    (incremental detokenization), and stop strings are searched only where a new one could end.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], object], stop_strings: list[str]) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.stop_strings = [s for s in stop_strings if s]
        self.hold = max((len(s) for s in self.stop_strings), default=1) - 1
        self.tokens: list[int] = []
        self.text = ""  # the decoded answer so far, complete characters only
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
        if self.done:
            return
        self.tokens.extend(value.reshape(-1).tolist())
        self._read_new_text()
        self._flush(final=False)

    def end(self) -> None:
        if self.done:
            return
        # Once, at the end: the whole answer as the engine will decode it, so nothing is lost or doubled.
        whole, _ = cut_at_stop(self._decode(self.tokens), self.stop_strings)
        streamed = self.text[: self.sent]
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
        after = self._decode(self.tokens[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)

    def _flush(self, final: bool) -> None:
        start = max(0, self.searched - self.hold)
        cuts = [i for i in (self.text.find(stop, start) for stop in self.stop_strings) if i >= 0]
        self.searched = len(self.text)
        if cuts:
            ready, self.done = self.text[: min(cuts)], True
        elif final:
            ready, self.done = self.text, True
        else:
            ready = self.text[: len(self.text) - self.hold] if self.hold else self.text
        if len(ready) > self.sent:
            self.on_text(ready[self.sent :])
            self.sent = len(ready)


class StopWhenSet(StoppingCriteria):
    """Ends generation at the next token once the event is set (a thread cannot be killed)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
