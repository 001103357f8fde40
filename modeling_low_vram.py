"""Qwen2.5-Omni's lifetime: placement from settings, loading, and generation on one owner thread.

Component names, presets and the memory planner live in `placement.py`; this module turns the
settings into a placement on this machine, loads the checkpoint with it, and generates. No web
framework here: the API calls `OmniEngine.generate` through a `ModelWorker`, the single thread
that owns the model.

    python modeling_low_vram.py plan --model 3b --gpu-gib 8 [--json]    # 3b, 7b, a checkpoint or config.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import StoppingCriteriaList

from generation import SPEECH_SAMPLE_RATE, Cancelled, GenerationRequest, GenerationResult, SpeechError, cut_at_stop
from placement import (
    COMPONENT_PATHS,
    CPU,
    ENCODERS,
    GPU,
    OFFLOAD,
    PRESETS,
    SPEECH_COMPONENTS,
    ConfigError,
    GiB,
    Plan,
    attention_for,
    build_skeleton,
    check_device,
    honest_placement,
    module_device_map,
    find_component,
    parse_device_map,
    plan_placement,
    runs_on_gpu,
)
from residency import (
    cpu_budgets,
    keep_last_logits,
    make_resident,
    recovers_from_out_of_memory,
    run_on_cpu,
    warm_up,
)
from prompts import OFFICIAL_SYSTEM_PROMPT  # noqa: F401 - where the speech side has always found it
from prompts import IMAGE_PATCH_SIZE, MediaTokenIds, PromptBuilder
import quantization
from settings import Settings
from speech import (
    NO_SPEECH_WARNING,
    FirstTokens,
    Stopped,
    Token2Wav,
    spoken_token_count,
    talk,
    talker_inputs,
)
from streaming import StopWhenSet, TextDeltas

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parent / "configs"
MODEL_SHORTHANDS = {  # architecture configs carried in the repository: plans need no download
    "3b": CONFIGS / "qwen2.5-omni-3b.config.json",
    "7b": CONFIGS / "qwen2.5-omni-7b.derived.config.json",
}
# Sampling fields of a checkpoint's generation_config that apply when a request leaves them unset (as vLLM).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "min_p")
# What an unset field means when the checkpoint does not set it either (OpenAI's and vLLM's defaults).
SAMPLING_FALLBACKS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}


class TalkerTokenIdNotes(logging.Filter):
    """Drops transformers' "<name> must be `None` or an integer within the vocabulary" notes about the talker
    config's text-side token ids, which are wrong: the validation (configuration_utils.validate_token_ids)
    checks every `*_token_id` against the config's own vocabulary, the talker's 8448 codec codes, but these
    ids index the thinker's vocabulary: the talker embeds tts_text_* with the thinker's embedding table and
    finds vision/audio starts in the thinker's input_ids. Any other such note still shows."""

    TALKER_TEXT_IDS = re.compile(
        r"Model config: (tts_text_(start|end|pad)|(vision|audio)_(start|end))_token_id must be `None` or an "
        r"integer within the vocabulary"
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.TALKER_TEXT_IDS.match(record.getMessage())


logging.getLogger("transformers.configuration_utils").addFilter(TalkerTokenIdNotes())


class ModelLoadError(RuntimeError):
    """The checkpoint could not be loaded; the message says what to set."""


# ---------------------------------------------------------------- placement from settings


@dataclass
class Placement:
    components: dict[str, str]  # component -> device, or "split" for a language model across GPU and CPU
    gpu_layers: int | None = None  # decoder layers on the GPU when split
    plan: Plan | None = None  # the planner's reasoning, when DEVICE_MAP=auto used it


def uses_gpu_device(settings: Settings) -> bool:
    return settings.gpu_device.startswith("cuda")


def check_placement_settings(settings: Settings, cuda_available: bool | None = None) -> dict[str, str] | None:
    """Validate DEVICE_MAP and GPU_DEVICE before anything loads; the parsed map (None for auto)."""
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    check_device("GPU_DEVICE", settings.gpu_device)
    placement = parse_device_map(settings.device_map)
    if placement is None:
        return None
    needs_cuda = sorted(
        c for c, d in placement.items() if (settings.gpu_device if d in (GPU, OFFLOAD) else d).startswith("cuda")
    )
    if needs_cuda and not cuda_available:
        raise ConfigError(
            f"DEVICE_MAP={settings.device_map!r} puts {', '.join(needs_cuda)} on cuda, but no CUDA GPU is "
            "available; use DEVICE_MAP=cpu or auto"
        )
    return placement


def resolve_placement(settings: Settings, config=None, cuda_available: bool | None = None) -> Placement:
    """Component -> device for these settings on this machine ('auto' asks the planner)."""
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    chosen = check_placement_settings(settings, cuda_available)
    gpu_usable = cuda_available or not uses_gpu_device(settings)  # a cpu GPU_DEVICE stands in for tests
    plan = None
    if chosen is None and not gpu_usable:
        chosen = dict(PRESETS["cpu"])
    elif chosen is None:
        if config is None:
            raise ConfigError("DEVICE_MAP=auto needs the model's config to plan")
        budget = _gpu_budget(settings)
        plan = plan_placement(
            copy.deepcopy(config),
            budget,
            resolve_dtype(settings, uses_gpu=True),
            audio_output=settings.enable_audio_output,
            **planning_budgets(settings),
            quantization=settings.quantization,
        )
        if plan.fits:
            chosen = dict(plan.placement)
        else:
            logger.warning(
                "DEVICE_MAP=auto: the model does not fit in %.1f GiB of GPU memory; running on the CPU", budget / GiB
            )
            chosen = dict(PRESETS["cpu"])
            plan = None
    components = {c: settings.gpu_device if d == GPU else d for c, d in chosen.items()}
    if not settings.enable_audio_output:
        components = {c: d for c, d in components.items() if c not in SPEECH_COMPONENTS}
    components, notes = honest_placement(components, runs_on_cuda(components, settings))
    for note in notes:
        logger.warning("DEVICE_MAP: %s", note)
    gpu_layers = plan.language_model_layers["gpu"] if plan and plan.language_model_layers else None
    return Placement(components, gpu_layers, plan)


def runs_on_cuda(components: dict[str, str], settings: Settings) -> bool:
    """Whether any component computes on a CUDA GPU (offloaded and split ones do)."""
    return any(d.startswith("cuda") or (runs_on_gpu(d) and uses_gpu_device(settings)) for d in components.values())


def planning_budgets(settings: Settings) -> dict[str, Any]:
    """The largest request the settings allow, as the planner's arguments."""
    return {
        "context_tokens": settings.max_context_tokens,
        "max_visual_patches": largest_visual_patches(settings),
        "max_audio_seconds": settings.max_audio_seconds * settings.max_files_per_field,
        "max_speech_seconds": settings.max_speech_seconds,
    }


def largest_visual_patches(settings: Settings) -> int:
    """The most vision-encoder patches one request can bring under the pixel budgets (14x14 pixels each;
    a video's patches span two frames, so its budget counts once)."""
    per_image = max(settings.image_max_pixels, settings.max_pixels_ceiling) // IMAGE_PATCH_SIZE**2
    per_video = settings.video_total_pixels // IMAGE_PATCH_SIZE**2
    # Split videos turn into one frame each, never more patches than the video itself.
    return settings.max_files_per_field * (per_image + per_video)


def _gpu_budget(settings: Settings) -> int:
    if settings.gpu_memory_gib:
        return int(settings.gpu_memory_gib * GiB)
    free, _ = torch.cuda.mem_get_info(torch.device(settings.gpu_device))
    return int(free)


def resolve_dtype(settings: Settings, uses_gpu: bool, config=None) -> torch.dtype:
    """DTYPE as a torch dtype: auto is bf16 where the GPU supports it, else fp16; on the CPU, float32
    where the whole model fits the free RAM with headroom (see `cpu_dtype`), else bfloat16."""
    if settings.dtype != "auto":
        return getattr(torch, settings.dtype)
    if uses_gpu and torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if uses_gpu:
        return torch.float16
    if config is None:
        return torch.float32
    return cpu_dtype(settings, config)[0]


HOST_HEADROOM = 1.15  # what DTYPE=auto leaves free beyond the plan's host RAM, as a factor


def cpu_dtype(settings: Settings, config, available_bytes: int | None = None) -> tuple[torch.dtype, str]:
    """float32 where the all-CPU plan in float32 fits the available RAM with headroom (fast on every
    CPU), else bfloat16 (half the memory; slow on CPUs without AVX512-BF16/AMX); and why."""
    available = available_host_bytes() if available_bytes is None else available_bytes
    needed = cpu_plan(settings, config, torch.float32).host_bytes
    if needed * HOST_HEADROOM <= available:
        return torch.float32, f"float32 needs {needed / GiB:.1f} GiB of RAM, {available / GiB:.1f} GiB is available"
    half = cpu_plan(settings, config, torch.bfloat16).host_bytes
    return torch.bfloat16, (
        f"float32 would need {needed / GiB:.1f} GiB of RAM, only {available / GiB:.1f} GiB is available: "
        f"bfloat16 needs {half / GiB:.1f} GiB (slower on CPUs without AVX512-BF16/AMX; set DTYPE to choose)"
    )


def cpu_plan(settings: Settings, config, dtype: torch.dtype) -> Plan:
    """The all-CPU placement's costs, host RAM included."""
    config = copy.deepcopy(config)
    return plan_placement(
        config,
        0,
        dtype,
        audio_output=settings.enable_audio_output,
        placement=dict(PRESETS["cpu"]),
        **planning_budgets(settings),
        quantization=settings.quantization,
    )


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (free RAM the kernel can hand out), else the total."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as meminfo:
            line = next(line for line in meminfo if line.startswith("MemAvailable:"))
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_in_use() -> dict[str, int]:
    """Process RSS, and on CUDA the memory torch has allocated now and at its peak."""
    report = {"rss_bytes": _rss_bytes()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        report["gpu_allocated_bytes"] = int(torch.cuda.memory_allocated())
        report["gpu_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    return report


def _rss_bytes() -> int:
    with contextlib.suppress(OSError):
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------- the engine


class OmniEngine:
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
        self.sampling_defaults = sampling_defaults(getattr(model, "generation_config", None))
        self._description = self._describe()
        self.startup: dict[str, float] = {}  # load and warm-up seconds, set by `load`

    @classmethod
    def load(cls, settings: Settings) -> OmniEngine:
        """Load MODEL_PATH with the configured placement and dtype (weights from disk or the hub), copy
        the weights into memory and warm every component up: loaded means ready to serve at full pace."""
        from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor

        started = time.perf_counter()
        if settings.cpu_threads:
            torch.set_num_threads(settings.cpu_threads)
        config = load_config(settings.model_path)
        config.enable_audio_output = settings.enable_audio_output
        placement = resolve_placement(settings, config)
        if placement.plan is not None:
            logger.info("DEVICE_MAP=auto planned:\n%s", placement.plan.table())
        uses_gpu = runs_on_cuda(placement.components, settings)
        if uses_gpu or settings.dtype != "auto":
            dtype = resolve_dtype(settings, uses_gpu)
        else:
            dtype, why = cpu_dtype(settings, config)
            logger.info("DTYPE=auto on the CPU: %s (%s)", str(dtype).removeprefix("torch."), why)
        attention = attention_for(settings.attn_implementation, placement.components)
        device_map = module_device_map(
            build_skeleton(config), placement.components, placement.gpu_layers, settings.gpu_device
        )
        quantization_config = _quantization_config(settings, config, dtype, device_map)
        logger.info("loading %s: %s, dtype %s, attention %s", settings.model_path, device_map, dtype, attention)
        try:
            model = Qwen2_5OmniForConditionalGeneration.from_pretrained(
                settings.model_path,
                config=config,
                dtype=dtype,
                device_map=device_map,
                attn_implementation=attention,
                quantization_config=quantization_config,
            ).eval()
            scheme = quantization.loaded_scheme(config, settings.quantization)
            quantization.check_loaded(model, scheme, find_component(model, "language_model"))
            processor = Qwen2_5OmniProcessor.from_pretrained(settings.model_path)
        except (OSError, ValueError) as error:
            raise ModelLoadError(
                f"could not load the checkpoint at MODEL_PATH={settings.model_path!r}: {error}"
            ) from error
        for encoder in ENCODERS:
            if uses_gpu and placement.components.get(encoder) == CPU:
                run_on_cpu(model.get_submodule(find_component(model, encoder)))
        keep_last_logits(model.thinker.lm_head)
        resident = make_resident(model)
        if not uses_gpu:
            updates, cost = cpu_budgets(settings, model, dtype)
            logger.info("on the CPU: %s", cost)
            settings = settings.model_copy(update=updates) if updates else settings
        engine = cls(model, processor, settings, placement, dtype)
        loaded = time.perf_counter()
        engine.startup = {
            "load_seconds": round(loaded - started, 2),
            "warmup_seconds": round(warm_up(engine), 2),
            "resident_bytes": resident,
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
        """The talker's length bound: MAX_SPEECH_SECONDS in codes (each code is `repeats` mel frames)."""
        token2wav = self.model.config.token2wav_config
        samples_per_code = token2wav.dit_config.repeats * math.prod(token2wav.bigvgan_config.upsample_rates)
        return max(1, int(self.settings.max_speech_seconds * SPEECH_SAMPLE_RATE / samples_per_code))

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
            with torch.inference_mode():
                if request.seed is not None:
                    torch.manual_seed(request.seed)
                if speaker is None:
                    sequences = self.model.thinker.generate(
                        **inputs,
                        use_audio_in_video=use_audio_in_video,
                        max_new_tokens=request.max_new_tokens,
                        eos_token_id=self._stop_ids,
                        pad_token_id=self._pad_id,
                        **self._decoding(request),
                    )
                else:
                    sequences, audio, spoken_warnings = self._generate_speech(
                        inputs, use_audio_in_video, request, speaker
                    )
                    warnings = warnings + spoken_warnings
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
        if request.stop_strings:
            decoding.update(stop_strings=request.stop_strings, tokenizer=self.processor.tokenizer)
        if request.stop is not None:
            decoding["stopping_criteria"] = StoppingCriteriaList([StopWhenSet(request.stop)])
        if request.on_text is not None:
            decoding["streamer"] = TextDeltas(self.processor.tokenizer, request.on_text, request.stop_strings)
        return decoding

    def sampling(self, request: GenerationRequest) -> dict[str, float]:
        """The request's sampling values; each one it leaves unset comes from the checkpoint's generation_config."""
        given = {"temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k}
        values = {**SAMPLING_FALLBACKS, **self.sampling_defaults}
        values.update({name: value for name, value in given.items() if value is not None})
        return values

    def _generate_speech(
        self, inputs: dict[str, Any], use_audio_in_video: bool, request: GenerationRequest, speaker: str
    ) -> tuple[torch.Tensor, np.ndarray | None, list[str]]:
        """Thinker, then talker and token2wav over the text that is returned: the answer's tokens, its
        waveform (None when it went to `request.on_audio` chunk by chunk, or when there is no sound),
        and warnings."""
        limit = request.max_new_tokens
        decoding = self._decoding(request)
        if "streamer" in decoding:
            decoding["streamer"] = FirstTokens(decoding["streamer"], limit)
        # One step more than the answer may have: that step computes the last answer token's hidden state.
        output = self.model.thinker.generate(
            **inputs,
            use_audio_in_video=use_audio_in_video,
            max_new_tokens=limit + 1,
            eos_token_id=self._stop_ids,
            pad_token_id=self._pad_id,
            output_hidden_states=True,
            return_dict_in_generate=True,
            **decoding,
        )
        prompt = inputs["input_ids"].shape[1]
        sequences = output.sequences[:, : prompt + limit]
        generated = sequences[0, prompt:].tolist()
        tokenizer = self.processor.tokenizer
        text, _ = cut_at_stop(tokenizer.decode(generated, skip_special_tokens=True), request.stop_strings)
        spoken = min(spoken_token_count(tokenizer, generated, text, self._stop_ids), len(output.hidden_states) - 1)
        stop = request.stop or threading.Event()
        if stop.is_set():
            return sequences, None, []
        if spoken == 0:
            return sequences, None, [NO_SPEECH_WARNING]
        arguments = talker_inputs(
            self.model, inputs, use_audio_in_video, output, spoken, self.model.speaker_map[speaker]["bos_token"]
        )
        del output  # every layer's hidden states of every step: the talker has what it needs
        max_codes = self.max_speech_codes()
        synthesis = Token2Wav(self.model, speaker, seed=request.seed, stop=stop)
        chunked = None
        if request.on_audio is not None:
            chunked = synthesis.chunked(self.settings.speech_chunk_blocks, request.on_audio)
        try:
            codes = talk(self.model, arguments, max_codes, chunked.add if chunked else lambda codes: None, stop)
            if codes.dropped:
                logger.info("the talker sampled %d codes that are not speech; token2wav skipped them", codes.dropped)
            if stop.is_set():
                return sequences, None, []
            if not codes.codes:
                return sequences, None, [NO_SPEECH_WARNING]
            if chunked is not None:
                chunked.finish()
                return sequences, None, []
            return sequences, synthesis.whole(codes.codes), []
        except Stopped:  # given up while token2wav ran: nobody waits for this answer any more
            return sequences, None, []

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


def _quantization_config(settings: Settings, config, dtype: torch.dtype, device_map: dict[str, str]):
    """QUANTIZATION's BitsAndBytesConfig (None for none); a ConfigError for what cannot load here."""
    try:
        quantization.check_prequantized(config, settings.quantization)
        quantization.adapt_prequantized(config, quantization.kept_module_paths(COMPONENT_PATHS))
        language_model_device = next(
            (d for path, d in device_map.items() if path.startswith(COMPONENT_PATHS["language_model"][0])), "cpu"
        )
        quantization.check_bitsandbytes(settings.quantization, language_model_device, dtype)
        return quantization.bitsandbytes_config(
            settings.quantization, dtype, quantization.kept_module_paths(COMPONENT_PATHS), device_map.values()
        )
    except quantization.QuantizationError as error:
        raise ConfigError(str(error)) from None


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


def _config_from_json(path: Path):
    from transformers import Qwen2_5OmniConfig

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path}: not a readable JSON config ({error})") from None
    if data.get("model_type") != "qwen2_5_omni":
        raise ModelLoadError(f"{path} describes a {data.get('model_type')!r} model, not Qwen2.5-Omni")
    return Qwen2_5OmniConfig.from_dict(data)


def load_config(model_path: str):
    """The checkpoint's config, with clear errors for a missing path, no network or another model."""
    from transformers import AutoConfig

    local = Path(model_path).expanduser()
    if local.is_file() and local.suffix == ".json":
        return _config_from_json(local)
    looks_local = local.exists() or model_path.startswith((".", "/", "~")) or model_path.count("/") > 1
    if looks_local and not local.is_dir():
        raise ModelLoadError(
            f"MODEL_PATH={model_path!r} is not a folder. Set MODEL_PATH to a Qwen2.5-Omni checkpoint folder "
            "or a hub id such as Qwen/Qwen2.5-Omni-3B."
        )
    if looks_local and not (local / "config.json").is_file():
        raise ModelLoadError(
            f"MODEL_PATH={model_path!r}: the folder has no config.json, so it is not a Transformers checkpoint. "
            "Point MODEL_PATH at a Qwen2.5-Omni checkpoint folder (or build one: python tests/tiny_model.py DIR)."
        )
    try:
        config = AutoConfig.from_pretrained(str(local) if looks_local else model_path)
    except OSError as error:
        raise ModelLoadError(
            f"MODEL_PATH={model_path!r}: the checkpoint could not be read or downloaded (no network, or no such "
            "repository). Download it first and set MODEL_PATH to the local folder. "
            f"({str(error).splitlines()[0]})"
        ) from None
    except ValueError as error:
        raise ModelLoadError(f"MODEL_PATH={model_path!r}: unreadable config ({str(error).splitlines()[0]})") from None
    if getattr(config, "model_type", None) != "qwen2_5_omni":
        raise ModelLoadError(
            f"MODEL_PATH={model_path!r} is a {getattr(config, 'model_type', 'unknown')!r} checkpoint, not "
            "Qwen2.5-Omni (model_type 'qwen2_5_omni'); point MODEL_PATH at Qwen2.5-Omni-3B or -7B."
        )
    return config


# ---------------------------------------------------------------- the planner's command line


def _plan_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python modeling_low_vram.py plan",
        description="Plan where Qwen2.5-Omni runs for a GPU memory budget (no GPU needed).",
    )
    parser.add_argument(
        "--model", required=True, help="3b or 7b (the configs in configs/), a checkpoint folder, hub id, or config.json"
    )
    parser.add_argument("--gpu-gib", type=float, required=True, help="GPU memory budget in GiB")
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument(
        "--device-map", default="auto", help="auto (plan), or a preset / JSON map to cost (see DEVICE_MAP)"
    )
    parser.add_argument("--audio-output", action="store_true", help="also place the talker and token2wav")
    parser.add_argument(
        "--quantization",
        default="none",
        choices=quantization.SCHEMES,
        help="the language model's weights (QUANTIZATION)",
    )
    settings = Settings()  # the budgets of this server (.env and environment), for the encoders' headroom
    parser.add_argument(
        "--context",
        type=int,
        default=settings.max_context_tokens,
        help="planning context in tokens (default MAX_CONTEXT_TOKENS)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        config = load_config(str(MODEL_SHORTHANDS.get(args.model.lower(), args.model)))
        chosen = parse_device_map(args.device_map)
    except (ModelLoadError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if chosen is not None:
        chosen, _ = honest_placement(chosen, any(runs_on_gpu(d) for d in chosen.values()))
    plan = plan_placement(
        config,
        int(args.gpu_gib * GiB),
        getattr(torch, args.dtype),
        audio_output=args.audio_output,
        placement=chosen,
        **{**planning_budgets(settings), "context_tokens": args.context},
        quantization=args.quantization,
    )
    print(json.dumps(plan.to_json(), indent=2) if args.json else plan.table())
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["plan"]:
        sys.exit(
            "usage: python modeling_low_vram.py plan --model 3b|7b|PATH_OR_CONFIG_JSON --gpu-gib N "
            "[--dtype D] [--device-map M] [--audio-output] [--quantization none|int8|nf4] [--context N] [--json]"
        )
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # the configs' token-id range notes are not for this table
    sys.exit(_plan_command(sys.argv[2:]))
