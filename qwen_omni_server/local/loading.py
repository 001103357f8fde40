"""Loading a checkpoint: its config (with clear errors for a wrong MODEL_PATH), the quantization config,
and the start-up checks that run before the server listens."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qwen_omni_server.core.settings import Settings
from qwen_omni_server.local import quantization
from qwen_omni_server.local.devices import (
    Placement,
    batch_size_for,
    check_placement_settings,
    cpu_budgets,
    cpu_dtype,
    resolve_dtype,
    resolve_placement,
    runs_on_cuda,
)
from qwen_omni_server.local.placement import (
    COMPONENT_PATHS,
    CPU,
    ENCODERS,
    ConfigError,
    attention_for,
    build_skeleton,
    find_component,
    module_device_map,
)
from qwen_omni_server.local.residency import keep_last_logits, make_resident, run_on_cpu

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parent / "configs"
MODEL_SHORTHANDS = {  # architecture configs carried in the repository: plans need no download
    "3b": CONFIGS / "qwen2.5-omni-3b.config.json",
    "7b": CONFIGS / "qwen2.5-omni-7b.derived.config.json",
}


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


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint loaded and made ready, with what it was loaded as."""

    model: Any
    processor: Any
    settings: Settings  # with the pixel budgets fitted to the CPU's pace, where it computes on the CPU
    placement: Placement
    dtype: torch.dtype
    resident_bytes: int
    batch_size: int  # MAX_BATCH_SIZE, `auto` resolved


def choose_dtype(settings: Settings, config, placement: Placement) -> torch.dtype:
    """DTYPE for this placement; on the CPU, `auto` takes the faster of float32 and bfloat16, measured on this
    CPU at the thinker's shapes, that fits the free RAM (logged with the figures)."""
    uses_gpu = runs_on_cuda(placement.components, settings)
    if uses_gpu or settings.dtype != "auto":
        return resolve_dtype(settings, uses_gpu)
    dtype, why = cpu_dtype(settings, config)
    logger.info("DTYPE=auto on the CPU: %s (%s)", str(dtype).removeprefix("torch."), why)
    return dtype


def load_model(settings: Settings) -> LoadedModel:
    """MODEL_PATH loaded with the configured placement and dtype, its weights copied into memory, the encoders
    that run on the CPU computing there, and logits kept for the last position only."""
    from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor

    if settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    config = load_config(settings.model_path)
    config.enable_audio_output = settings.enable_audio_output
    placement = resolve_placement(settings, config)
    if placement.plan is not None:
        logger.info("DEVICE_MAP=auto planned:\n%s", placement.plan.table())
    uses_gpu = runs_on_cuda(placement.components, settings)
    dtype = choose_dtype(settings, config, placement)
    batch_size = batch_size_for(settings, config, placement, dtype)
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
        language_model = find_component(model, "language_model")
        if language_model is None:
            raise ModelLoadError(f"MODEL_PATH={settings.model_path!r}: the checkpoint has no language model")
        quantization.check_loaded(model, scheme, language_model)
        processor = Qwen2_5OmniProcessor.from_pretrained(settings.model_path)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load the checkpoint at MODEL_PATH={settings.model_path!r}: {error}") from error
    for encoder in ENCODERS:
        if uses_gpu and placement.components.get(encoder) == CPU:
            run_on_cpu(model.get_submodule(find_component(model, encoder)))
    keep_last_logits(model.thinker.lm_head)
    if getattr(model, "has_talker", False):
        keep_last_logits(model.talker.codec_head)  # its prefill's logits: [prompt, 8448] in float32
    resident = make_resident(model)
    if not uses_gpu:
        updates, cost = cpu_budgets(settings, model, dtype)
        logger.info("on the CPU: %s", cost)
        settings = settings.model_copy(update=updates) if updates else settings
    return LoadedModel(model, processor, settings, placement, dtype, resident, batch_size)


def check_local_model(settings: Settings) -> None:
    """Exit with one line, before serving, on a wrong placement, MODEL_PATH or quantized checkpoint."""
    try:
        check_placement_settings(settings)
        config = load_config(settings.model_path)
        quantization.check_prequantized(config, settings.quantization)
    except (ConfigError, quantization.QuantizationError) as error:
        raise SystemExit(f"invalid configuration: {error}") from None
    except ModelLoadError as error:
        raise SystemExit(f"error: {error}") from None
