"""Where each part of Qwen2.5-Omni runs: component names, presets, and the GPU memory planner.

Users name components, never module paths: `language_model`, `lm_head`, `visual`,
`audio_tower`, `talker`, `token2wav`. They are resolved against the model's real module tree,
so a device map keeps working when transformers moves modules (5.x turned `thinker.visual`
into `thinker.model.visual`, which silently broke hard-coded maps).

The planner sizes every component from the config alone (the architecture is built on the meta
device: no weights, no GPU), reserves headroom for the KV cache and activations of the planning
context, and fills the GPU budget: encoders leave the GPU first, then the speech modules, and
the language model last, split by decoder layers when even it does not fit.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from quantization import dequantize_workspace_bytes, planning_scheme, quantized_parameter_bytes

logger = logging.getLogger(__name__)

GiB = 1024**3
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
GPU = "gpu"  # placeholder in presets, replaced by the configured GPU device (GPU_DEVICE)
PRESETS: dict[str, dict[str, str]] = {
    "gpu": dict.fromkeys(COMPONENTS, GPU),
    "low-vram": {**dict.fromkeys(COMPONENTS, GPU), "visual": "cpu", "audio_tower": "cpu"},
    "cpu": dict.fromkeys(COMPONENTS, "cpu"),
}
# Leaving the GPU first to last; the language model (with lm_head) is only ever split, last.
OFFLOAD_ORDER = ("audio_tower", "visual", "token2wav", "talker")
SPLIT = "split"  # placement of a language model whose decoder layers straddle GPU and CPU
WORKSPACE_BYTES = 256 * 1024**2  # CUDA kernels' scratch space, allocator fragmentation


class ConfigError(ValueError):
    """A setting that cannot work; the message names the variable and what to set."""


# ---------------------------------------------------------------- device maps from settings


def parse_device_map(value: str) -> dict[str, str] | None:
    """DEVICE_MAP as component -> device ('gpu' stands for GPU_DEVICE); None for 'auto'."""
    value = value.strip()
    if value == "auto":
        return None
    if value in PRESETS:
        return dict(PRESETS[value])
    if not value.startswith("{"):
        raise ConfigError(f"DEVICE_MAP={value!r} is not a preset ({', '.join(['auto', *PRESETS])}) or a JSON object")
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
        placement[component] = check_device(f"DEVICE_MAP: {component}", device)
    return placement


def check_device(what: str, device: Any) -> str:
    """A device string torch understands, of a kind we support (cpu, cuda[:N])."""
    if not isinstance(device, str):
        raise ConfigError(f"{what}: the device must be a string like 'cpu' or 'cuda:0'")
    if device == GPU:
        return device
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"{what} -> {device!r} is not a device (use 'cpu', 'cuda' or 'cuda:N')") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"{what} -> {device!r}: only cpu and cuda devices are supported")
    return device


def on_gpu(device: str) -> bool:
    return device in (GPU, SPLIT) or device.startswith("cuda")


def attention_for(wanted: str, placement: dict[str, str]) -> str:
    """The attention kernel: flash_attention_2 only where installed and nothing runs on the CPU."""
    if wanted != "flash_attention_2":
        return wanted
    if importlib.util.find_spec("flash_attn") is None:
        logger.warning("ATTN_IMPLEMENTATION=flash_attention_2, but flash-attn is not installed: using sdpa")
        return "sdpa"
    on_cpu = sorted(c for c, d in placement.items() if d == "cpu" or d == SPLIT)
    if on_cpu:
        logger.warning("flash_attention_2 cannot run %s on the CPU: using sdpa", ", ".join(on_cpu))
        return "sdpa"
    return wanted


# ---------------------------------------------------------------- the module tree


def find_component(model: torch.nn.Module, component: str) -> str | None:
    """The module path of `component` in this model, or None when the model lacks it."""
    for path in COMPONENT_PATHS[component]:
        with contextlib.suppress(AttributeError):
            model.get_submodule(path)
            return path
    return None


def module_device_map(
    model: torch.nn.Module, placement: dict[str, str], gpu_layers: int | None = None, gpu_device: str = "cuda"
) -> dict[str, str]:
    """Component placement as accelerate's module-path device map, on `model`'s real tree.

    A `split` language model keeps its first `gpu_layers` decoder layers (and its embeddings,
    final norm and rotary tables) on the GPU and the rest on the CPU; accelerate moves the
    hidden states across at the boundary.
    """
    device_map: dict[str, str] = {}
    for component, device in placement.items():
        path = find_component(model, component)
        if path is None:
            continue
        if device != SPLIT:
            device_map[path] = gpu_device if device == GPU else device
            continue
        for name, child in model.get_submodule(path).named_children():
            if isinstance(child, torch.nn.ModuleList):
                for index in range(len(child)):
                    device_map[f"{path}.{name}.{index}"] = gpu_device if index < (gpu_layers or 0) else "cpu"
            else:
                device_map[f"{path}.{name}"] = gpu_device
    return device_map


def build_skeleton(config) -> torch.nn.Module:
    """The whole architecture on the meta device: sizes and module paths, no memory."""
    from accelerate import init_empty_weights
    from transformers import Qwen2_5OmniForConditionalGeneration

    with init_empty_weights():
        return Qwen2_5OmniForConditionalGeneration(config)


# ---------------------------------------------------------------- the planner


@dataclass
class ComponentSize:
    params: int
    bytes: int


@dataclass
class Plan:
    placement: dict[str, str]
    components: dict[str, ComponentSize]
    headroom_bytes: int
    predicted_gpu_bytes: int
    budget_bytes: int
    fits: bool
    language_model_layers: dict[str, int] | None = None  # {"gpu": n, "cpu": m} when split
    dtype: str = "float16"
    context_tokens: int = 8192
    notes: list[str] = field(default_factory=list)
    quantization: str = "none"  # the language model's weights: none, int8, nf4 (QUANTIZATION) or gptq (checkpoint)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """The plan as a table a person can read."""
        rows = [f"{'component':<15} {'params':>8} {'size':>10}  device"]
        for name, size in self.components.items():
            device = self.placement[name]
            if device == SPLIT and self.language_model_layers:
                layers = self.language_model_layers
                device = f"split: {layers['gpu']} layers on GPU, {layers['cpu']} on CPU"
            rows.append(f"{name:<15} {size.params / 1e9:>7.2f}B {size.bytes / GiB:>6.2f} GiB  {device}")
        rows.append(
            f"{'headroom':<15} {'':>8} {self.headroom_bytes / GiB:>6.2f} GiB  "
            f"(KV cache and activations for {self.context_tokens} tokens, workspace)"
        )
        verdict = "fits" if self.fits else "DOES NOT FIT"
        rows.append(
            f"predicted peak GPU memory: {self.predicted_gpu_bytes / GiB:.2f} GiB of "
            f"{self.budget_bytes / GiB:.2f} GiB ({self.dtype}{_quantized(self.quantization)}): {verdict}"
        )
        rows += [f"note: {note}" for note in self.notes]
        return "\n".join(rows)


def _quantized(scheme: str) -> str:
    return "" if scheme == "none" else f", language model {scheme}"


def component_sizes(
    skeleton: torch.nn.Module, dtype: torch.dtype, quantization: str = "none", group_size: int = 128
) -> dict[str, ComponentSize]:
    """Parameters and bytes of each component present; token2wav always runs in float32, and the
    language model's decoder layers at their quantized bytes (see quantization.py)."""
    sizes = {}
    for component in COMPONENTS:
        path = find_component(skeleton, component)
        if path is None:
            continue
        module = skeleton.get_submodule(path)
        params = sum(p.numel() for p in module.parameters())
        element = 4 if component == "token2wav" else torch.finfo(dtype).bits // 8
        size = params * element
        if component == "language_model" and quantization != "none":
            size = quantized_parameter_bytes(module, quantization, dtype, group_size)
        sizes[component] = ComponentSize(params=params, bytes=size)
    return sizes


