"""Where each part of Qwen2.5-Omni runs: component names, presets, and the GPU memory planner.

Users name components, never module paths: `language_model`, `lm_head`, `visual`,
`audio_tower`, `talker`, `token2wav`. They are resolved against the model's real module tree,
so a device map keeps working when transformers moves modules (5.x turned `thinker.visual`
into `thinker.model.visual`, which silently broke hard-coded maps).

The planner sizes every component from the config alone (the architecture is built on the meta
device: no weights, no GPU), sizes the activations of the largest request the budgets allow (the
KV cache for the whole context, the encoders on the most pixels and the longest audio, the talker's
inputs), and fills the GPU budget: encoders are offloaded first (weights cross PCIe once per
request), then run on the CPU, then the speech modules are offloaded, and the language model is
split last (offloaded layers cross PCIe for every token). Each plan says what crosses PCIe, the
host RAM it needs, and which parts will be slow.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from qwen_omni_server.local.quantization import dequantize_workspace_bytes, planning_scheme, quantized_parameter_bytes

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
# Where a component can be: on the GPU; `offload`: weights in host RAM, run on the GPU (accelerate
# streams the weights in at every call); `cpu`: run on the CPU (for an encoder in a GPU plan, only its
# output embeddings move to the GPU); `split`: a language model with some decoder layers offloaded.
OFFLOAD = "offload"
CPU = "cpu"
SPLIT = "split"
ENCODERS = ("visual", "audio_tower")
PRESETS: dict[str, dict[str, str]] = {
    "gpu": dict.fromkeys(COMPONENTS, GPU),
    "low-vram": {**dict.fromkeys(COMPONENTS, GPU), "visual": OFFLOAD, "audio_tower": OFFLOAD},
    "low-vram-cpu": {**dict.fromkeys(COMPONENTS, GPU), "visual": CPU, "audio_tower": CPU},
    "cpu": dict.fromkeys(COMPONENTS, CPU),
}
MiB = 1024**2


@dataclass(frozen=True)
class FixedCost:
    """GPU memory a plan reserves that no tensor of the model holds (the memory check cannot see it)."""

    name: str
    bytes: int
    source: str


# In every GPU plan's headroom. The CUDA context itself (driver state and the kernels loaded lazily, about
# 0.3-0.5 GiB) is outside torch's allocator and outside the budget: GPU_MEMORY_GIB is what torch may allocate.
FIXED_COSTS = (
    FixedCost(
        "cuBLAS and cuBLASLt workspaces",
        64 * MiB,
        "torch's CublasHandlePool gives each handle and stream a workspace from the caching allocator: "
        "CUBLAS_WORKSPACE_CONFIG's default is 8 x 4 MiB on Hopper (:4096:2:16:8, 8.1 MiB, before), cuBLASLt one more",
    ),
    FixedCost(
        "allocator rounding and fragmentation",
        192 * MiB,
        "the caching allocator rounds large blocks to 2 MiB and keeps freed blocks for reuse, so what it reserves "
        "exceeds what is allocated at the peak; kernels' own scratch (attention, convolutions) is drawn from it too",
    ),
)
FIXED_COST_BYTES = sum(cost.bytes for cost in FIXED_COSTS)


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
    if device in (GPU, OFFLOAD):
        return device
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(
            f"{what} -> {device!r} is not a device (use 'cpu', 'offload', 'gpu', 'cuda' or 'cuda:N')"
        ) from None
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"{what} -> {device!r}: only cpu and cuda devices are supported")
    return device


def on_gpu(device: str) -> bool:
    """Whether a component placed on `device` keeps weights on the GPU (a split language model, some)."""
    return device in (GPU, SPLIT) or device.startswith("cuda")


def honest_placement(placement: dict[str, str], gpu_used: bool) -> tuple[dict[str, str], list[str]]:
    """In a placement that uses a GPU, a non-encoder component on `cpu` would run on the GPU with its
    weights streamed in (accelerate offloads it): call it `offload`. Only the encoders run on the CPU."""
    if not gpu_used:
        return dict(placement), []
    renamed = {c: OFFLOAD if d == CPU and c not in ENCODERS else d for c, d in placement.items()}
    changed = sorted(c for c in placement if renamed[c] != placement[c])
    notes = (
        [f"{', '.join(changed)}: 'cpu' in a GPU placement is offloaded (weights on CPU, run on GPU)"] if changed else []
    )
    return renamed, notes


def attention_for(wanted: str, placement: dict[str, str]) -> str:
    """The attention kernel: flash_attention_2 only where installed and nothing runs on the CPU."""
    if wanted != "flash_attention_2":
        return wanted
    if importlib.util.find_spec("flash_attn") is None:
        logger.warning("ATTN_IMPLEMENTATION=flash_attention_2, but flash-attn is not installed: using sdpa")
        return "sdpa"
    on_cpu = sorted(c for c, d in placement.items() if d == CPU)
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
            device_map[path] = gpu_device if device == GPU else "cpu" if device == OFFLOAD else device
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

PCIE_BYTES_PER_SECOND = 25e9  # a PCIe 4.0 x16 link in practice: the plan's transfer-time estimates
HOST_BASE_BYTES = 2 * GiB  # Python, torch, the processor and the CUDA context, on the host
TOKEN2WAV_DIT_CALLS = 36  # per chunk of speech: token2wav's Runge-Kutta solver calls its DiT 4 times in each of 9 steps
CODES_PER_SECOND = 50  # the talker's codec tokens per second of speech (24 kHz / 480 samples)
AUDIO_TOKENS_PER_SECOND = 25
# When the model does not fit, these moves are tried in order; the language model is split last.
# `offload` keeps an encoder's speed (its weights cross PCIe once per request); `cpu` frees its
# activations too but computes on the CPU; an offloaded talker moves its weights for every codec token,
# an offloaded token2wav its DiT's 36 times for every chunk of speech (more bytes per second of speech).
FIT_STEPS = (
    ("audio_tower", OFFLOAD),
    ("visual", OFFLOAD),
    ("audio_tower", CPU),
    ("visual", CPU),
    ("talker", OFFLOAD),
    ("token2wav", OFFLOAD),
)


@dataclass(frozen=True)
class Budgets:
    """What one request may bring, from the settings: the activations are sized for it."""

    context_tokens: int = 8192
    max_visual_patches: int | None = None  # vision patches of one request; None: all the context admits
    max_audio_seconds: float = 300  # audio of one request, all clips together
    max_speech_seconds: float = 180  # the longest spoken answer
    speech_chunk_blocks: int = 3  # token2wav's chunk, in DiT blocks (SPEECH_CHUNK_BLOCKS)
    speech_pipeline: bool = True  # the talker reads the thinker's states as they come (SPEECH_PIPELINE)
    batch_size: int = 1  # text answers decoded together (MAX_BATCH_SIZE): each row's cache at the whole context


@dataclass
class ComponentSize:
    params: int
    bytes: int
    largest_module_bytes: int = 0  # what an offload hook moves in at once (one module's own weights)


@dataclass
class Cost:
    """One component in a plan: where its weights live, where it runs, and what crosses PCIe."""

    device: str  # gpu, offload, cpu or split
    gpu_bytes: int  # weights resident on the GPU
    host_bytes: int  # weights in host RAM
    moved_per_request: int = 0
    moved_per_token: int = 0  # per new text token (talker, token2wav: per codec token)
    slow: str = ""


def bytes_per_param(component: str, dtype: torch.dtype) -> float:
    """The stored size of one weight of `component` (token2wav always runs in float32)."""
    return 4 if component == "token2wav" else torch.finfo(dtype).bits // 8


def _quantized(scheme: str) -> str:
    return "" if scheme == "none" else f", language model {scheme}"


def component_sizes(
    skeleton: torch.nn.Module, dtype: torch.dtype, quantization: str = "none", group_size: int = 128
) -> dict[str, ComponentSize]:
    """Parameters and bytes of each component present: the one place weights are sized (the language
    model's decoder layers at their quantized bytes, see quantization.py)."""
    sizes = {}
    for component in COMPONENTS:
        path = find_component(skeleton, component)
        if path is None:
            continue
        module = skeleton.get_submodule(path)
        element = bytes_per_param(component, dtype)
        params = sum(p.numel() for p in module.parameters())
        largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)
        size = int(params * element)
        if component == "language_model" and quantization != "none":
            size = quantized_parameter_bytes(module, quantization, dtype, group_size)
        sizes[component] = ComponentSize(params, size, int(largest * element))
    return sizes


