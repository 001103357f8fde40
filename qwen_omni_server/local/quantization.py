"""Quantized language-model weights: what is quantized, what it weighs, and how it loads.

`QUANTIZATION=int8` or `nf4` has bitsandbytes quantize the language model's decoder layers (their
linear layers) as the checkpoint loads; everything in `KEPT_IN_DTYPE` stays in `DTYPE`. A checkpoint
that is already quantized (its config carries a `quantization_config`, like the official
Qwen2.5-Omni-7B-GPTQ-Int4 and -AWQ) loads through GPTQModel, from `requirements-gptq.txt`.

The byte counts here are exact for what bitsandbytes 0.50 and GPTQ keep per linear layer (checked
against loaded models in tests/test_quantization.py), so the planner sizes quantized layers at
their real bytes. This module is a leaf: torch only (bitsandbytes, transformers when loading).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import platform
from collections.abc import Iterable
from typing import Any

import torch

logger = logging.getLogger(__name__)

SCHEMES = ("none", "int8", "nf4")
# The only component whose weights are quantized: its decoder layers' linear layers.
QUANTIZED_COMPONENT = "language_model"
# Components that stay in DTYPE under QUANTIZATION, and why. The language model's embeddings and
# norms stay in DTYPE as well: bitsandbytes replaces linear layers only.
KEPT_IN_DTYPE: dict[str, str] = {
    "visual": "the vision encoder is 0.7 B parameters and reads every image and video frame",
    "audio_tower": "quantizing the audio encoder is reported to wreck audio understanding "
    "(repetition loops, script switching)",
    "lm_head": "the output projection picks every token; its errors are not averaged away",
    "talker": "speech: the talker turns the answer into codec tokens",
    "token2wav": "speech: always runs in float32",
}
METHODS = {
    "int8": "bitsandbytes LLM.int8 (int8 weights, one float32 scale per output row)",
    "nf4": "bitsandbytes 4-bit NF4, double quant (absmax in 8 bits, blocks of 64)",
}
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold (BitsAndBytesConfig's default)
NF4_BLOCK = 64  # weights per absmax (bitsandbytes' 4-bit default)
NESTED_BLOCK = 256  # double quant: absmax values per second-level float32 absmax
NF4_CODE = 16 * 4  # the NF4 code table, float32, kept per quantized weight
NESTED_STATE = 256 * 4 + 4  # the dynamic 8-bit code table and the absmax offset, per quantized weight
PREQUANTIZED_METHODS = ("gptq", "awq")  # 4-bit formats transformers 5.24 loads through GPTQModel, verified here
PREQUANTIZED_REQUIREMENTS = "requirements-gptq.txt"
# transformers 5.x's path of the decoder layers, which GPTQModel must be told (see adapt_prequantized).
DECODER_LAYERS = "thinker.model.language_model.layers"


class QuantizationError(ValueError):
    """A quantization setting or checkpoint this server cannot load; the message says what to set."""


# ---------------------------------------------------------------- bytes


def linear_weight_bytes(
    out_features: int, in_features: int, scheme: str, dtype: torch.dtype, group_size: int = 128
) -> int:
    """Bytes one linear layer's weight takes once quantized with `scheme` (its bias stays in `dtype`).

    nf4: two weights per byte, one 8-bit absmax per 64 weights, one float32 absmax per 256 of those,
    plus the code tables; int8: one byte per weight and a float32 scale per output row; gptq and awq
    (4-bit): packed int32 weights and zeros, float16 scales per group (gptq: and an int32 group index
    per input)."""
    weights = out_features * in_features
    if scheme == "none":
        return weights * _element_size(dtype)
    if scheme == "int8":
        return weights + out_features * 4
    if scheme == "nf4":
        blocks = math.ceil(weights / NF4_BLOCK)
        return math.ceil(weights / 2) + blocks + math.ceil(blocks / NESTED_BLOCK) * 4 + NF4_CODE + NESTED_STATE
    if scheme in PREQUANTIZED_METHODS:
        groups = math.ceil(in_features / group_size)
        packed = weights // 2 + groups * (out_features // 8) * 4 + groups * out_features * 2
        return packed + (in_features * 4 if scheme == "gptq" else 0)
    raise QuantizationError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")


def quantized_parameter_bytes(module: torch.nn.Module, scheme: str, dtype: torch.dtype, group_size: int = 128) -> int:
    """Bytes of `module`'s parameters when every linear layer in it is quantized with `scheme` and the
    rest (biases, norms, embeddings) is in `dtype`. Works on the meta device: shapes only."""
    total = 0
    for submodule in module.modules():
        for name, parameter in submodule.named_parameters(recurse=False):
            if scheme != "none" and isinstance(submodule, torch.nn.Linear) and name == "weight":
                total += linear_weight_bytes(
                    submodule.out_features, submodule.in_features, scheme, dtype, group_size=group_size
                )
            else:
                total += parameter.numel() * _element_size(dtype)
    return total


def dequantize_workspace_bytes(module: torch.nn.Module, scheme: str, dtype: torch.dtype) -> int:
    """The transient copy a quantized matmul may make: the largest linear weight in `dtype` (bitsandbytes
    dequantizes a 4-bit weight for a prefill's matrix product). Zero without quantization."""
    if scheme == "none":
        return 0
    largest = max(
        (m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear)), default=0
    )
    return largest * _element_size(dtype)


