"""transformers' token-id range notes about the talker config are wrong and kept out of the log; others stay."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from conftest import ROOT

from qwen_omni_server.local.loading import TalkerTokenIdNotes


def note(name: str, vocab: int, value: int) -> logging.LogRecord:
    message = (
        f"Model config: {name} must be `None` or an integer within the vocabulary (between 0 and {vocab - 1}), "
        f"got {value}. This may result in unexpected behavior."
    )
    return logging.LogRecord("transformers.configuration_utils", logging.WARNING, __file__, 1, message, None, None)


def test_only_the_talkers_thinker_side_token_ids_are_dropped():
    notes = TalkerTokenIdNotes()
    for name in ("tts_text_start_token_id", "tts_text_end_token_id", "tts_text_pad_token_id"):
        assert not notes.filter(note(name, 8448, 151860))
    for name in ("vision_start_token_id", "vision_end_token_id", "audio_start_token_id", "audio_end_token_id"):
        assert not notes.filter(note(name, 8448, 151647))
    assert notes.filter(note("pad_token_id", 151936, -1))  # a real problem still shows
    assert notes.filter(logging.LogRecord("x", logging.WARNING, __file__, 1, "something else", None, None))


def test_loading_the_checkpoint_prints_no_talker_token_id_notes(tiny_model_dir):
    script = (
        "import qwen_omni_server.local.loading as loading, transformers; "
        f"loading.load_config({str(tiny_model_dir)!r}); "
        f"transformers.Qwen2_5OmniForConditionalGeneration.from_pretrained({str(tiny_model_dir)!r})"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "must be `None` or an integer within the vocabulary" not in result.stderr
