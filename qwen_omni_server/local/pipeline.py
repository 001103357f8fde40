"""Pipelined speech: the talker speaks while the thinker still writes (SPEECH_PIPELINE).

Each talker step reads one reply state of the thinker (a token's last-layer state plus its embedding), and
after the last one the text-end embedding, then the pad embedding (`speech.talker_arguments`). So talker
step t needs only the thinker's first t + 1 tokens, and the first chunk of audio only as many tokens as it
has codes. Here the thinker (on the model's thread) and the talker (on a thread of its own, token2wav with
it) take turns: after each thinker token the talker runs until it needs a reply state not yet written.

- `Turns`: one of them computes at a time, each drawing from its own random stream while it holds the
  turn, so the same seed gives the same codes as speaking after the text (`Speaker.speak` with the
  pipeline off).
- `SpokenSoFar`: the talker only reads tokens sure to be in the returned text: before any stop token,
  within max_new_tokens, and characters no stop string can still cut (the text streamer's hold).
- `ThinkerStates`: the thinker's first and last layer at each step, read by a forward hook and dropped
  once the talker has them (not every layer of every step, kept to the end).
- `Handover`, a stopping criterion of the thinker's, hands the talker the states of the tokens it may
  read after each token, and the turn; `speak_while_writing` runs it all for one answer.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from qwen_omni_server.local.speech import Stopped, Token2Wav, reply_state, talker_arguments, text_embedding
from qwen_omni_server.local.streaming import RequestDraws, TextDeltas, forked

if TYPE_CHECKING:
    from qwen_omni_server.local.speaker import Speaker, SpeechJob

THINKER, TALKER = "thinker", "talker"


class Turns:
    """The thinker and the talker take turns: one computes while the other waits. Whoever holds the turn
    draws from its own stream of the request's draws (torch's generators are global, so each side's
    stream is put in when its turn starts and kept when it ends)."""

    def __init__(self, draws: RequestDraws) -> None:
        self._draws = {THINKER: draws.thinker, TALKER: draws.talker}
        self._holder = THINKER
        self._finished: set[str] = set()
        self._changed = threading.Condition()

    def take(self, me: str) -> None:
        """Wait for `me`'s first turn."""
        with self._changed:
            self._changed.wait_for(lambda: self._holder == me)
        self._draws[me].enter()

    def hand(self, me: str, other: str) -> None:
        """Give the turn to `other` (unless it has finished) and wait until it comes back."""
        with self._changed:
            if other in self._finished:
                return
        self._draws[me].leave()
        with self._changed:
            self._holder = other
            self._changed.notify_all()
            self._changed.wait_for(lambda: self._holder == me)
        self._draws[me].enter()

    def finish(self, me: str, other: str) -> None:
        """`me` is done: the turn goes to `other` for good."""
        self._draws[me].leave()
        with self._changed:
            self._finished.add(me)
            self._holder = other
            self._changed.notify_all()


class ReplyFeed:
    """The talker's `thinker_reply_part` while the thinker writes it: reads like the tensor the talker slices
    (`[:, :1, :]` the next state, `[:, 1:, :]` past it, `.shape[1]` 1 once only the pad state is left),
    each state given to the talker as it is read and dropped. When the talker reads a state not yet
    written, it hands the turn to the thinker until it is."""

    def __init__(self, turns: Turns, model: Any, device: torch.device) -> None:
        self.turns, self.device = turns, device
        self.hidden_size = model.thinker.config.text_config.hidden_size
        self.text_end, self.text_pad = (
            text_embedding(model, token, device) for token in (model.talker.text_eos_token, model.talker.text_pad_token)
        )
        self.states: deque[torch.Tensor] = deque()
        self.pad: torch.Tensor | None = None  # set when the text has ended: read from then on
        self.current: torch.Tensor | None = None
        self.given_up = False

    def add(self, state: torch.Tensor) -> None:
        self.states.append(state)

    def close(self) -> None:
        """The text has ended: the text-end state, then the pad state for good."""
        self.states.append(self.text_end)
        self.pad = self.text_pad

    def give_up(self) -> None:
        """The answer was stopped before its text ended: the talker's next read raises Stopped."""
        self.given_up = self.pad is None

    def __getitem__(self, key: tuple[slice, slice, slice]) -> Any:
        if key[1].start == 1:  # past the state just read (the talker only does this while more follow)
            self.current = None
            return self
        if self.current is None:
            self.current = self._next()
        return self.current

    @property
    def shape(self) -> tuple[int, int, int]:
        return (1, 1 if self.current is not None and self.current is self.pad else 2, self.hidden_size)

    def _next(self) -> torch.Tensor:
        while not self.states and self.pad is None and not self.given_up:
            self.turns.hand(TALKER, THINKER)
        if self.given_up:
            raise Stopped("the request was given up")
        if self.states:
            return self.states.popleft()
        assert self.pad is not None
        return self.pad