def loaded_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes `module`'s weights really hold once loaded: its parameters, the quantization state
    bitsandbytes keeps beside them (absmax, code tables, scales) and GPTQ's packed buffers, each
    storage counted once. (Plain buffers, like rotary tables, are not weights.)"""
    seen: set[int] = set()
    total = 0
    for tensor in _held_tensors(module):
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _held_tensors(module: torch.nn.Module) -> Iterable[torch.Tensor]:
    yield from module.parameters()
    for submodule in module.modules():
        if hasattr(submodule, "qweight"):  # GPTQ: its weights are buffers
            yield from submodule.buffers(recurse=False)
    for parameter in module.parameters():
        state = getattr(parameter, "quant_state", None)  # bitsandbytes 4-bit
        while state is not None:
            yield from (t for t in (state.absmax, state.code, state.offset) if torch.is_tensor(t))
            state = state.state2 if getattr(state, "nested", False) else None
        scale = getattr(parameter, "SCB", None)  # bitsandbytes int8: per-row scales...
        if torch.is_tensor(scale):
            yield scale
    for submodule in module.modules():
        scale = getattr(getattr(submodule, "state", None), "SCB", None)  # ...kept here after the first product
        if torch.is_tensor(scale):
            yield scale


def _element_size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


# ---------------------------------------------------------------- pre-quantized checkpoints


def prequantized(config) -> dict[str, Any] | None:
    """The checkpoint's own quantization_config (GPTQ, AWQ...) as a dict, or None for a plain checkpoint.
    (After a bitsandbytes load, the model's config carries QUANTIZATION's too.)"""
    found = getattr(config, "quantization_config", None)
    if found is None:
        return None
    return dict(found if isinstance(found, dict) else found.to_dict())


def loaded_scheme(config, quantization: str) -> str:
    """What the language model's weights are: QUANTIZATION's scheme, or a GPTQ/AWQ checkpoint's method."""
    own = prequantized(config)
    return _method(own) if own and _method(own) in PREQUANTIZED_METHODS else quantization


def planning_scheme(config, quantization: str) -> tuple[str, int]:
    """The scheme and group size the planner sizes the language model with: a loadable pre-quantized
    (GPTQ, AWQ) checkpoint's own, else QUANTIZATION's (a checkpoint the server refuses is sized as QUANTIZATION)."""
    own = prequantized(config)
    if own is None or _refusal(own) is not None:
        return quantization, 128
    return _method(own), int(own.get("group_size") or 128)


def _method(own: dict[str, Any]) -> str:
    method = own.get("quant_method", "unknown")
    return str(getattr(method, "value", method)).lower()  # a QuantizationMethod once loaded


def _refusal(own: dict[str, Any]) -> str | None:
    if _method(own) in PREQUANTIZED_METHODS and own.get("bits", 4) == 4:
        return None
    return (
        f"MODEL_PATH's checkpoint is quantized with {_method(own).upper()} ({own.get('bits', '?')}-bit), which this "
        "server does not load: it loads 4-bit GPTQ and AWQ; use the unquantized checkpoint with QUANTIZATION=nf4 "
        "or int8"
    )


def check_prequantized(config, quantization: str, needs: tuple[str, ...] = ("gptqmodel", "optimum")) -> None:
    """Refuse, with one line, a pre-quantized checkpoint this server cannot load."""
    own = prequantized(config)
    if own is None:
        return
    method = _method(own)
    if quantization != "none":
        raise QuantizationError(
            f"MODEL_PATH is already quantized ({method}); set QUANTIZATION=none to load it as it is, or use the "
            f"unquantized checkpoint with QUANTIZATION={quantization}"
        )
    refusal = _refusal(own)
    if refusal:
        raise QuantizationError(refusal)
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:
        raise QuantizationError(
            f"MODEL_PATH holds a {method.upper()} checkpoint, which loads through GPTQModel; "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
            f"pip install -r {PREQUANTIZED_REQUIREMENTS}, or use the unquantized checkpoint with QUANTIZATION=nf4"
        )


