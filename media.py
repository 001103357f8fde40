"""The media decoders (uploaded bytes to PIL images and 16 kHz mono audio), importable as `media` as before:
the module is `qwen_omni_server.core.media`."""

from qwen_omni_server.core.media import *  # noqa: F403
from qwen_omni_server.core.media import __all__  # noqa: F401
