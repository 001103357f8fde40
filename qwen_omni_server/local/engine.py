"""The local engine: a loaded Qwen2.5-Omni and its processor answering requests on its worker's one thread.

`OmniEngine.load` makes it ready (`loading`: placement, dtype, weights resident, warm-up); `generate` builds
the prompt (`prompts`), runs the thinker with the request's sampling, stop strings, streamer and stop
event, and has the `speaker` speak the answer when speech is asked for. Each request samples from random
draws of its own (`streaming.RequestDraws`): torch's global generators are left as they were.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from qwen_omni_server.core.engine import BaseEngine
from qwen_omni_server.core.errors import Cancelled, SpeechError
from qwen_omni_server.core.settings import Settings
from qwen_omni_server.core.worker import ModelWorker
from qwen_omni_server.core.types import GenerationRequest, GenerationResult, cut_at_stop
from qwen_omni_server.local import quantization
from qwen_omni_server.local.batching import Batcher, Row, RowSampler
from qwen_omni_server.local.devices import Placement, memory_in_use
from qwen_omni_server.local.loading import load_model
from qwen_omni_server.local.placement import (
    find_component,
)
from qwen_omni_server.local.prompts import MediaTokenIds, PromptBuilder
from qwen_omni_server.local.residency import (
    recovers_from_out_of_memory,
    warm_up,
)
from qwen_omni_server.local.speaker import Speaker, SpeechJob
from qwen_omni_server.local.streaming import RequestDraws, TextDeltas, cuda_devices, decoding_arguments

logger = logging.getLogger(__name__)

# Sampling fields of a checkpoint's generation_config that apply when a request leaves them unset (as vLLM).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "min_p")
# What an unset field means when the checkpoint does not set it either (OpenAI's and vLLM's defaults).
SAMPLING_FALLBACKS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}

# ---------------------------------------------------------------- the engine


class OmniEngine(BaseEngine):
    """A loaded Qwen2.5-Omni and its processor. `generate` runs on a thread of its worker: one at a time, or with
    batching (MAX_BATCH_SIZE > 1) up to that many, whose rows the batcher's thread decodes together."""

    def __init__(
        self, model, processor, settings: Settings, placement: Placement, dtype: torch.dtype, batch_size: int = 1
    ):
        self.model = model
        self.processor = processor
        self.settings = settings
        self.placement = placement
        self.dtype = dtype
        tokenizer = processor.tokenizer
        self._stop_ids = stop_token_ids(tokenizer)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self._stop_ids[0]
        self.prompts = PromptBuilder(processor, MediaTokenIds.of(model.config.thinker_config), settings)
        self.speaker = Speaker(model, tokenizer, self._stop_ids)
        self.sampling_defaults = sampling_defaults(getattr(model, "generation_config", None))
        self._cuda = cuda_devices(model)  # where the samplers draw, besides the CPU
        self.batch_size = batch_size  # MAX_BATCH_SIZE, `auto` resolved
        self.batcher = Batcher(model.thinker, batch_size) if batch_size > 1 else None
        self._description = description(model, settings, placement, dtype, batch_size)
        self.startup: dict[str, float] = {}  # load and warm-up seconds, set by `load`

    @classmethod
    def load(cls, settings: Settings) -> OmniEngine:
        """Load MODEL_PATH with the configured placement and dtype (weights from disk or the hub), copy
        the weights into memory and warm every component up: loaded means ready to serve at full pace."""
        started = time.perf_counter()
        loaded = load_model(settings)
        engine = cls(loaded.model, loaded.processor, loaded.settings, loaded.placement, loaded.dtype, loaded.batch_size)
        ready = time.perf_counter()
        engine.startup = {
            "load_seconds": round(ready - started, 2),
            "warmup_seconds": round(warm_up(engine), 2),
            "resident_bytes": loaded.resident_bytes,
        }
        logger.info(
            "loaded in %.1f s, warmed up in %.1f s", engine.startup["load_seconds"], engine.startup["warmup_seconds"]
        )
        return engine

    # -- description

    def describe(self) -> dict[str, Any]:
        """What runs where: the model, dtype, devices, and the placement actually used."""
        return {**self._description, **({"startup": dict(self.startup)} if self.startup else {})}

    def memory(self) -> dict[str, int]:
        return memory_in_use()

    def new_worker(self, max_waiting: int) -> ModelWorker:
        """Jobs wait for the model in arrival order; with batching, up to MAX_BATCH_SIZE run at once (their
        rows share the model's thread)."""
        details = self.batcher.snapshot if self.batcher is not None else None
        return ModelWorker(max_waiting, threads=self.batch_size, details=details)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    @property
    def voices(self) -> list[str]:
        """The checkpoint's voices (from its spk_dict.pt), the default first."""
        return voices_of(self.model)

    def check_speech(self, speaker: str | None) -> str:
        """The voice to speak with; SpeechError when speech is off or the voice unknown."""
        if not self.settings.enable_audio_output or not getattr(self.model, "has_talker", False):
            raise SpeechError(
                "speech output is not enabled on this server: start it with ENABLE_AUDIO_OUTPUT=true "
                "(loads the talker and token2wav, about 2.4 GiB for the 3B model)"
            )
        voices = self.voices
        if not voices:
            raise SpeechError("this checkpoint has no voices (its spk_dict.pt is empty)")
        if speaker is None:
            return voices[0]
        if speaker not in voices:
            raise SpeechError(f"unknown speaker {speaker!r}; available voices: {', '.join(voices)}")
        return speaker

    def max_speech_codes(self) -> int:
        """The talker's absolute length bound: MAX_SPEECH_SECONDS in codes (an answer's own bound, from its
        spoken tokens and SPEECH_SECONDS_PER_TOKEN, may be lower)."""
        return self.speaker.max_codes(self.settings.max_speech_seconds)

    # -- generation

    @recovers_from_out_of_memory
    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Build the prompt, run the processor and the thinker (in a batch, or alone); the decoded answer."""
        speaker = self.check_speech(request.speaker) if request.return_audio else None
        if request.stop is not None and request.stop.is_set():
            raise Cancelled("the request was cancelled before it started")
        try:
            started = time.perf_counter()
            if self.batcher is None:
                answer = self._alone(request, speaker)
            elif speaker is None:
                answer = self._in_batch(request)
            else:
                answer = self.batcher.alone(lambda: self._alone(request, speaker))
            total_ms = (time.perf_counter() - started) * 1000
            return result_of(answer, self.processor.tokenizer, self._stop_ids, total_ms)
        finally:
            if self.settings.empty_cuda_cache and torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _prepare(self, request: GenerationRequest) -> Prepared:
        """The prompt for `request` on the thinker's device, its answer bound fitted to the context."""
        started = time.perf_counter()
        prompt = self.prompts.build(request)
        max_new_tokens, fitted = self.prompts.fit_context(prompt.by_modality, request.max_new_tokens)
        return Prepared(
            request=dataclasses.replace(request, max_new_tokens=max_new_tokens),
            inputs=self._on_device(prompt.inputs),
            use_audio_in_video=prompt.use_audio_in_video,
            prompt_tokens=prompt.tokens,
            by_modality=prompt.by_modality,
            described=prompt.described,
            warnings=[*prompt.warnings, *fitted],
            prepare_ms=(time.perf_counter() - started) * 1000,
        )

    def _in_batch(self, request: GenerationRequest) -> Answer:
        """A text answer as a row of a batch; its prompt is processed on the model's thread when its turn comes."""
        prepared: list[Prepared] = []

        def row() -> Row:
            prepared.append(self._prepare(request))
            return self._row(prepared[0])

        tokens = self.batcher.answer(row, request.stop) if self.batcher is not None else []
        return Answer(prepared[0], torch.tensor(tokens, dtype=torch.long))

    def _alone(self, request: GenerationRequest, speaker: str | None) -> Answer:
        """The thinker's generate() on this one request (and the speaker, for speech)."""
        prepared = self._prepare(request)
        request, inputs = prepared.request, prepared.inputs
        thinker = {
            "eos_token_id": self._stop_ids,
            "pad_token_id": self._pad_id,
            **decoding_arguments(self.processor.tokenizer, request, sampling_arguments(self.sampling(request))),
        }
        draws = RequestDraws.of(request.seed, self._cuda)
        with torch.inference_mode():
            if speaker is None:
                with draws.thinker.drawing():
                    sequences = self.model.thinker.generate(
                        **inputs,
                        use_audio_in_video=prepared.use_audio_in_video,
                        max_new_tokens=request.max_new_tokens,
                        **thinker,
                    )
                return Answer(prepared, sequences[0, prepared.prompt_tokens :].cpu())
            job = SpeechJob(inputs, prepared.use_audio_in_video, request, speaker, thinker, self.settings, draws)
            spoken = self.speaker.speak(job)
        generated = spoken.sequences[0, prepared.prompt_tokens :].cpu()
        return Answer(prepared, generated, spoken.audio, spoken.warnings)

    def _row(self, prepared: Prepared) -> Row:
        """`prepared` as a row of a batch: its sampling, stops and streamed text."""
        request, inputs = prepared.request, prepared.inputs
        sampling = sampling_arguments(self.sampling(request))
        wants_text = request.on_text is not None or request.stop_strings
        text = TextDeltas(self.processor.tokenizer, request.on_text or _ignore, request.stop_strings)
        return Row(
            inputs=inputs,
            use_audio_in_video=prepared.use_audio_in_video,
            max_new_tokens=request.max_new_tokens,
            sampler=RowSampler(sampling, RequestDraws.of(request.seed).seed, inputs["input_ids"].device),
            stop_ids=frozenset(self._stop_ids),
            stop=request.stop or threading.Event(),
            text=text if wants_text else None,
            ids=inputs["input_ids"] if "repetition_penalty" in sampling else None,
        )

    def sampling(self, request: GenerationRequest) -> dict[str, float]:
        """The request's sampling values; each one it leaves unset comes from the checkpoint's generation_config."""
        given = {"temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k}
        values = {**SAMPLING_FALLBACKS, **self.sampling_defaults}
        values.update({name: value for name, value in given.items() if value is not None})
        return values

    def _on_device(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The processor's tensors on the thinker's input device, floating ones in the model's dtype."""
        device = self.model.thinker.get_input_embeddings().weight.device
        tensors = {}
        for key, value in inputs.items():
            if torch.is_tensor(value):
                value = value.to(device)
                if value.is_floating_point() and key != "feature_attention_mask":
                    value = value.to(self.dtype)
            tensors[key] = value
        return tensors


@dataclass(frozen=True)
class Prepared:
    """A request ready for the thinker: the processor's tensors on its device, and what its answer reports."""

    request: GenerationRequest  # its max_new_tokens fitted to MAX_CONTEXT_TOKENS
    inputs: dict[str, Any]
    use_audio_in_video: bool  # generate() must get the processor's value
    prompt_tokens: int
    by_modality: dict[str, int]
    described: dict[str, list[dict]]
    warnings: list[str]
    prepare_ms: float


@dataclass(frozen=True)
class Answer:
    """What the thinker (and the speaker) made of a prepared request."""

    prepared: Prepared
    generated: torch.Tensor  # the answer's tokens, on the CPU
    audio: Any = None
    warnings: list[str] = field(default_factory=list)


def voices_of(model) -> list[str]:
    """The checkpoint's voices (from its spk_dict.pt), the default first."""
    return list(getattr(model, "speaker_map", {}) or {})


def description(model, settings: Settings, placement: Placement, dtype: torch.dtype, rows: int) -> dict[str, Any]:
    """What runs where, worked out once (placement does not change after loading): the model, dtype, devices,
    placement, speech and voices, batching, and quantization."""
    described = {
        "model": settings.model_path,
        "dtype": str(dtype).removeprefix("torch."),
        "devices": sorted({str(p.device) for p in model.parameters()}),
        "placement": placement.components,
        "audio_output": settings.enable_audio_output,
        "voices": voices_of(model),
        "batching": {"max_batch_size": settings.max_batch_size, "rows": rows},
    }
    if placement.gpu_layers is not None:
        described["language_model_gpu_layers"] = placement.gpu_layers
    scheme = quantization.loaded_scheme(model.config, settings.quantization)
    described["quantization"] = quantization.describe(model, scheme, find_component(model, "language_model"))
    return described


def result_of(answer: Answer, tokenizer: Any, stop_ids: list[int], total_ms: float) -> GenerationResult:
    """The answer's text (cut at its stop strings), token counts, finish reason and what the model got."""
    prepared, generated = answer.prepared, answer.generated
    request = prepared.request
    text, stopped_by_string = cut_at_stop(tokenizer.decode(generated, skip_special_tokens=True), request.stop_strings)
    ended = stopped_by_string or (generated.numel() > 0 and int(generated[-1]) in stop_ids)
    return GenerationResult(
        text=text,
        prompt_tokens=prepared.prompt_tokens,
        completion_tokens=int(generated.numel()),
        timings_ms={"prepare": prepared.prepare_ms, "generate": total_ms - prepared.prepare_ms},
        completion_ids=generated.tolist(),
        audio=answer.audio,
        prompt_tokens_by_modality=prepared.by_modality,
        warnings=[*prepared.warnings, *answer.warnings],
        finish_reason="stop" if ended or generated.numel() < request.max_new_tokens else "length",
        inputs=prepared.described,
    )


def sampling_arguments(sampling: dict[str, float]) -> dict[str, Any]:
    """Sampling values (`OmniEngine.sampling`) as generate() arguments."""
    arguments: dict[str, Any] = {"do_sample": sampling["temperature"] > 0}
    if sampling["temperature"] > 0:
        arguments.update(temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=sampling["top_k"])
        if "min_p" in sampling:
            arguments["min_p"] = sampling["min_p"]
    if "repetition_penalty" in sampling:
        arguments["repetition_penalty"] = sampling["repetition_penalty"]
    return arguments


def _ignore(_text: str) -> None:
    """Where a row's text goes when it is read for its stop strings only."""


def stop_token_ids(tokenizer) -> list[int]:
    """The tokens that end an answer: <|im_end|> (the chat template's end of turn) whatever the checkpoint's
    tokenizer names as its eos token, that eos token, and <|endoftext|>."""
    candidates = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    return sorted(
        {i for i in (tokenizer.eos_token_id, *candidates) if isinstance(i, int) and i >= 0} - {tokenizer.unk_token_id}
    )


def sampling_defaults(generation_config) -> dict[str, float]:
    """The sampling values the checkpoint's generation_config sets (vLLM applies them to requests that
    leave them unset); empty when it sets none."""
    if generation_config is None:
        return {}
    return {name: value for name in SAMPLING_FIELDS if (value := getattr(generation_config, name, None)) is not None}