def adapt_prequantized(config, kept_paths: list[str]) -> None:
    """Tell GPTQModel where the quantized layers are under transformers 5.x's names. GPTQ: the decoder
    layers (DECODER_LAYERS); under their 4.x name, the one a checkpoint made for transformers 4.x may
    carry, they would load randomly initialised, and with no name none is found. AWQ converts every
    linear layer not listed as kept: add the 5.x paths of KEPT_IN_DTYPE (`kept_paths`)."""
    own = prequantized(config)
    if own is None:
        return
    if _method(own) == "gptq":
        _set(config, "block_name_to_quantize", DECODER_LAYERS)
    elif _method(own) == "awq":
        _set(config, "modules_to_not_convert", sorted({*(own.get("modules_to_not_convert") or []), *kept_paths}))


def _set(config, key: str, value: Any) -> None:
    found = config.quantization_config
    if isinstance(found, dict):
        found[key] = value
    else:
        setattr(found, key, value)


# ---------------------------------------------------------------- bitsandbytes


def kept_module_paths(component_paths: dict[str, tuple[str, ...]]) -> list[str]:
    """The module paths bitsandbytes must leave alone: every path of every component in KEPT_IN_DTYPE."""
    return [path for component in KEPT_IN_DTYPE for path in component_paths[component]]


def bitsandbytes_config(scheme: str, dtype: torch.dtype, kept_paths: list[str], devices: Iterable[str]):
    """The BitsAndBytesConfig for `scheme` (None for 'none'). `devices` are the device map's values:
    a map that mixes GPU and CPU keeps the modules on the CPU unquantized (bitsandbytes' 'fp32 CPU
    offload', in fact DTYPE), which only ever concerns decoder layers the planner left on the CPU."""
    if scheme == "none":
        return None
    if scheme not in SCHEMES:
        raise QuantizationError(f"QUANTIZATION={scheme!r} is not one of {', '.join(SCHEMES)}")
    from transformers import BitsAndBytesConfig

    devices = {str(d) for d in devices}
    mixed = len(devices) > 1 and "cpu" in devices
    common = {"llm_int8_skip_modules": list(kept_paths), "llm_int8_enable_fp32_cpu_offload": mixed}
    if scheme == "int8":
        _quiet_int8_casts()
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD, **common)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        **common,
    )


def quantize_in_place(model: torch.nn.Module, scheme: str, dtype: torch.dtype, language_model_path: str) -> int:
    """Quantize, where they are, the linear layers of the language model of a model already built (with
    random weights, say, as a GPU check builds real-size models without a checkpoint), as loading with
    `bitsandbytes_config` would: same layers, same bitsandbytes algorithm. Returns how many it replaced."""
    if scheme == "none":
        return 0
    import bitsandbytes as bnb

    if scheme == "int8":
        _quiet_int8_casts()
    replaced = 0
    for parent in list(model.get_submodule(language_model_path).modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            device, weight = child.weight.device, child.weight.data.to(dtype)
            options = {"bias": child.bias is not None, "device": "meta"}
            if scheme == "nf4":
                layer = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, compute_dtype=dtype, quant_type="nf4", **options
                )
                layer.weight = bnb.nn.Params4bit(
                    weight, requires_grad=False, compress_statistics=True, quant_type="nf4", module=layer
                )._quantize(device)
            else:
                layer = bnb.nn.Linear8bitLt(  # type: ignore[assignment] # the scheme picks the class
                    child.in_features, child.out_features, has_fp16_weights=False, threshold=INT8_THRESHOLD, **options
                )
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)._quantize(device)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
            setattr(parent, name, layer.train(child.training))
            replaced += 1
    return replaced


