"""Requests generated together (MAX_BATCH_SIZE > 1): rows of one batch, decoded on the model's thread.

The model's thread keeps one batch running. Between two decoding steps it takes in the requests that wait
(up to MAX_BATCH_SIZE rows): a newcomer's prompt is prefilled alone, exactly as it would be alone, and its
cache joins the batch's, both left-padded to the longer one (the padding masked). Each row then decodes at
its own 3-D position (Qwen2.5-Omni's rope delta after its prompt), picks its tokens with its own sampling
settings and random stream, streams its own text, and leaves the batch at its own stop token, stop string,
length or stop event while the others go on; its place goes to the next request waiting. Work that needs the
model to itself (a spoken answer) runs alone, between batches, in its turn.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import torch
from transformers import DynamicCache, LogitsProcessorList
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwen_omni_server.core.errors import Cancelled
from qwen_omni_server.local.streaming import TextDeltas

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RowSampler:
    """A row's next token as generate() would pick it for the same settings: its logits processors in
    generate()'s order, then the highest score (greedy) or a draw from the row's own generator, seeded as
    `streaming.RequestDraws` seeds torch's global one for generate(), so the same seed draws the same tokens."""

    def __init__(self, decoding: dict[str, Any], seed: int, device: torch.device) -> None:
        processors = LogitsProcessorList()
        if decoding.get("repetition_penalty", 1.0) != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(decoding["repetition_penalty"]))
        self.sampling = bool(decoding.get("do_sample"))
        if self.sampling:
            if decoding["temperature"] != 1.0:
                processors.append(TemperatureLogitsWarper(decoding["temperature"]))
            if decoding.get("top_k"):
                processors.append(TopKLogitsWarper(decoding["top_k"]))
            if decoding.get("top_p", 1.0) < 1.0:
                processors.append(TopPLogitsWarper(decoding["top_p"]))
            if decoding.get("min_p") is not None:
                processors.append(MinPLogitsWarper(decoding["min_p"]))
        self.processors = processors
        self.generator = torch.Generator(device=device).manual_seed(seed) if self.sampling else None

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor) -> int:
        """The token after `ids` (1 x n: prompt and answer so far) given its float32 `logits` (1 x vocabulary)."""
        scores = self.processors(cast(torch.LongTensor, ids), logits) if self.processors else logits
        if self.generator is not None:
            probabilities = torch.nn.functional.softmax(scores, dim=-1)
            return int(torch.multinomial(probabilities, num_samples=1, generator=self.generator))
        return int(scores.argmax(dim=-1))


@dataclass(eq=False)
class Row:
    """One request in a batch: its prompt, how it picks and ends its tokens, and where it got to."""

    inputs: dict[str, Any]  # the processor's tensors, on the thinker's device
    use_audio_in_video: bool
    max_new_tokens: int
    sampler: RowSampler
    stop_ids: frozenset[int]
    stop: threading.Event
    text: TextDeltas | None = None  # its text as it comes: to on_text, or read for its stop strings only
    tokens: list[int] = field(default_factory=list)
    ids: torch.Tensor | None = None  # prompt and answer, where the sampler reads them (repetition penalty)
    ended: str | None = None  # "stop", "length" or "stopped" once it left its batch
    future: Future = field(default_factory=Future)  # its tokens, or the error that ended it

    def pick(self, logits: torch.Tensor) -> None:
        """Take the token the row's sampler picks from its next position's `logits` (1 x vocabulary); once its
        stop event is set, that token is its last ("stopped")."""
        self.take(self.sampler(self.ids if self.ids is not None else self.inputs["input_ids"], logits))
        if self.ended is None and self.stop.is_set():
            self.ended = "stopped"

    def take(self, token: int) -> None:
        """Add the row's next token; `ended` says when it was its last."""
        self.tokens.append(token)
        if self.ids is not None:
            self.ids = torch.cat([self.ids, self.ids.new_tensor([[token]])], dim=1)
        if self.text is not None:
            self.text.add([token])
        if token in self.stop_ids or (self.text is not None and self.text.done):
            self.ended = "stop"
        elif len(self.tokens) >= self.max_new_tokens:
            self.ended = "length"

    def finish(self, error: BaseException | None = None) -> None:
        """Hand the row's answer (or `error`) to the request waiting for it."""
        if self.text is not None and error is None:
            self.text.end()
        if not self.future.done():
            if error is None:
                self.future.set_result(self.tokens)
            else:
                self.future.set_exception(error)


