"""Settings: every one documented in .env.example, bounded, and device maps checked at start-up."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import ROOT
from pydantic import ValidationError

from qwen_omni_server.core.settings import Settings, load_settings
from qwen_omni_server.local.devices import resolve_placement
from qwen_omni_server.local.placement import COMPONENTS, ConfigError, parse_device_map


def test_every_setting_is_documented_in_env_example():
    documented = set(re.findall(r"^#? ?([A-Z_]+)=", (ROOT / ".env.example").read_text(), re.MULTILINE))
    assert {name.upper() for name in Settings.model_fields} <= documented


def test_env_example_and_readme_table_are_up_to_date():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "document_settings.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


def test_env_example_values_are_valid(monkeypatch):
    settings = Settings(_env_file=ROOT / ".env.example")
    assert settings.port == 8000 and settings.device_map == "auto"


def test_invalid_values_are_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("MAX_FILES_PER_FIELD", "-3")
    with pytest.raises(SystemExit, match="MAX_FILES_PER_FIELD"):
        load_settings(_env_file=None)
    with pytest.raises(ValidationError):
        Settings(_env_file=None, dtype="float8")


def test_presets_and_json_maps():
    assert parse_device_map("auto") is None
    assert (
        parse_device_map("low-vram")["visual"] == "offload" and parse_device_map("low-vram")["language_model"] == "gpu"
    )
    assert parse_device_map("low-vram-cpu")["visual"] == "cpu"
    assert set(parse_device_map("gpu").values()) == {"gpu"}
    custom = parse_device_map('{"visual": "cuda:1", "talker": "cuda"}')
    assert custom["visual"] == "cuda:1" and custom["talker"] == "cuda" and custom["language_model"] == "cpu"
    assert set(custom) == set(COMPONENTS)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"vision_tower": "cpu"}', "unknown component"),
        ('{"visual": "tpu"}', "is not a device"),
        ('{"visual": 3}', "must be a string"),
        ("fast", "is not a preset"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_device_maps_name_the_problem(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_device_map(value)


def test_placement_without_a_gpu():
    settings = Settings(_env_file=None, device_map="auto")
    assert set(resolve_placement(settings, cuda_available=False).components.values()) == {"cpu"}
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_placement(Settings(_env_file=None, device_map="low-vram"), cuda_available=False)
    with pytest.raises(ConfigError, match="GPU_DEVICE"):
        resolve_placement(Settings(_env_file=None, gpu_device="tpu"), cuda_available=False)


def test_presets_use_the_configured_gpu():
    settings = Settings(_env_file=None, device_map="low-vram", gpu_device="cuda:1")
    components = resolve_placement(settings, cuda_available=True).components
    assert components["language_model"] == "cuda:1" and components["visual"] == "offload"


def test_byte_limits_follow_a_copy():
    settings = Settings(_env_file=None)
    assert settings.max_file_bytes == 512 * 1024 * 1024  # read once, as a cached property would keep it
    copy = settings.model_copy(update={"max_file_mb": 0.1, "max_request_mb": 1})
    assert copy.max_file_bytes == int(0.1 * 1024 * 1024) and copy.max_request_bytes == 1024 * 1024


def test_every_setting_is_typed_bounded_and_described():
    """Each field has a description; a number has both bounds; a text a longest length (or a fixed set of
    values); a list a longest length, or bounded items."""
    import typing

    from qwen_omni_server.core.settings import SECTIONS

    def metadata(field) -> dict:
        found = {}
        for item in field.metadata:
            for name in ("ge", "gt", "le", "lt", "max_length", "min_length"):
                if getattr(item, name, None) is not None:
                    found[name] = getattr(item, name)
        return found

    loose = []
    for section in SECTIONS:
        for name, field in section.model_fields.items():
            kinds = {a for a in typing.get_args(field.annotation) if a is not type(None)} or {field.annotation}
            bounds = metadata(field)
            if not field.description:
                loose.append(f"{name}: no description")
            elif kinds & {int, float} and not ({"ge", "gt"} & bounds.keys() and {"le", "lt"} & bounds.keys()):
                loose.append(f"{name}: a number without both bounds")
            elif str in kinds and "max_length" not in bounds:
                loose.append(f"{name}: a text without a longest length")
            elif any(typing.get_origin(kind) is list for kind in kinds) and "max_length" not in bounds:
                items = typing.get_args(next(iter(kinds)))[0]
                if not typing.get_args(items):  # list[Annotated[int, Field(...)]] bounds each item
                    loose.append(f"{name}: a list without a longest length")
    assert not loose, loose