def check_bitsandbytes(scheme: str, device: str, dtype: torch.dtype, cpu_capability: str | None = None) -> None:
    """Refuse, with one line, what bitsandbytes cannot run here: not installed, a CPU without the vector
    instructions its kernels need (AVX2 on x86), or a quantized matmul that fails or is wrong on `device`."""
    if scheme == "none":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError(
            f"QUANTIZATION={scheme} needs bitsandbytes, which is not installed: "
            "pip install -r requirements_multimodal.txt (or set QUANTIZATION=none)"
        )
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu and platform.machine().lower() in ("x86_64", "amd64"):
        capability = cpu_capability or torch.backends.cpu.get_cpu_capability()
        if capability not in ("AVX2", "AVX512"):
            raise QuantizationError(
                f"QUANTIZATION={scheme} on the CPU needs AVX2 instructions, which this CPU lacks (torch reports "
                f"{capability!r}); set QUANTIZATION=none, or run the language model on a GPU"
            )
    try:
        error = _self_test(scheme, device, dtype)
    except Exception as failure:  # noqa: BLE001 - any failure of the library is the answer
        error = f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"
    if error:
        raise QuantizationError(
            f"QUANTIZATION={scheme}: bitsandbytes cannot run on {device} here ({error}); set QUANTIZATION=none"
        )


def _self_test(scheme: str, device: str, dtype: torch.dtype) -> str | None:
    """One small quantized linear layer against its float result; a reason when it fails."""
    import bitsandbytes as bnb

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 128, generator=generator) / 8
    inputs = torch.randn(4, 128, generator=generator)
    if scheme == "nf4":
        layer = bnb.nn.Linear4bit(128, 128, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False, quant_type="nf4")
    else:
        _quiet_int8_casts()
        layer = bnb.nn.Linear8bitLt(128, 128, bias=False, has_fp16_weights=False)  # type: ignore[assignment]
        layer.weight = bnb.nn.Int8Params(weight.to(dtype), requires_grad=False, has_fp16_weights=False)
    layer = layer.to(device)
    with torch.inference_mode():
        got = layer(inputs.to(device, dtype)).float().cpu()
    expected = inputs @ weight.t()
    relative = float((got - expected).norm() / expected.norm())
    return None if relative < 0.2 else f"a quantized product is off by {relative:.0%}"


def _quiet_int8_casts() -> None:
    """bitsandbytes logs "inputs will be cast ... to float16" at every int8 matmul of non-fp16 inputs."""
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


# ---------------------------------------------------------------- description


def check_loaded(model: torch.nn.Module, scheme: str, language_model_path: str) -> None:
    """After loading a GPTQ or AWQ checkpoint: every linear layer of the decoder layers is quantized and
    none elsewhere is. A checkpoint quantized under other module names loads with no error but with those
    layers randomly initialised: refuse it, with one line. (QUANTIZATION's own layers need no check;
    decoder layers a split leaves on the CPU stay unquantized there.)"""
    if scheme not in PREQUANTIZED_METHODS:
        return
    decoder = model.get_submodule(language_model_path)
    plain = [name for name, m in decoder.named_modules() if type(m) is torch.nn.Linear]
    if plain:
        raise QuantizationError(
            f"{len(plain)} linear layers of the language model were not quantized ({plain[0]}, ...): the "
            f"checkpoint's quantization_config does not match this model's module names"
        )
    inside = {id(m) for m in decoder.modules()}
    stray = [name for name, m in model.named_modules() if id(m) not in inside and _is_quantized_linear(m)]
    if stray:
        raise QuantizationError(
            f"the checkpoint quantizes {stray[0]} (and {len(stray) - 1} more) outside the language model's decoder "
            "layers, which this server keeps in DTYPE; use a checkpoint that quantizes the language model only"
        )


def describe(model: torch.nn.Module, scheme: str, language_model_path: str | None) -> dict[str, Any]:
    """What is quantized and how, for GET / and /health."""
    if scheme == "none":
        return {"scheme": "none"}
    language_model = model.get_submodule(language_model_path) if language_model_path else None
    quantized = 0
    if language_model is not None:
        quantized = sum(1 for m in language_model.modules() if _is_quantized_linear(m))
    description: dict[str, Any] = {
        "scheme": scheme,
        "method": METHODS.get(scheme, f"{scheme} 4-bit, pre-quantized checkpoint (GPTQModel)"),
        "quantized": f"{QUANTIZED_COMPONENT}: {quantized} linear layers of its decoder layers",
        "kept_in_dtype": [*KEPT_IN_DTYPE, f"{QUANTIZED_COMPONENT} embeddings and norms"],
    }
    if language_model is not None:
        description["language_model_bytes"] = loaded_weight_bytes(language_model)
    return description


def _is_quantized_linear(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    if hasattr(module, "qweight"):
        return True
    return (
        isinstance(weight, torch.Tensor) and not weight.is_floating_point() and module.__class__.__name__ != "Embedding"
    )
