"""Fuzz the API: from its own OpenAPI schema (schemathesis: /v1's JSON, /multimodal's form), and /multimodal
with random bytes in each file field and random field values. Whatever arrives: never a 5xx, never a hang,
no temporary file left."""

from __future__ import annotations

import os
import tempfile

import make_media
import schemathesis
from conftest import FakeEngine
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_omni_server.core.settings import Settings
from qwen_omni_server.server import create_app

app = create_app(Settings(_env_file=None, model_path="unused", max_request_mb=2), engine=FakeEngine())
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_server_fail(case):
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"


SEEDS = [make_media.image_bytes("PNG"), make_media.audio_bytes("wav", 0.3), make_media.video_bytes(0.5, audio=False)]
file_bytes = st.one_of(
    st.binary(max_size=3000),
    st.sampled_from(SEEDS).flatmap(lambda seed: st.integers(0, len(seed)).map(lambda cut: seed[:cut])),
    st.sampled_from(SEEDS).flatmap(  # a real file with a few bytes changed
        lambda seed: st.lists(st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 255)), max_size=8).map(
            lambda edits: bytes(_edit(bytearray(seed), edits))
        )
    ),
)
field_value = st.one_of(st.text(max_size=40), st.sampled_from(["true", "false", "0", "1", "-1", "999999999999", "wav"]))
form_fields = st.dictionaries(
    st.sampled_from(
        ["text", "max_new_tokens", "extract_video_audio", "extract_video_frame", "max_pixels", "response_format"]
    ),
    field_value,
    max_size=4,
)
files = st.lists(
    st.tuples(st.sampled_from(["images", "audios", "videos"]), st.text(max_size=20), file_bytes), max_size=3
)


def _edit(data: bytearray, edits) -> bytearray:
    for index, value in edits:
        data[index] = value
    return data


def test_random_files_and_fields_get_an_answer_and_leave_no_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where uploads spool to disk
    fuzz_app = create_app(
        Settings(_env_file=None, model_path="unused", decode_timeout_seconds=10, max_new_tokens_limit=64),
        engine=FakeEngine(),
    )

    with TestClient(fuzz_app) as client:

        @given(data=form_fields, uploads=files)
        @settings(max_examples=60, deadline=15_000, suppress_health_check=list(HealthCheck))
        def fuzz(data, uploads):
            parts = [(field, (name, content, "application/octet-stream")) for field, name, content in uploads]
            response = client.post("/multimodal", data=data, files=parts)
            assert response.status_code < 500, response.text[:300]

        fuzz()
        big = client.post("/multimodal", files=[("videos", ("big.bin", os.urandom(3 * 1024 * 1024)))])
        assert big.status_code in (400, 415)  # spooled to disk (over 1 MiB), refused
    assert list(tmp_path.iterdir()) == []
