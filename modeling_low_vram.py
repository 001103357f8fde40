"""Qwen2.5-Omni's lifetime: where each component lives, loading, and generation on one owner thread.

Users name components, never module paths: `language_model`, `lm_head`, `visual`, `audio_tower`,
`talker`, `token2wav`. They are resolved against the model's real module tree, so the device map
keeps working when transformers moves modules around (as 5.x did: `thinker.visual` became
`thinker.model.visual`). No web framework here: the API calls `OmniEngine.generate` through a
`ModelWorker`, the single thread that owns the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from PIL import Image

from settings import Settings

logger = logging.getLogger(__name__)

# Component name -> module paths it may have, newest layout first.
COMPONENT_PATHS: dict[str, tuple[str, ...]] = {
    "language_model": ("thinker.model.language_model", "thinker.model"),
    "lm_head": ("thinker.lm_head",),
    "visual": ("thinker.model.visual", "thinker.visual"),
    "audio_tower": ("thinker.model.audio_tower", "thinker.audio_tower"),
    "talker": ("talker",),
    "token2wav": ("token2wav",),
}
COMPONENTS = tuple(COMPONENT_PATHS)
SPEECH_COMPONENTS = ("talker", "token2wav")
PRESETS: dict[str, dict[str, str]] = {
    "gpu": dict.fromkeys(COMPONENTS, "cuda"),
    "low-vram": {**dict.fromkeys(COMPONENTS, "cuda"), "visual": "cpu", "audio_tower": "cpu"},
    "cpu": dict.fromkeys(COMPONENTS, "cpu"),
}
# The official system prompt: the talker only speaks under it.
OFFICIAL_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)
IMAGE_PATCH_SIZE = 14


class ConfigError(ValueError):
    """A setting that cannot work; the message names the variable and what to set."""


class ModelLoadError(RuntimeError):
    """The checkpoint could not be loaded; the message says what to set."""


# ---------------------------------------------------------------- placement


def parse_device_map(value: str) -> dict[str, str] | None:
    """DEVICE_MAP as component -> device; None for 'auto' (decided once the hardware is known)."""
    value = value.strip()
    if value == "auto":
        return None
    if value in PRESETS:
        return dict(PRESETS[value])
    if not value.startswith("{"):
        raise ConfigError(
            f"DEVICE_MAP={value!r} is not a preset ({', '.join(['auto', *PRESETS])}) or a JSON object"
        )
    try:
        mapping = json.loads(value)
    except json.JSONDecodeError as error:
        raise ConfigError(f"DEVICE_MAP is not valid JSON: {error}") from None
    if not isinstance(mapping, dict):
        raise ConfigError("DEVICE_MAP must be a JSON object mapping components to devices")
    unknown = sorted(set(mapping) - set(COMPONENTS))
    if unknown:
        raise ConfigError(f"DEVICE_MAP names unknown component(s) {unknown}; valid: {', '.join(COMPONENTS)}")
    placement = dict(PRESETS["cpu"])
    for component, device in mapping.items():
        placement[component] = _check_device(component, device)
    return placement


def _check_device(component: str, device: Any) -> str:
    if not isinstance(device, str):
        raise ConfigError(f"DEVICE_MAP: device for {component} must be a string like 'cpu' or 'cuda:0'")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"DEVICE_MAP: {component} -> {device!r} is not a device (use 'cpu', 'cuda' or 'cuda:N')") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"DEVICE_MAP: {component} -> {device!r}: only cpu and cuda devices are supported")
    return device


def resolve_placement(settings: Settings, cuda_available: bool | None = None) -> dict[str, str]:
    """Component -> device for these settings on this machine; refuses cuda where there is none."""
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    placement = parse_device_map(settings.device_map)
    if placement is None:
        placement = dict(PRESETS["low-vram" if cuda_available else "cpu"])
    if not cuda_available:
        on_gpu = sorted(c for c, d in placement.items() if d.startswith("cuda"))
        if on_gpu:
            raise ConfigError(
                f"DEVICE_MAP={settings.device_map!r} puts {', '.join(on_gpu)} on cuda, but no CUDA GPU is "
                "available; use DEVICE_MAP=cpu or auto"
            )
    if not settings.enable_audio_output:
        placement = {c: d for c, d in placement.items() if c not in SPEECH_COMPONENTS}
    return placement


def resolve_dtype(settings: Settings, placement: dict[str, str]) -> torch.dtype:
    """DTYPE as a torch dtype: auto is bf16 where the GPU supports it, else fp16; fp32 on CPU only."""
    if settings.dtype != "auto":
        return getattr(torch, settings.dtype)
    if any(d.startswith("cuda") for d in placement.values()):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_attention(settings: Settings, placement: dict[str, str]) -> str:
    """The attention kernel: flash_attention_2 only where installed and everything is on a GPU."""
    wanted = settings.attn_implementation
    if wanted != "flash_attention_2":
        return wanted
    if importlib.util.find_spec("flash_attn") is None:
        logger.warning("ATTN_IMPLEMENTATION=flash_attention_2 but flash-attn is not installed; using sdpa")
        return "sdpa"
    on_cpu = sorted(c for c, d in placement.items() if d == "cpu")
    if on_cpu:
        logger.warning("flash_attention_2 cannot run %s on the CPU; using sdpa", ", ".join(on_cpu))
        return "sdpa"
    return wanted


def module_device_map(model: torch.nn.Module, placement: dict[str, str]) -> dict[str, str]:
    """Component placement as accelerate's module-path device map, resolved on `model`'s real tree."""
    device_map = {}
    for component, device in placement.items():
        path = find_component(model, component)
        if path is not None:
            device_map[path] = device
    return device_map


def find_component(model: torch.nn.Module, component: str) -> str | None:
    """The module path of `component` in this model, or None when the model lacks it."""
    for path in COMPONENT_PATHS[component]:
        with contextlib.suppress(AttributeError):
            model.get_submodule(path)
            return path
    return None


# ---------------------------------------------------------------- requests and results


@dataclass
class VideoInput:
    frames: list[Image.Image]
    fps: float
    audio: np.ndarray | None = None  # its own audio track, 16 kHz mono, given with the video


@dataclass
class GenerationRequest:
    text: str | None
    system_prompt: str
    images: list[Image.Image] = field(default_factory=list)
    audios: list[np.ndarray] = field(default_factory=list)
    videos: list[VideoInput] = field(default_factory=list)
    max_new_tokens: int = 512


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    timings_ms: dict[str, float]


# ---------------------------------------------------------------- the engine


class OmniEngine:
    """A loaded Qwen2.5-Omni and its processor; `generate` must run on the model's owner thread."""

    def __init__(self, model, processor, settings: Settings, placement: dict[str, str], dtype: torch.dtype):
        self.model = model
        self.processor = processor
        self.settings = settings
        self.placement = placement
        self.dtype = dtype
        tokenizer = processor.tokenizer
        self._stop_ids = sorted({i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")) if isinstance(i, int) and i >= 0})
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self._stop_ids[0]

    @classmethod
    def load(cls, settings: Settings) -> OmniEngine:
        """Load MODEL_PATH with the configured placement and dtype (weights from disk or the hub)."""
        from transformers import AutoConfig, Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor

        placement = resolve_placement(settings)
        dtype = resolve_dtype(settings, placement)
        attention = resolve_attention(settings, placement)
        if settings.cpu_threads:
            torch.set_num_threads(settings.cpu_threads)
        config = load_config(settings.model_path)
        config.enable_audio_output = settings.enable_audio_output
        with _init_empty_weights():
            skeleton = Qwen2_5OmniForConditionalGeneration(config)
        device_map = module_device_map(skeleton, placement)
        del skeleton
        logger.info("loading %s: %s, dtype %s, attention %s", settings.model_path, device_map, dtype, attention)
        try:
            model = Qwen2_5OmniForConditionalGeneration.from_pretrained(
                settings.model_path,
                config=config,
                dtype=dtype,
                device_map=device_map,
                attn_implementation=attention,
            ).eval()
            processor = Qwen2_5OmniProcessor.from_pretrained(settings.model_path)
        except (OSError, ValueError) as error:
            raise ModelLoadError(
                f"could not load the checkpoint at MODEL_PATH={settings.model_path!r}: {error}"
            ) from error
        return cls(model, processor, settings, placement, dtype)

    # -- description

    def describe(self) -> dict[str, Any]:
        devices = sorted(set(self.placement.values()))
        return {
            "model": self.settings.model_path,
            "dtype": str(self.dtype).removeprefix("torch."),
            "devices": devices,
            "placement": self.placement,
            "audio_output": self.settings.enable_audio_output,
        }

    # -- generation

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Build the prompt, run the processor and the thinker; returns the decoded answer."""
        started = time.perf_counter()
        inputs, use_audio_in_video = self._prepare(request)
        prepared = time.perf_counter()
        with torch.inference_mode():
            sequences = self.model.thinker.generate(
                **inputs,
                use_audio_in_video=use_audio_in_video,
                max_new_tokens=request.max_new_tokens,
                do_sample=False,
                eos_token_id=self._stop_ids,
                pad_token_id=self._pad_id,
            )
        generated = sequences[0, inputs["input_ids"].shape[1]:]
        text = self.processor.tokenizer.decode(generated, skip_special_tokens=True)
        finished = time.perf_counter()
        return GenerationResult(
            text=text,
            prompt_tokens=int(inputs["input_ids"].shape[1]),
            completion_tokens=int(generated.numel()),
            timings_ms={"prepare": (prepared - started) * 1000, "generate": (finished - prepared) * 1000},
        )

    def _prepare(self, request: GenerationRequest) -> tuple[dict[str, Any], bool]:
        """The processor's tensors for `request`, on the thinker's input device."""
        from qwen_omni_utils.v2_5.vision_process import fetch_image, fetch_video

        s = self.settings
        content: list[dict[str, Any]] = [{"type": "image"} for _ in request.images]
        content += [{"type": "audio"} for _ in request.audios]
        videos = _common_rate(request.videos)
        # The model interleaves a video's audio with its frames only when every video has audio.
        use_audio_in_video = bool(videos) and all(v.audio is not None for v in videos)
        audios = list(request.audios)
        audio_slots: list[int | None] = [None] * len(audios)
        for index, video in enumerate(videos):
            content.append({"type": "video"})
            if video.audio is not None:
                audios.append(video.audio)
                if use_audio_in_video:
                    audio_slots.append(index)
                else:  # mixed silent and sounding videos: each track follows its video as plain audio
                    content.append({"type": "audio"})
                    audio_slots.append(None)
        if request.text:
            content.append({"type": "text", "text": request.text})
        conversation = [
            {"role": "system", "content": [{"type": "text", "text": request.system_prompt}]},
            {"role": "user", "content": content},
        ]
        prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        images = [
            fetch_image({"image": image, "min_pixels": s.image_min_pixels, "max_pixels": s.image_max_pixels},
                        image_patch_size=IMAGE_PATCH_SIZE)
            for image in request.images
        ]
        video_tensors = [
            fetch_video({"video": v.frames, "sample_fps": v.fps, "min_pixels": s.video_min_pixels,
                         "max_pixels": s.video_max_pixels, "total_pixels": s.video_total_pixels},
                        image_patch_size=IMAGE_PATCH_SIZE)
            for v in videos
        ]
        kwargs: dict[str, Any] = {}
        if audios:
            # Whisper pads every clip to 300 s by default; pad only to the longest clip (whole 2 s windows).
            window = 2 * self.processor.feature_extractor.sampling_rate
            longest = max(len(a) for a in audios)
            kwargs["audio_kwargs"] = {"max_length": max(window, -(-longest // window) * window)}
        if images:
            kwargs["images_kwargs"] = {"do_resize": False}  # fetch_image already sized them
        if video_tensors:
            kwargs["videos_kwargs"] = {
                "fps": videos[0].fps, "do_resize": False, "do_sample_frames": False, "cap_pixels_per_frame": False,
            }
        if use_audio_in_video:
            kwargs.update(load_audio_from_video=True, audio_from_video_indices=audio_slots)
        inputs = self.processor(
            text=prompt,
            images=images or None,
            audio=audios or None,
            videos=video_tensors or None,
            return_tensors="pt",
            padding=True,
            **kwargs,
        )
        device = self.model.thinker.get_input_embeddings().weight.device
        tensors = {}
        for key, value in inputs.items():
            if torch.is_tensor(value):
                value = value.to(device)
                if value.is_floating_point() and key != "feature_attention_mask":
                    value = value.to(self.dtype)
            tensors[key] = value
        return tensors, use_audio_in_video


def _common_rate(videos: list[VideoInput]) -> list[VideoInput]:
    """Videos resampled to one frame rate (the processor takes one fps per request)."""
    if not videos:
        return []
    rate = min(v.fps for v in videos)
    return [
        VideoInput(frames=v.frames[:: max(1, round(v.fps / rate))], fps=rate, audio=v.audio) for v in videos
    ]


def load_config(model_path: str):
    """The checkpoint's config, with clear errors for a missing path, no network or another model."""
    from transformers import AutoConfig

    local = Path(model_path).expanduser()
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


@contextlib.contextmanager
def _init_empty_weights():
    from accelerate import init_empty_weights

    with init_empty_weights():
        yield


# ---------------------------------------------------------------- the owner thread

T = TypeVar("T")


class ModelWorker:
    """The single thread that owns the model: jobs run one at a time, in arrival order.

    A waiter that is cancelled (its client went away) only cancels its job if the job has not
    started; a running job always finishes on this thread, so two never overlap.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.running = 0
        self.peak_running = 0

    async def run(self, job: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._executor.submit(self._track, job, *args))

    def _track(self, job: Callable[..., T], *args: Any) -> T:
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        try:
            return job(*args)
        finally:
            self.running -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