def _decoder_layers(skeleton: torch.nn.Module) -> torch.nn.ModuleList:
    path = find_component(skeleton, "language_model")
    assert path is not None, "a Qwen2.5-Omni has a language model"
    return next(c for c in skeleton.get_submodule(path).children() if isinstance(c, torch.nn.ModuleList))


def activation_bytes(config, budgets: Budgets, dtype: torch.dtype, audio_output: bool) -> dict[str, int]:
    """Peak memory beyond the weights, by what holds it, for the largest request the budgets allow.

    vision: the vision encoder on every patch one request may bring (never more than the context
    admits); audio: the audio encoder on the longest audio allowed; kv_cache: the thinker's cache for
    the whole context; prefill: the prefill's peak above the cache (logits for its last position only);
    talker_states: the thinker's states the talker reads (after the text: every layer's of every token;
    pipelined: the prompt's first and last layer until the talker starts, each token's read as it comes); talker and
    token2wav: the longest spoken answer; other_rows: with batching, the other rows' caches and step logits
    while a row is encoded and prefilled (spoken answers run alone). Each term follows what the memory check tracks on the real
    architectures (scripts/memory_check.py): the tensors alive at that part's peak."""
    element = torch.finfo(dtype).bits // 8
    thinker = config.thinker_config
    text = thinker.text_config
    tokens = budgets.context_tokens
    patches = tokens * thinker.vision_config.spatial_merge_size**2
    if budgets.max_visual_patches is not None:
        patches = min(patches, budgets.max_visual_patches)
    seconds = min(budgets.max_audio_seconds, tokens / AUDIO_TOKENS_PER_SECOND)
    head_width = head_dim(text)
    acts = {
        "vision": patches * _vision_bytes_per_patch(thinker.vision_config, element),
        "audio": _audio_bytes(thinker.audio_config, seconds, element),
        "kv_cache": tokens * _kv_bytes_per_token(text, element),
        "prefill": tokens * (3 * text.intermediate_size + 4 * text.hidden_size + 2 * head_width) * element
        + text.vocab_size * (element + 4),  # the last position's logits, and their float32 copy
        "talker_states": 0,
        "talker": 0,
        "token2wav": 0,
        "other_rows": (budgets.batch_size - 1) * (tokens * _kv_bytes_per_token(text, element) + text.vocab_size * 4),
    }
    if audio_output:
        codes = int(budgets.max_speech_seconds * CODES_PER_SECOND)
        layers_kept = 2 if budgets.speech_pipeline else text.num_hidden_layers + 1
        acts["talker_states"] = layers_kept * tokens * text.hidden_size * element
        acts["talker"] = _talker_bytes(config.talker_config, tokens, codes, element)
        acts["token2wav"] = token2wav_bytes(config.token2wav_config, codes, budgets.speech_chunk_blocks)
    acts["vision_patches"] = patches
    acts["audio_seconds"] = int(seconds)
    return acts


