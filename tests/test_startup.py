"""`python multimodal_api.py` exits with one clear message when the model or a setting is wrong."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from servers import run_until_exit


def start(tmp_path, **env) -> subprocess.CompletedProcess:
    return run_until_exit(tmp_path, 18431, **env)


@pytest.mark.parametrize(
    ("model_path", "message"),
    [
        ("/no/such/checkpoint", "is not a folder"),
        ("EMPTY", "has no config.json"),
        ("OTHER", "not Qwen2.5-Omni"),
        ("Qwen/Qwen2.5-Omni-3B", "could not be read or downloaded"),
    ],
)
def test_unloadable_model_exits_with_one_clear_message(tmp_path, model_path, message):
    if model_path == "EMPTY":
        model_path = str(tmp_path / "empty")
        os.mkdir(model_path)
    if model_path == "OTHER":
        model_path = str(tmp_path / "bert")
        os.mkdir(model_path)
        (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    result = start(tmp_path, MODEL_PATH=model_path)
    assert result.returncode != 0
    assert message in result.stderr and "MODEL_PATH" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Started server" not in result.stderr  # refused before serving


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DEVICE_MAP": '{"vision": "cpu"}'}, "valid: language_model, lm_head, visual, audio_tower, talker, token2wav"),
        ({"DEVICE_MAP": "gpu"}, "no CUDA GPU is available"),
        ({"PORT": "eighty"}, "PORT"),
        ({"MAX_NEW_TOKENS_LIMIT": "0"}, "MAX_NEW_TOKENS_LIMIT"),
    ],
)
def test_invalid_settings_fail_at_start_naming_the_variable(tmp_path, env, message):
    result = start(tmp_path, MODEL_PATH=str(tmp_path), **env)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
