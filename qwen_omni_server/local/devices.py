"""Where each part of the model runs, and in which dtype, for these settings on this machine: the placement
from DEVICE_MAP (the planner for `auto`), the dtype from DTYPE, and the host memory they can use."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from qwen_omni_server.core.settings import MAX_BATCH_ROWS, Settings
from qwen_omni_server.local.placement import (
    GPU,
    OFFLOAD,
    PRESETS,
    SPEECH_COMPONENTS,
    ConfigError,
    GiB,
    Plan,
    build_skeleton,
    check_device,
    honest_placement,
    parse_device_map,
    plan_placement,
    runs_on_gpu,
)
from qwen_omni_server.local.prompts import (
    IMAGE_PATCH_SIZE,
)

logger = logging.getLogger(__name__)


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
        "speech_chunk_blocks": settings.speech_chunk_blocks,
        "speech_pipeline": settings.speech_pipeline,
        "batch_size": settings.max_batch_size if isinstance(settings.max_batch_size, int) else 1,
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
    """DTYPE as a torch dtype: auto is bf16 where the GPU supports it, else fp16; on the CPU, the faster of
    float32 and bfloat16 on this CPU that fits the free RAM with headroom (see `cpu_dtype`)."""
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
# DTYPE=auto on the CPU weighs the dtypes' paces over a reference request: an image at the default pixel
# budget (1,280 tokens) or a long text prompt, and a short answer.
REFERENCE_PROMPT_TOKENS = 1024
REFERENCE_ANSWER_TOKENS = 128
PREFILL_TOKENS = 64  # the prompt tokens of the measured prefill product
PACE_MATTERS_S = 0.05  # below this for a reference request in float32, the model is fast either way: float32


def cpu_dtype(
    settings: Settings,
    config,
    available_bytes: int | None = None,
    pace: Callable[[torch.dtype], MatmulPace] | None = None,
) -> tuple[torch.dtype, str]:
    """The faster of float32 and bfloat16 on this CPU (`pace`: the thinker's matrix products measured in each,
    by default `measure_matmul_pace`) of those whose all-CPU plan fits the available RAM with headroom:
    bfloat16 where float32 does not fit; and why, with the figures."""
    available = available_host_bytes() if available_bytes is None else available_bytes
    full, half = (cpu_plan(settings, config, dtype).host_bytes for dtype in (torch.float32, torch.bfloat16))
    ram = f"float32 needs {full / GiB:.1f} GiB of RAM, bfloat16 {half / GiB:.1f} GiB; {available / GiB:.1f} GiB is free"
    if full * HOST_HEADROOM > available:
        return torch.bfloat16, f"only bfloat16 fits: {ram}"
    if pace is None:
        hidden, intermediate = thinker_widths(config)
        pace = functools.partial(measure_matmul_pace, hidden=hidden, intermediate=intermediate)
    paces = {dtype: pace(dtype) for dtype in (torch.float32, torch.bfloat16)}
    seconds = {dtype: measured.reference_request_s() for dtype, measured in paces.items()}
    figures = "; ".join(f"{str(dtype).removeprefix('torch.')}: {measured}" for dtype, measured in paces.items())
    if seconds[torch.float32] < PACE_MATTERS_S:
        return torch.float32, f"the exact one, for a model this small is fast in either ({figures}); {ram}"
    faster = min(seconds, key=seconds.__getitem__)
    return faster, (
        f"the faster here: over {REFERENCE_PROMPT_TOKENS} prompt and {REFERENCE_ANSWER_TOKENS} answer tokens, "
        f"bfloat16's matrix products take x{seconds[torch.bfloat16] / seconds[torch.float32]:.2f} the time of "
        f"float32's ({figures}); {ram}"
    )


@dataclass(frozen=True)
class MatmulPace:
    """Seconds of one of the thinker's MLP products ([tokens, hidden] x [hidden, intermediate]) in one dtype:
    for a decoding step (1 token) and for a block of `prefill_tokens` prompt tokens."""

    decode_s: float
    prefill_s: float
    prefill_tokens: int = PREFILL_TOKENS

    def reference_request_s(self) -> float:
        """The product's seconds over a reference request (REFERENCE_PROMPT_TOKENS, REFERENCE_ANSWER_TOKENS)."""
        return REFERENCE_PROMPT_TOKENS / self.prefill_tokens * self.prefill_s + REFERENCE_ANSWER_TOKENS * self.decode_s

    def __str__(self) -> str:
        decode, prefill = self.decode_s * 1000, self.prefill_s * 1000
        return f"{decode:.3g} ms a decoding step, {prefill:.3g} ms a {self.prefill_tokens}-token prefill"


def thinker_widths(config) -> tuple[int, int]:
    """The thinker's decoder widths: hidden and MLP intermediate sizes."""
    text = config.thinker_config.text_config
    return text.hidden_size, text.intermediate_size