def token2wav_bytes(token2wav, codes: int, chunk_blocks: int) -> int:
    """token2wav's peak (float32), the same at any length: every answer is made chunk by chunk (speech.py).
    The DiT solves a window of `chunk_blocks` blocks and its context (guided and unguided together, a
    block mask per head); BigVGAN vocodes a chunk's mel with its reach on both sides, and its peak is at
    its widest stage: the stage's input, its anti-aliased activation's upsampled copies and products
    (twelve of the stage's size)."""
    from qwen_omni_server.local.speech import vocoder_reach

    dit, bigvgan = token2wav.dit_config, token2wav.bigvgan_config
    context = (len(dit.look_backward_layers) + len(dit.look_ahead_layers)) * dit.block_size
    window = min(codes * dit.repeats, chunk_blocks * dit.block_size + context)
    dit_bytes = (
        2 * window * dit.hidden_size * (2 * dit.ff_mult + 6) + 2 * dit.num_attention_heads * window * window
    ) * 4
    length = min(codes * dit.repeats, chunk_blocks * dit.block_size) + 2 * vocoder_reach(bigvgan)
    channels, stage = bigvgan.upsample_initial_channel, 0
    for rate in bigvgan.upsample_rates:
        length, channels = length * rate, channels // 2
        stage = max(stage, length * channels * 4)
    return max(dit_bytes, 12 * stage)