class Batch:
    """The rows decoding together: their cache, left-padded to one length, its mask, and each row's next
    position and next input token."""

    def __init__(self, thinker: Any) -> None:
        self.thinker = thinker
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # rows x cache length: 1 where a row has a token
        self.positions = torch.zeros(0, dtype=torch.long)  # each row's next position id
        self.next_tokens = torch.zeros(0, dtype=torch.long)  # what each row reads at the next step

    def __len__(self) -> int:
        return len(self.rows)

    def admit(self, row: Row) -> None:
        """Prefill `row`'s prompt alone, pick its first token and, unless that ended it, join the batch."""
        cache, logits, position = self._prefill(row)
        row.pick(logits)
        if row.ended is not None:
            return
        device = row.inputs["input_ids"].device
        token, place = torch.tensor([row.tokens[-1]], device=device), torch.tensor([position], device=device)
        self._merge(cache, row.inputs["attention_mask"])
        self.positions = torch.cat([self.positions.to(device), place])
        self.next_tokens = torch.cat([self.next_tokens.to(device), token])
        self.rows.append(row)

    def _prefill(self, row: Row) -> tuple[DynamicCache, torch.Tensor, int]:
        """The row's prompt through the thinker as generate() runs it: its cache, the last position's logits
        (float32) and the position its first answer token takes."""
        inputs = row.inputs
        features = inputs.get("feature_attention_mask")
        positions, delta = self.thinker.model.get_rope_index(
            inputs["input_ids"],
            inputs.get("image_grid_thw"),
            inputs.get("video_grid_thw"),
            inputs["attention_mask"],
            row.use_audio_in_video,
            features.sum(-1) if features is not None else None,
            inputs.get("video_second_per_grid"),
        )
        cache = DynamicCache(config=self.thinker.config.get_text_config())
        output = self.thinker.model(
            **inputs, position_ids=positions, cache=cache, use_cache=True, use_audio_in_video=row.use_audio_in_video
        )
        logits = self.thinker.lm_head(output.last_hidden_state[:, -1:])[:, -1].to(
            inputs["input_ids"].device, torch.float32
        )
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise RuntimeError("batching needs the thinker's plain dynamic cache (no sliding window)")
        return cache, logits, int(inputs["input_ids"].shape[1] + delta.reshape(-1)[0])

    def _merge(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Join a newcomer's cache to the batch's, left-padding the shorter one, layer by layer (the memory
        of one layer more at most)."""
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for ours, theirs in zip(_layers(self.cache), _layers(cache)):
            ours.keys = torch.cat([_left_pad(ours.keys, length), _left_pad(theirs.keys, length)])
            ours.values = torch.cat([_left_pad(ours.values, length), _left_pad(theirs.values, length)])
            theirs.keys = theirs.values = None
        self.mask = torch.cat([_left_pad(self.mask, length, dim=1), _left_pad(mask.to(self.mask), length, dim=1)])

    def step(self) -> None:
        """One decoding step for every row: each takes its next token."""
        rows = len(self.rows)
        mask = torch.cat([self.mask, self.mask.new_ones(rows, 1)], dim=1)
        output = self.thinker.model(
            input_ids=self.next_tokens.view(rows, 1),
            attention_mask=mask,
            position_ids=self.positions.view(1, rows, 1).expand(3, rows, 1),
            cache=self.cache,
            use_cache=True,
        )
        logits = self.thinker.lm_head(output.last_hidden_state)[:, -1].to(self.mask.device, torch.float32)
        self.mask, self.positions = mask, self.positions + 1
        for index, row in enumerate(self.rows):
            row.pick(logits[index : index + 1])
        self.next_tokens = self.next_tokens.new_tensor([row.tokens[-1] for row in self.rows])

    def undo_step(self) -> None:
        """Take back what a step that failed part way (out of memory) added to the cache."""
        length = self.mask.shape[1]
        for layer in _layers(self.cache):
            if layer.keys is not None and layer.keys.shape[-2] > length:
                layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]

    def drop(self, leaving: list[Row]) -> None:
        """Take `leaving` out of the batch, and the cache columns no row still needs."""
        keep = [i for i, row in enumerate(self.rows) if row not in leaving]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.mask = None, self.mask[:0, :0]
            self.positions, self.next_tokens = self.positions[:0], self.next_tokens[:0]
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.mask, self.positions, self.next_tokens = self.mask[index], self.positions[index], self.next_tokens[index]
        unused = int(self.mask.argmax(dim=1).min())  # columns that are padding in every row left
        self.mask = self.mask[:, unused:]
        for layer in _layers(self.cache):
            layer.keys = layer.keys[index.to(layer.keys.device), :, unused:]
            layer.values = layer.values[index.to(layer.values.device), :, unused:]


def _layers(cache: DynamicCache | None) -> list[Any]:
    """The cache's layers (each holds `keys` and `values`: rows x heads x length x head size)."""
    return list(cache.layers) if cache is not None else []


def _left_pad(tensor: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    """`tensor` with zeros before it along `dim` up to `length`."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


@dataclass(eq=False)
class Waiting:
    """A request waiting for the model's thread: `make` builds its row there (its prompt is processed on the
    model's thread, as one request at a time would have it), or, `alone`, is work that needs the model to itself."""

    make: Callable[[], Any]
    alone: bool
    stop: threading.Event | None = None  # set: given up while waiting (it never starts)
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    """What batching did: decoding steps by rows in the batch, and rows that left while others went on."""

    steps_by_rows: Counter = field(default_factory=Counter)
    finished_early: int = 0
    rows: int = 0


class Batcher:
    """The model's thread while batching: it runs one batch of up to `max_rows` requests at a time, takes the
    waiting ones in between its steps, and runs `alone` work in its turn when the batch has emptied."""

    def __init__(self, thinker: Any, max_rows: int) -> None:
        self.batch = Batch(thinker)
        self.max_rows = max_rows
        self.stats = BatchStats()
        self._waiting: deque[Waiting] = deque()
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="model-batch", daemon=True)
        self._thread.start()

    def answer(self, row: Callable[[], Row], stop: threading.Event | None = None) -> list[int]:
        """The answer tokens of the request whose row `row()` builds (on the model's thread, when its turn
        comes), once generated in a batch; its error, if it failed. `stop` set before its turn: Cancelled."""
        return self._put(Waiting(row, alone=False, stop=stop))

    def alone(self, job: Callable[[], T]) -> T:
        """`job()` run on the model's thread with the model to itself, in its turn."""
        return self._put(Waiting(job, alone=True))

    def _put(self, work: Waiting) -> Any:
        with self._changed:
            if self._closed:
                raise RuntimeError("the model's thread has stopped")
            self._waiting.append(work)
            self._changed.notify()
        return work.future.result()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def snapshot(self) -> dict[str, Any]:
        """Batching's counters, for /metrics."""
        with self._changed:
            return {
                "max_rows": self.max_rows,
                "rows": self.stats.rows,
                "steps_by_rows": dict(self.stats.steps_by_rows),
                "finished_early": self.stats.finished_early,
            }

    def _serve(self) -> None:
        with torch.inference_mode():
            while (work := self._next()) is not None:
                for waiting in work:
                    self._run_alone(waiting) if waiting.alone else self._admit(waiting)
                if self.batch.rows:
                    self._step()

    def _next(self) -> list[Waiting] | None:
        """What to do next, in arrival order: work to run alone (once the batch has emptied), or the requests to
        take into the batch (maybe none, while it runs); None once closed."""
        with self._changed:
            while not self._closed and not self._waiting and not self.batch.rows:
                self._changed.wait()
            if self._closed:
                self._fail_all(RuntimeError("the server is shutting down"))
                return None
            if self._waiting and self._waiting[0].alone:
                return [self._waiting.popleft()] if not self.batch.rows else []  # the batch empties first
            taken: list[Waiting] = []
            while self._waiting and not self._waiting[0].alone and len(self.batch) + len(taken) < self.max_rows:
                taken.append(self._waiting.popleft())
            return taken

    @staticmethod
    def _run_alone(work: Waiting) -> None:
        try:
            work.future.set_result(work.context.run(work.make))
        except BaseException as error:  # it belongs to the request that asked for it
            work.future.set_exception(error)

    def _admit(self, waiting: Waiting) -> None:
        """Build the request's row and take it into the batch; a failure is its own (a prompt refused, out of
        memory in its prefill): the batch goes on."""
        if waiting.stop is not None and waiting.stop.is_set():
            waiting.future.set_exception(Cancelled("the request was given up before its generation started"))
            return
        try:
            row = waiting.context.run(waiting.make)
            row.future = waiting.future
            if row.stop.is_set():
                row.ended = "stopped"
                row.finish()
                return
            self.batch.admit(row)
        except Exception as error:
            if not waiting.future.done():
                waiting.future.set_exception(error)
            return
        if row.ended is not None:
            self._leave([row], admitted=False)
        with self._changed:
            self.stats.rows = len(self.batch)

    def _step(self) -> None:
        """One step of the batch; rows that ended leave it. Out of memory: the longest row is given up (its
        request gets the error) and the others go on."""
        try:
            self.batch.step()
        except torch.OutOfMemoryError as error:
            self.batch.undo_step()
            longest = max(self.batch.rows, key=lambda row: int(row.inputs["input_ids"].shape[1]) + len(row.tokens))
            self.batch.drop([longest])
            longest.finish(error)
            logger.warning("a batch ran out of memory; its longest row was given up, %d go on", len(self.batch))
            return
        except Exception as error:  # not one row's fault: every row of the batch gets the error
            logger.exception("a batch failed")
            rows = list(self.batch.rows)
            self.batch.drop(rows)
            for row in rows:
                row.finish(error)
            return
        with self._changed:
            self.stats.steps_by_rows[len(self.batch)] += 1
        ended = [row for row in self.batch.rows if row.ended is not None]
        if ended:
            self.batch.drop(ended)
            self._leave(ended, admitted=True)

    def _leave(self, rows: list[Row], admitted: bool) -> None:
        """Hand the ended rows their answers; count those that left while others went on."""
        with self._changed:
            if admitted and self.batch.rows:
                self.stats.finished_early += len(rows)
            self.stats.rows = len(self.batch)
        for row in rows:
            row.finish()

    def _fail_all(self, error: Exception) -> None:
        """Every request still here ends with `error` (call with the lock held)."""
        for row in self.batch.rows:
            row.finish(error)
        for work in self._waiting:
            if not work.future.done():
                work.future.set_exception(error)
        self._waiting.clear()
        self.batch.drop(list(self.batch.rows))
