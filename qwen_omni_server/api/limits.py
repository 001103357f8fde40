"""The limits a request's own values must keep, checked the same way on both APIs before any work; each
is named by the request's field (`param`) and by the setting that governs it."""

from __future__ import annotations

from qwen_omni_server.api.errors import ApiError
from qwen_omni_server.core.settings import Settings

Value = tuple[str, int | None]  # the field's name in this API, and what the request sent


def check_limits(
    settings: Settings,
    *,
    max_new_tokens: Value = ("max_new_tokens", None),
    max_pixels: Value = ("max_pixels", None),
    texts: dict[str, str | None] | None = None,
) -> None:
    """Refuse an answer bound over MAX_NEW_TOKENS_LIMIT, a pixel budget over MAX_PIXELS_CEILING, or a text
    over MAX_TEXT_CHARS."""
    name, value = max_new_tokens
    if value is not None and value > settings.max_new_tokens_limit:
        raise ApiError(422, f"{name}: at most {settings.max_new_tokens_limit} (MAX_NEW_TOKENS_LIMIT)", param=name)
    for name, text in (texts or {}).items():
        if text is not None and len(text) > settings.max_text_chars:
            message = f"{name}: {len(text):,} characters, at most {settings.max_text_chars:,} (MAX_TEXT_CHARS)"
            raise ApiError(413, message, param=name)
    name, value = max_pixels
    if value is not None and value > settings.max_pixels_ceiling:
        raise ApiError(422, f"{name}: at most {settings.max_pixels_ceiling:,} (MAX_PIXELS_CEILING)", param=name)