def head_dim(config) -> int:
    """A decoder config's attention head width (its own `head_dim`, else hidden size over heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _kv_bytes_per_token(config, element: int) -> int:
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config) * element


def _vision_bytes_per_patch(vision, element: int) -> int:
    """The vision encoder's peak is in a block's attention: the hidden states, their norm and q, k, v, the
    rotary tables (float32), and the rotary step's float32 copies and products of q and k (six, four
    when the model already runs in float32); or in its MLP. The pixels it was given live throughout."""
    head_width = vision.hidden_size // vision.num_heads
    rotary_copies = 4 if element == 4 else 6
    attention = 5 * vision.hidden_size * element + 2 * head_width * 4 + rotary_copies * vision.hidden_size * 4
    mlp = (2 * vision.hidden_size + 3 * vision.intermediate_size) * element
    pixels = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2 * element  # the input
    return pixels + max(attention, mlp) + 16  # and the window order's index tensors


def _audio_bytes(audio, seconds: float, element: int) -> int:
    """The audio encoder's peak, in a layer's MLP: per position (two mel frames after the stride-2
    convolution) the MLP's input and its two wide products, the residual, the mel features twice (as
    given, and padded into chunks)."""
    positions = int(seconds * 2 * AUDIO_TOKENS_PER_SECOND)
    index_tensors = 32  # int64: valid positions, pooled positions, chunk lengths
    return positions * (
        (2 * audio.encoder_ffn_dim + 3 * audio.d_model + 4 * audio.num_mel_bins) * element + index_tensors
    )


def _talker_bytes(talker, tokens: int, codes: int, element: int) -> int:
    """The talker's peak: its prefill over the prompt (a decoder layer's MLP with the cache being built), or
    its last decoding step (the cache over prompt and codes, one layer's twice while it grows); its inputs
    (the thinker's states of prompt and answer, at the thinker's width) live throughout."""
    kv = _kv_bytes_per_token(talker, element)
    inputs = tokens * talker.embedding_size * element
    layer = (3 * talker.intermediate_size + 4 * talker.hidden_size + 2 * head_dim(talker)) * element
    last_step = (tokens + codes) * kv * (talker.num_hidden_layers + 2) // talker.num_hidden_layers
    return inputs + max(tokens * (kv + layer), last_step)


def runs_on_gpu(device: str) -> bool:
    """Whether a component placed on `device` computes on the GPU (offloaded ones do)."""
    return device in (OFFLOAD, SPLIT) or on_gpu(device)


@dataclass
class Plan:
    placement: dict[str, str]
    components: dict[str, ComponentSize]
    headroom_bytes: int  # GPU memory beyond resident weights: activations, KV cache, offload buffers, workspace
    predicted_gpu_bytes: int
    budget_bytes: int
    fits: bool
    language_model_layers: dict[str, int] | None = None  # {"gpu": n, "cpu": m} when split
    dtype: str = "float16"
    context_tokens: int = 8192
    notes: list[str] = field(default_factory=list)
    quantization: str = "none"  # the language model's weights: none, int8, nf4 (QUANTIZATION), gptq or awq
    costs: dict[str, Cost] = field(default_factory=dict)
    activations: dict[str, int] = field(default_factory=dict)
    host_bytes: int = 0  # host RAM the placement needs: weights kept there, CPU-side activations, the process
    moved_per_token: int = 0
    moved_per_request: int = 0

    @property
    def slow(self) -> list[str]:
        return [f"{name}: {cost.slow}" for name, cost in self.costs.items() if cost.slow]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "slow": self.slow}

    def table(self) -> str:
        """The plan as a table a person can read."""
        rows = [
            f"{'component':<15} {'params':>7} {'weights':>9}  {'device':<8} {'GPU':>9} {'host':>9} "
            f"{'moved/request':>13} {'moved/token':>11}  note"
        ]
        for name, size in self.components.items():
            cost = self.costs[name]
            device = cost.device
            if device == SPLIT and self.language_model_layers:
                device = f"split {self.language_model_layers['gpu']}/{sum(self.language_model_layers.values())}"
            rows.append(
                f"{name:<15} {size.params / 1e9:>6.2f}B {_gib(size.bytes):>9}  {device:<8} {_gib(cost.gpu_bytes):>9} "
                f"{_gib(cost.host_bytes):>9} {_gib(cost.moved_per_request, '-'):>13} "
                f"{_gib(cost.moved_per_token, '-'):>11}  {cost.slow}"
            )
        a = self.activations
        rows.append(
            f"activations: KV cache {_gib(a['kv_cache'])} ({self.context_tokens} tokens), prefill {_gib(a['prefill'])}, "
            f"vision {_gib(a['vision'])} ({a['vision_patches']} patches), audio {_gib(a['audio'])} "
            f"({a['audio_seconds']} s)"
            + (f", the batch's other rows {_gib(a['other_rows'])}" if a.get("other_rows") else "")
            + (
                f", talker states {_gib(a['talker_states'])}, talker {_gib(a['talker'])}, "
                f"token2wav {_gib(a['token2wav'])}"
                if a.get("talker")
                else ""
            )
        )
        verdict = "fits" if self.fits else "DOES NOT FIT"
        rows.append(
            f"predicted peak GPU memory: {self.predicted_gpu_bytes / GiB:.2f} GiB of "
            f"{self.budget_bytes / GiB:.2f} GiB ({self.dtype}{_quantized(self.quantization)}): {verdict}"
        )
        rows.append(f"host RAM needed: {self.host_bytes / GiB:.2f} GiB")
        rows.append("speed: " + ("; ".join(self.slow) if self.slow else "nothing crosses PCIe per token"))
        rows += [f"note: {note}" for note in self.notes]
        return "\n".join(row.rstrip() for row in rows)


def _gib(value: int, zero: str = "0") -> str:
    return f"{value / GiB:.2f} GiB" if value else zero


def headroom_bytes(
    config,
    context_tokens: int,
    dtype: torch.dtype,
    placement: dict[str, str],
    max_visual_patches: int | None = None,
    audio_output: bool = False,
    budgets: Budgets | None = None,
) -> int:
    """GPU memory beyond the weights for `placement`: see `activation_bytes` and `peak_activations`."""
    budgets = budgets or Budgets(context_tokens, max_visual_patches)
    acts = activation_bytes(config, budgets, dtype, audio_output)
    return peak_activations(acts, placement, on_gpu_side=True) + FIXED_COST_BYTES


def peak_activations(acts: dict[str, int], placement: dict[str, str], on_gpu_side: bool) -> int:
    """The largest phase of a request, counting what runs on the GPU (or on the host): the encoders
    run one after the other before the prefill, beside the caches of a batch's other rows; the thinker's
    cache and hidden states live on while the talker and token2wav speak (alone)."""

    def here(component: str) -> bool:
        device = placement.get(component)
        return device is not None and runs_on_gpu(device) == on_gpu_side

    encode = max(acts["vision"] if here("visual") else 0, acts["audio"] if here("audio_tower") else 0)
    thinker = acts["kv_cache"] + acts["talker_states"] if here("language_model") else 0
    batch = acts.get("other_rows", 0) if here("language_model") else 0  # a newcomer joins rows decoding
    phases = [
        encode + batch,
        thinker + batch + (acts["prefill"] if here("language_model") else 0),
        thinker + (acts["talker"] if here("talker") else 0),
        thinker + (acts["token2wav"] if here("token2wav") else 0),
    ]
    return max(phases)


def _component_cost(
    name: str,
    size: ComponentSize,
    device: str,
    config,
    layer: ComponentSize | None,
    gpu_layers: int | None,
    host_layer_bytes: int | None,
    chunk_codes: int = 36,
) -> Cost:
    """What one component costs where it is placed: bytes on the GPU and the host, and over PCIe (per
    token: per text token, or for the talker and token2wav per codec token; token2wav's chunk of speech
    holds `chunk_codes` codes)."""
    if device == SPLIT:
        assert layer is not None and gpu_layers is not None, "a split needs the layer's size and the GPU's layers"
        layers = _layer_count(config)
        # bitsandbytes leaves the layers on the CPU unquantized: they are held and moved in `dtype`.
        cpu_bytes = (layers - gpu_layers) * (host_layer_bytes or layer.bytes)
        seconds = cpu_bytes / PCIE_BYTES_PER_SECOND
        return Cost(
            device,
            size.bytes - (layers - gpu_layers) * layer.bytes,
            cpu_bytes,
            moved_per_token=cpu_bytes,
            slow=f"{layers - gpu_layers} of {layers} layers cross PCIe every token (~{seconds:.2f} s/token)",
        )
    if device == OFFLOAD:
        cost = Cost(device, 0, size.bytes)
        if name in ("language_model", "lm_head", "talker"):  # used for every token
            cost.moved_per_token = size.bytes
            cost.slow = f"its weights cross PCIe every token (~{size.bytes / PCIE_BYTES_PER_SECOND:.2f} s/token)"
        elif name == "token2wav":
            cost.moved_per_token = size.bytes * TOKEN2WAV_DIT_CALLS // chunk_codes
            seconds = cost.moved_per_token * CODES_PER_SECOND / PCIE_BYTES_PER_SECOND
            cost.slow = (
                f"its DiT crosses PCIe {TOKEN2WAV_DIT_CALLS} times a chunk (~{seconds:.1f} s per second of speech)"
            )
        else:
            cost.moved_per_request = size.bytes
            seconds = cost.moved_per_request / PCIE_BYTES_PER_SECOND
            cost.slow = f"~{seconds:.1f} s over PCIe per request" if seconds >= 1 else ""
        return cost
    if runs_on_gpu(device):
        return Cost(device, size.bytes, 0)
    return Cost(device, 0, size.bytes)


def evaluate_placement(
    config,
    sizes: dict[str, ComponentSize],
    placement: dict[str, str],
    budget_bytes: int,
    dtype: torch.dtype,
    budgets: Budgets,
    layer: ComponentSize | None = None,
    gpu_layers: int | None = None,
    dequantize_bytes: int = 0,
    host_layer_bytes: int | None = None,
) -> Plan:
    """What `placement` costs: GPU peak, host RAM, bytes over PCIe, and which parts will be slow.

    A `split` language model keeps `gpu_layers` decoder layers (`layer` is one of them) on the GPU
    and offloads the rest: their weights cross PCIe for every token."""
    audio_output = "talker" in placement
    acts = activation_bytes(config, budgets, dtype, audio_output)
    costs = {
        name: _component_cost(
            name, size, placement[name], config, layer, gpu_layers, host_layer_bytes, _chunk_codes(config, budgets)
        )
        for name, size in sizes.items()
    }
    gpu_used = any(runs_on_gpu(d) for d in placement.values())
    if gpu_used:
        for name in ("visual", "audio_tower", "language_model", "talker", "token2wav"):
            if placement.get(name) == CPU:
                costs[name].slow = "computes on the CPU (bfloat16 is slow on CPUs without AVX512-BF16/AMX)"
    offload_buffer = max(
        [sizes[n].largest_module_bytes for n, d in placement.items() if d == OFFLOAD]
        + [layer.largest_module_bytes if layer and placement.get("language_model") == SPLIT else 0]
    )
    headroom = peak_activations(acts, placement, on_gpu_side=True) + offload_buffer + FIXED_COST_BYTES
    if runs_on_gpu(placement.get("language_model", CPU)):
        headroom += dequantize_bytes  # a quantized product's transient copy of one weight (prefill)
    headroom = headroom if gpu_used else 0
    weights = sum(c.gpu_bytes for c in costs.values())
    host = HOST_BASE_BYTES + sum(c.host_bytes for c in costs.values())
    host += peak_activations(acts, placement, on_gpu_side=False)
    plan = Plan(
        placement=dict(placement),
        components=sizes,
        headroom_bytes=headroom,
        predicted_gpu_bytes=weights + headroom,
        budget_bytes=budget_bytes,
        fits=weights + headroom <= budget_bytes,
        dtype=str(dtype).removeprefix("torch."),
        context_tokens=budgets.context_tokens,
        costs=costs,
        activations=acts,
        host_bytes=host,
        moved_per_token=sum(c.moved_per_token for c in costs.values()),
        moved_per_request=sum(c.moved_per_request for c in costs.values()),
    )
    if gpu_layers is not None:
        plan.language_model_layers = {"gpu": gpu_layers, "cpu": _layer_count(config) - gpu_layers}
    return plan


def _chunk_codes(config, budgets: Budgets) -> int:
    dit = config.token2wav_config.dit_config
    return max(1, budgets.speech_chunk_blocks * dit.block_size // dit.repeats)


def _layer_count(config) -> int:
    return config.thinker_config.text_config.num_hidden_layers


def _layer_size(
    skeleton: torch.nn.Module, dtype: torch.dtype, quantization: str = "none", group_size: int = 128
) -> ComponentSize:
    """One decoder layer: its bytes on the GPU (quantized), and its largest module in `dtype`, as the
    layers a split leaves on the CPU stay (bitsandbytes does not quantize those)."""
    layer = _decoder_layers(skeleton)[0]
    element = bytes_per_param("language_model", dtype)
    params = sum(p.numel() for p in layer.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in layer.modules())
    size = quantized_parameter_bytes(layer, quantization, dtype, group_size)
    return ComponentSize(params, size, int(largest * element))


def plan_placement(
    config,
    budget_bytes: int,
    dtype: torch.dtype = torch.float16,
    audio_output: bool = False,
    context_tokens: int = 8192,
    skeleton: torch.nn.Module | None = None,
    max_visual_patches: int | None = None,
    max_audio_seconds: float = 300,
    max_speech_seconds: float = 180,
    speech_chunk_blocks: int = 3,
    speech_pipeline: bool = True,
    placement: dict[str, str] | None = None,
    gpu_layers: int | None = None,
    quantization: str = "none",
    batch_size: int = 1,
) -> Plan:
    """Fit the model into `budget_bytes` of GPU memory, or cost a given `placement`.

    Everything starts on the GPU; while the plan does not fit, the moves of FIT_STEPS are made in
    order, then the language model is split: as many decoder layers as fit stay on the GPU.
    `quantization` is QUANTIZATION; a pre-quantized checkpoint's own scheme (its config's) wins."""
    scheme, group_size = planning_scheme(config, quantization)
    if skeleton is None:
        config.enable_audio_output = audio_output
        skeleton = build_skeleton(config)
    sizes = component_sizes(skeleton, dtype, scheme, group_size)
    dequantize = dequantize_workspace_bytes(_decoder_layers(skeleton)[0], scheme, dtype)
    unquantized_on_cpu = scheme in ("int8", "nf4")  # bitsandbytes quantizes the GPU side only
    if not audio_output:
        sizes = {c: s for c, s in sizes.items() if c not in SPEECH_COMPONENTS}
    budgets = Budgets(
        context_tokens,
        max_visual_patches,
        max_audio_seconds,
        max_speech_seconds,
        speech_chunk_blocks,
        speech_pipeline,
        batch_size,
    )
    layer = _layer_size(skeleton, dtype, scheme, group_size)
    host_layer = int(layer.params * bytes_per_param("language_model", dtype)) if unquantized_on_cpu else None

    def cost(chosen: dict[str, str], gpu_layers: int | None = None) -> Plan:
        plan = evaluate_placement(
            config, sizes, chosen, budget_bytes, dtype, budgets, layer, gpu_layers, dequantize, host_layer
        )
        plan.quantization = scheme
        return plan

    if placement is not None:  # cost this placement (`gpu_layers` on the GPU when the language model is split)
        return cost({c: placement[c] for c in sizes}, gpu_layers if placement.get("language_model") == SPLIT else None)
    return _fit(cost, list(sizes), _layer_count(config))


def _fit(cost: Callable[..., Plan], components: list[str], layers: int) -> Plan:
    """Everything on the GPU; then, while it does not fit, the moves of FIT_STEPS in order; then the language
    model split, as many decoder layers on the GPU as fit."""
    chosen = dict.fromkeys(components, GPU)
    plan = cost(chosen)
    for component, mode in FIT_STEPS:
        if plan.fits:
            return plan
        if component in chosen:
            chosen[component] = mode
            plan = cost(chosen)
    if plan.fits:
        return plan
    chosen["language_model"] = SPLIT
    for gpu_layers in range(layers - 1, -1, -1):
        plan = cost(chosen, gpu_layers)
        if plan.fits:
            plan.notes.append(
                f"the language model does not fit whole: {gpu_layers} of {layers} decoder layers on "
                "the GPU, the rest offloaded (their weights cross PCIe for every token: slow)"
            )
            return plan
    plan.notes.append(
        "even the language model's embeddings, lm_head and cache do not fit: use DEVICE_MAP=cpu, or lower "
        "MAX_CONTEXT_TOKENS and the pixel budgets"
    )
    return plan