def measure_matmul_pace(
    dtype: torch.dtype, hidden: int, intermediate: int, tokens: int = PREFILL_TOKENS, seconds: float = 0.1
) -> MatmulPace:
    """The thinker's MLP up-projection timed on this CPU in `dtype`, laid out as its nn.Linear lays it out
    (the layout changes the kernel and its pace; the values do not): for one token and for `tokens`, the
    best of the runs in `seconds` (at least two each, at most ten)."""
    weight = torch.full((intermediate, hidden), 0.01, dtype=dtype)
    step, block = (torch.full((rows, hidden), 0.5, dtype=dtype) for rows in (1, tokens))
    with torch.inference_mode():
        decode = _best_seconds(lambda: torch.nn.functional.linear(step, weight), seconds, most_runs=10)
        prefill = _best_seconds(lambda: torch.nn.functional.linear(block, weight), seconds, most_runs=10)
    return MatmulPace(decode, prefill, tokens)


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


def batch_size_for(
    settings: Settings, config, placement: Placement, dtype: torch.dtype, available_bytes: int | None = None
) -> int:
    """MAX_BATCH_SIZE, `auto` resolved: the most rows (up to MAX_BATCH_ROWS) whose caches at MAX_CONTEXT_TOKENS
    the placement's memory admits, on the GPU (its budget) or, all on the CPU, in the free RAM with headroom."""
    if isinstance(settings.max_batch_size, int):
        return settings.max_batch_size
    config = copy.deepcopy(config)
    config.enable_audio_output = settings.enable_audio_output
    skeleton = build_skeleton(config)
    on_gpu = runs_on_cuda(placement.components, settings)
    budget = _gpu_budget(settings) if on_gpu else 0
    chosen = {c: GPU if d == settings.gpu_device else d for c, d in placement.components.items()}
    if not on_gpu:
        available = available_host_bytes() if available_bytes is None else available_bytes

    def fits(rows: int) -> bool:
        plan = plan_placement(
            config,
            budget,
            dtype,
            audio_output=settings.enable_audio_output,
            skeleton=skeleton,
            placement=chosen,
            gpu_layers=placement.gpu_layers,
            quantization=settings.quantization,
            **{**planning_budgets(settings), "batch_size": rows},
        )
        return plan.fits if on_gpu else plan.host_bytes * HOST_HEADROOM <= available

    rows = largest(fits, MAX_BATCH_ROWS)
    logger.info("MAX_BATCH_SIZE=auto: %d rows (their caches at %d tokens fit)", rows, settings.max_context_tokens)
    return rows


def largest(fits: Callable[[int], bool], most: int) -> int:
    """The largest n in 1..most with fits(n) (fits holds up to some n and not after); 1 when none does."""
    low, high = 1, most
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


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


# ---------------------------------------------------------------- the CPU's pace


def cpu_matmul_flops(dtype: torch.dtype, seconds: float = 0.3) -> float:
    """Measured multiply-add throughput of this CPU in `dtype` (FLOP/s), on a decoder-sized product."""
    a = torch.randn(256, 2048).to(dtype)
    b = torch.randn(2048, 2048).to(dtype)
    with torch.inference_mode():
        return 2 * 256 * 2048 * 2048 / _best_seconds(lambda: a @ b, seconds)


def _best_seconds(run: Callable[[], object], seconds: float, most_runs: int | None = None) -> float:
    """The shortest of the runs of `run` made within `seconds` (at least two, at most `most_runs`), after one
    that warms up."""
    run()
    best, runs, deadline = float("inf"), 0, time.perf_counter() + seconds
    while runs < 2 or (time.perf_counter() < deadline and runs != most_runs):
        started = time.perf_counter()
        run()
        best, runs = min(best, time.perf_counter() - started), runs + 1
    return best


def cpu_image_seconds(model: Any, pixels: int, flops: float) -> float:
    """About how long the CPU takes to encode one image of `pixels` and read it into the thinker
    (two FLOPs per weight per patch in the vision encoder, per token in the language model)."""
    thinker = model.thinker
    patches = pixels / 14**2
    vision = sum(p.numel() for p in thinker.model.visual.parameters())
    language = sum(p.numel() for p in thinker.model.language_model.layers.parameters())
    return (2 * vision * patches + 2 * language * patches / 4) / flops


def cpu_budgets(settings: Settings, model: Any, dtype: torch.dtype) -> tuple[dict[str, int], str]:
    """What an image and a video cost on this CPU at the current budgets, and, for budgets left at
    their defaults, smaller ones that finish within half of REQUEST_TIMEOUT_SECONDS."""
    flops = cpu_matmul_flops(dtype)
    limit = settings.request_timeout_seconds / 2
    updates: dict[str, int] = {}
    said = [f"the CPU multiplies {str(dtype).removeprefix('torch.')} at {flops / 1e9:.0f} GFLOP/s"]
    for name in ("image_max_pixels", "video_total_pixels"):
        pixels = getattr(settings, name)
        seconds = cpu_image_seconds(model, pixels, flops)
        said.append(f"{name.upper()}={pixels} costs about {seconds:.0f} s")
        if seconds > limit:
            fitted = max(28 * 28, int(pixels * limit / seconds) // (28 * 28) * (28 * 28))
            if name in settings.model_fields_set:
                said.append(f"over half of REQUEST_TIMEOUT_SECONDS={settings.request_timeout_seconds:g}: set {fitted}")
            else:
                updates[name] = fitted
                said.append(f"lowered to {fitted} to finish within REQUEST_TIMEOUT_SECONDS")
    return updates, "; ".join(said)
