"""Fuzz the API from its own OpenAPI schema (schemathesis): whatever arrives, never a 5xx."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings

from conftest import FakeEngine
from multimodal_api import create_app
from settings import Settings

app = create_app(Settings(_env_file=None, model_path="unused", max_request_mb=2), engine=FakeEngine())
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_server_fail(case):
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