def headroom_bytes(
    config, context_tokens: int, dtype: torch.dtype, placement: dict[str, str], max_visual_patches: int | None = None
) -> int:
    """GPU memory beyond the weights: the KV cache and one layer's activations for the context,
    plus the encoders' activations for the largest input they may see, where they are on the GPU.

    The vision encoder sees at most `max_visual_patches` (what the pixel budgets allow), and never
    more than the context admits: a longer prompt is refused before it reaches the model."""
    element = torch.finfo(dtype).bits // 8
    text = config.thinker_config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_cache = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * context_tokens * element
    prefill = context_tokens * (2 * text.intermediate_size + 4 * text.hidden_size) * element
    total = kv_cache + prefill + WORKSPACE_BYTES
    if on_gpu(placement.get("visual", "cpu")):
        vision = config.thinker_config.vision_config
        patches = context_tokens * vision.spatial_merge_size**2  # more would not fit the context
        if max_visual_patches is not None:
            patches = min(patches, max_visual_patches)
        total += patches * (2 * vision.intermediate_size + 4 * vision.hidden_size) * element
    if on_gpu(placement.get("audio_tower", "cpu")):
        audio = config.thinker_config.audio_config
        total += audio.max_source_positions * (2 * audio.encoder_ffn_dim + 4 * audio.d_model) * element
    return total


