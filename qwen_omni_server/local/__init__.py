"""ENGINE=local: Qwen2.5-Omni in this process (torch): loading, placement, prompts, generation, speech."""

from __future__ import annotations

from qwen_omni_server.core.errors import EngineFailed
from qwen_omni_server.core.settings import Settings
from qwen_omni_server.local.engine import OmniEngine
from qwen_omni_server.local.loading import ModelLoadError, check_local_model
from qwen_omni_server.local.placement import ConfigError

check = check_local_model


def load(settings: Settings) -> OmniEngine:
    """MODEL_PATH loaded, resident and warmed up; EngineFailed saying what to set when it cannot be."""
    try:
        return OmniEngine.load(settings)
    except (ModelLoadError, ConfigError) as error:
        raise EngineFailed(str(error)) from error
