"""The local engine: a loaded Qwen2.5-Omni and its processor answering requests on its worker's one thread.

`OmniEngine.load` makes it ready (`loading`: placement, dtype, weights resident, warm-up); `generate` builds
the prompt (`prompts`), runs the thinker with the request's sampling, stop strings, streamer and stop
event, and has the `speaker` speak the answer when speech is asked for. Each request samples from random
draws of its own (`streaming.RequestDraws`): torch's global generators are left as they were.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch
from transformers import StoppingCriteriaList

from qwen_omni_server.core.engine import BaseEngine
from qwen_omni_server.core.errors import Cancelled, SpeechError
from qwen_omni_server.core.settings import Settings
from qwen_omni_server.core.types import GenerationRequest, GenerationResult, cut_at_stop
from qwen_omni_server.local import quantization
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
from qwen_omni_server.local.streaming import RequestDraws, StopAtStopStrings, StopWhenSet, TextDeltas, cuda_devices

logger = logging.getLogger(__name__)

# Sampling fields of a checkpoint's generation_config that apply when a request leaves them unset (as vLLM).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "min_p")
# What an unset field means when the checkpoint does not set it either (OpenAI's and vLLM's defaults).
SAMPLING_FALLBACKS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}

# ---------------------------------------------------------------- the engine


class OmniEngine(BaseEngine):
    """A loaded Qwen2.5-Omni and its processor; `generate` must run on the model's owner thread."""

    def __init__(self, model, processor, settings: Settings, placement: Placement, dtype: torch.dtype):
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
        self._description = self._describe()
        self.startup: dict[str, float] = {}  # load and warm-up seconds, set by `load`

    @classmethod
    def load(cls, settings: Settings) -> OmniEngine:
        """Load MODEL_PATH with the configured placement and dtype (weights from disk or the hub), copy
        the weights into memory and warm every component up: loaded means ready to serve at full pace."""
        started = time.perf_counter()
        loaded = load_model(settings)
        engine = cls(loaded.model, loaded.processor, loaded.settings, loaded.placement, loaded.dtype)
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

    def _describe(self) -> dict[str, Any]:
        """The description, worked out once: placement does not change after loading."""
        devices = sorted({str(p.device) for p in self.model.parameters()})
        description = {
            "model": self.settings.model_path,
            "dtype": str(self.dtype).removeprefix("torch."),
            "devices": devices,
            "placement": self.placement.components,
            "audio_output": self.settings.enable_audio_output,
            "voices": self.voices,
        }
        if self.placement.gpu_layers is not None:
            description["language_model_gpu_layers"] = self.placement.gpu_layers
        scheme = quantization.loaded_scheme(self.model.config, self.settings.quantization)
        language_model = find_component(self.model, "language_model")
        description["quantization"] = quantization.describe(self.model, scheme, language_model)
        return description

    def memory(self) -> dict[str, int]:
        return memory_in_use()

    @property
    def voices(self) -> list[str]:
        """The checkpoint's voices (from its spk_dict.pt), the default first."""
        return list(getattr(self.model, "speaker_map", {}) or {})

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
        """Build the prompt, run the processor and the thinker; returns the decoded answer."""
        speaker = self.check_speech(request.speaker) if request.return_audio else None
        if request.stop is not None and request.stop.is_set():
            raise Cancelled("the request was cancelled before it started")
        try:
            started = time.perf_counter()
            prompt = self.prompts.build(request)
            inputs = self._on_device(prompt.inputs)
            use_audio_in_video, by_modality = prompt.use_audio_in_video, prompt.by_modality
            described, warnings = prompt.described, list(prompt.warnings)
            del prompt  # its tensors are in `inputs` now
            max_new_tokens, fitted = self.prompts.fit_context(by_modality, request.max_new_tokens)
            warnings += fitted
            request = dataclasses.replace(request, max_new_tokens=max_new_tokens)
            prepared = time.perf_counter()
            audio = None
            thinker = {"eos_token_id": self._stop_ids, "pad_token_id": self._pad_id, **self._decoding(request)}
            draws = RequestDraws.of(request.seed, self._cuda)
            with torch.inference_mode():
                if speaker is None:
                    with draws.thinker.drawing():
                        sequences = self.model.thinker.generate(
                            **inputs, use_audio_in_video=use_audio_in_video, max_new_tokens=max_new_tokens, **thinker
                        )
                else:
                    job = SpeechJob(inputs, use_audio_in_video, request, speaker, thinker, self.settings, draws)
                    spoken = self.speaker.speak(job)
                    sequences, audio, warnings = spoken.sequences, spoken.audio, warnings + spoken.warnings
            prompt_tokens = int(inputs["input_ids"].shape[1])
            generated = sequences[0, prompt_tokens:].cpu()
            del inputs, sequences  # the big tensors go before the next request comes
            text, stopped_by_string = cut_at_stop(
                self.processor.tokenizer.decode(generated, skip_special_tokens=True), request.stop_strings
            )
            ended = stopped_by_string or (generated.numel() > 0 and int(generated[-1]) in self._stop_ids)
            finished = time.perf_counter()
            return GenerationResult(
                text=text,
                prompt_tokens=prompt_tokens,
                completion_tokens=int(generated.numel()),
                timings_ms={"prepare": (prepared - started) * 1000, "generate": (finished - prepared) * 1000},
                completion_ids=generated.tolist(),
                audio=audio,
                prompt_tokens_by_modality=by_modality,
                warnings=warnings,
                finish_reason="stop" if ended or generated.numel() < max_new_tokens else "length",
                inputs=described,
            )
        finally:
            if self.settings.empty_cuda_cache and torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _decoding(self, request: GenerationRequest) -> dict[str, Any]:
        """Sampling, stop strings, the cooperative stop and the streamer, as generate() arguments."""
        sampling = self.sampling(request)
        decoding: dict[str, Any] = {"do_sample": sampling["temperature"] > 0}
        if sampling["temperature"] > 0:
            decoding.update(temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=sampling["top_k"])
            if "min_p" in sampling:
                decoding["min_p"] = sampling["min_p"]
        if "repetition_penalty" in sampling:
            decoding["repetition_penalty"] = sampling["repetition_penalty"]
        criteria = StoppingCriteriaList()
        if request.stop_strings:  # not generate()'s stop_strings: those build tables over the whole vocabulary
            criteria.append(StopAtStopStrings(self.processor.tokenizer, request.stop_strings))
        if request.stop is not None:
            criteria.append(StopWhenSet(request.stop))
        if criteria:
            decoding["stopping_criteria"] = criteria
        if request.on_text is not None:
            decoding["streamer"] = TextDeltas(self.processor.tokenizer, request.on_text, request.stop_strings)
        return decoding

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