class SpokenSoFar:
    """How many of the answer's first tokens are sure to be in the returned text while the thinker writes:
    before any stop token, within `limit`, and ending where the streamer would have sent the text (whole
    characters that no stop string can still cut)."""

    def __init__(self, tokenizer: Any, stop_ids: list[int], stop_strings: list[str], limit: int) -> None:
        self.text = TextDeltas(tokenizer, _discard, stop_strings)
        self.stop_ids, self.limit = set(stop_ids), limit
        self.whole: deque[tuple[int, int]] = deque()  # (tokens, characters) where the text so far was whole
        self.count = 0
        self.ended = False

    def add(self, tokens: list[int]) -> int:
        """Read the answer's next tokens; returns how many of its first tokens are sure to be spoken."""
        for token in tokens:
            self.ended = self.ended or token in self.stop_ids or len(self.text.tokens) >= self.limit
            if self.ended:
                break
            self.text.add([token])
            if self.text.read_offset == len(self.text.tokens):
                self.whole.append((len(self.text.tokens), len(self.text.text)))
        while self.whole and self.whole[0][1] <= self.text.sent:
            self.count = self.whole.popleft()[0]
        return self.count


def _discard(_text: str) -> None:
    """Where SpokenSoFar's text goes: it is read, not sent."""