def plan_placement(
    config,
    budget_bytes: int,
    dtype: torch.dtype = torch.float16,
    audio_output: bool = False,
    context_tokens: int = 8192,
    skeleton: torch.nn.Module | None = None,
    max_visual_patches: int | None = None,
    quantization: str = "none",
) -> Plan:
    """Fit the model into `budget_bytes` of GPU memory (see the module docstring). `quantization` is
    QUANTIZATION; a pre-quantized checkpoint's own scheme (its config's) wins."""
    scheme, group_size = planning_scheme(config, quantization)
    if skeleton is None:
        config.enable_audio_output = audio_output
        skeleton = build_skeleton(config)
    sizes = component_sizes(skeleton, dtype, scheme, group_size)
    workspace = dequantize_workspace_bytes(
        skeleton.get_submodule(find_component(skeleton, "language_model")), scheme, dtype
    )
    if not audio_output:
        sizes = {c: s for c, s in sizes.items() if c not in SPEECH_COMPONENTS}
    placement = dict.fromkeys(sizes, GPU)

    def gpu_bytes() -> int:
        weights = sum(s.bytes for c, s in sizes.items() if placement[c] == GPU)
        return weights + workspace + headroom_bytes(config, context_tokens, dtype, placement, max_visual_patches)

    for component in OFFLOAD_ORDER:
        if gpu_bytes() <= budget_bytes:
            break
        if component in placement:
            placement[component] = "cpu"
    plan = Plan(
        placement=placement,
        components=sizes,
        headroom_bytes=0,
        predicted_gpu_bytes=0,
        budget_bytes=budget_bytes,
        fits=True,
        dtype=str(dtype).removeprefix("torch."),
        context_tokens=context_tokens,
        quantization=scheme,
    )
    if gpu_bytes() > budget_bytes:
        _split_language_model(plan, skeleton, config, dtype, gpu_bytes(), group_size)
    plan.headroom_bytes = workspace + headroom_bytes(config, context_tokens, dtype, placement, max_visual_patches)
    if plan.language_model_layers is None:
        plan.predicted_gpu_bytes = gpu_bytes()
    plan.fits = plan.predicted_gpu_bytes <= budget_bytes
    if not plan.fits:
        plan.notes.append("even the language model's embeddings and lm_head do not fit: use DEVICE_MAP=cpu")
    return plan


def _split_language_model(plan: Plan, skeleton, config, dtype: torch.dtype, needed: int, group_size: int = 128) -> None:
    """Keep as many decoder layers on the GPU as fit; the rest run on the CPU (slower, but it runs)."""
    path = find_component(skeleton, "language_model")
    layers = next(c for c in skeleton.get_submodule(path).children() if isinstance(c, torch.nn.ModuleList))
    layer_bytes = quantized_parameter_bytes(layers[0], plan.quantization, dtype, group_size)
    total_layers = len(layers)
    all_layers_bytes = layer_bytes * total_layers
    fixed = needed - all_layers_bytes  # everything on the GPU but the decoder layers
    gpu_layers = max(0, min(total_layers, (plan.budget_bytes - fixed) // layer_bytes)) if layer_bytes else 0
    plan.placement["language_model"] = SPLIT
    plan.language_model_layers = {"gpu": int(gpu_layers), "cpu": int(total_layers - gpu_layers)}
    plan.predicted_gpu_bytes = int(fixed + gpu_layers * layer_bytes)
    plan.notes.append(
        f"the language model does not fit whole: {gpu_layers} of {total_layers} decoder layers on the GPU, "
        "the rest on the CPU (slower)"
    )