class ThinkerStates:
    """The thinker's first-layer (input embeddings) and last-layer states at each of its steps, read by a forward
    hook on its language model: [prompt, token 0, token 1, ...] as `hidden_states` would list them, each kept
    until it is taken."""

    def __init__(self, language_model: torch.nn.Module) -> None:
        self.steps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.count = 0
        self._hook = language_model.register_forward_hook(self._read, with_kwargs=True)

    def _read(self, _module: torch.nn.Module, _args: Any, kwargs: dict[str, Any], output: Any) -> None:
        self.steps[self.count] = (kwargs["inputs_embeds"], output.last_hidden_state)
        self.count += 1

    def take(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.steps.pop(step)

    def detach(self) -> None:
        """Read no further steps."""
        self._hook.remove()

    def close(self) -> None:
        self.detach()
        self.steps.clear()


class CodeBound(StoppingCriteria):
    """Ends the talker at `limit` codes once the text's end sets it (the bound depends on the spoken tokens);
    until then the talker cannot pass the thinker anyway."""

    def __init__(self, prompt_length: int) -> None:
        self.prompt_length = prompt_length
        self.limit: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = self.limit is not None and input_ids.shape[1] - self.prompt_length >= self.limit
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class Handover(StoppingCriteria):
    """The thinker's last stopping criterion: after each of its tokens, the reply states of the tokens now
    sure to be spoken go to the talker (`start`ed with the first), and the talker takes its turn. Stops the
    thinker if the talker failed."""

    def __init__(
        self,
        states: ThinkerStates,
        spoken: SpokenSoFar,
        feed: ReplyFeed,
        start: Callable[[torch.Tensor, torch.Tensor], Talker],
        prompt_length: int,
    ) -> None:
        self.states, self.spoken, self.feed, self.start = states, spoken, feed, start
        self.prompt_length = self.read = prompt_length
        self.given = 0  # the answer's first tokens whose reply states went to the talker
        self.talker: Talker | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        count = self.spoken.add(input_ids[0, self.read :].tolist())
        self.read = input_ids.shape[1]
        if self.give(min(count, self.states.count - 1), input_ids):
            self.feed.turns.hand(THINKER, TALKER)
        failed = self.talker is not None and self.talker.error is not None
        return torch.full((input_ids.shape[0],), failed, dtype=torch.bool, device=input_ids.device)

    def give(self, count: int, sequences: torch.Tensor) -> bool:
        """Hand the talker the reply states of the answer's first `count` tokens; whether any was new."""
        new = self.given < count
        while self.given < count:
            first, last = self.states.take(self.given + 1)
            state = reply_state(first, last, self.feed.device)
            if self.given == 0:
                token = sequences[:, self.prompt_length : self.prompt_length + 1].to(self.feed.device)
                self.talker = self.start(token, state)
            else:
                self.feed.add(state)
            self.given += 1
        return new


class Talker(threading.Thread):
    """The talker's thread: waits for its first turn, runs `speak`, and gives the turn back for good."""

    def __init__(self, turns: Turns, speak: Callable[[], Any]) -> None:
        super().__init__(name="talker", daemon=True)
        self.turns, self.speak = turns, speak
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        self.turns.take(TALKER)
        try:
            with torch.inference_mode():
                self.result = self.speak()
        except BaseException as error:  # handed to the model's thread, which raises it
            self.error = error
        finally:
            self.turns.finish(TALKER, THINKER)


def speak_while_writing(speaker: Speaker, job: SpeechJob) -> tuple[torch.Tensor, Talker | None, int]:
    """The thinker writes (with the job's generate() arguments) and the talker speaks beside it, taking turns:
    the answer's tokens, the talker's thread (its `result` the speaker's `voice`), and the spoken tokens."""
    inputs, request, settings, draws = job.inputs, job.request, job.settings, job.draws
    model, prompt, limit = speaker.model, inputs["input_ids"].shape[1], request.max_new_tokens
    stop = request.stop or threading.Event()
    turns = Turns(draws)
    feed = ReplyFeed(turns, model, inputs["input_ids"].device)
    states = ThinkerStates(model.thinker.model.language_model)
    bound = CodeBound(prompt + 2)  # the talker's prompt: the thinker's, the voice and the first token

    def start(first_token: torch.Tensor, first_reply: torch.Tensor) -> Talker:
        bos = model.speaker_map[job.voice]["bos_token"]
        arguments = talker_arguments(
            model, inputs, job.use_audio_in_video, states.take(0), first_token, first_reply, feed, bos
        )
        synthesis = Token2Wav(model, job.voice, seed=draws.seed, stop=stop)
        max_codes = speaker.max_codes(settings.max_speech_seconds)  # the answer's own bound: `bound`
        talker = Talker(
            turns, lambda: speaker.voice(arguments, synthesis, request, max_codes, settings.speech_chunk_blocks, bound)
        )
        talker.start()
        return talker

    handover = Handover(
        states, SpokenSoFar(speaker.tokenizer, speaker.stop_ids, request.stop_strings, limit), feed, start, prompt
    )
    criteria = StoppingCriteriaList([*job.thinker.get("stopping_criteria", []), handover])
    spoken = 0
    with forked(draws.thinker.cuda):
        draws.thinker.enter()
        try:
            sequences = model.thinker.generate(
                **inputs,
                use_audio_in_video=job.use_audio_in_video,
                max_new_tokens=limit + 1,  # the last step computes the last answer token's states
                **{**job.thinker, "stopping_criteria": criteria},
            )[:, : prompt + limit]
            spoken = min(speaker.spoken_tokens(sequences, inputs, request), states.count - 1)
            if spoken and not stop.is_set():  # the rest of the text, then its end
                handover.give(spoken, sequences)
                feed.close()
                bound.limit = speaker.talker_max_codes(
                    spoken, settings.max_speech_seconds, settings.speech_seconds_per_token
                )
        finally:
            feed.give_up()
            states.close()
            turns.finish(THINKER, TALKER)
            if handover.talker is not None:
                handover.talker.join()
    return sequences, handover.talker, spoken
