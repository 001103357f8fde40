"""The container image: the Containerfile's build context holds what it copies and nothing else, the compose file
wires the front to its vLLM upstreams, and scripts/container_check.sh builds the image, runs it on the tiny model
and checks its answers. That check takes minutes and several GB of disk while it runs: it runs where
REQUIRE_CONTAINER_CHECK=1 (scripts/test.sh sets it) and is skipped elsewhere."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import yaml
from conftest import ROOT


def containerfile() -> str:
    return (ROOT / "Containerfile").read_text()


def test_the_build_context_holds_what_the_containerfile_copies():
    """.containerignore admits only named paths; each path a COPY takes is one of them, and the environments,
    caches and .git are not."""
    lines = [line.strip() for line in (ROOT / ".containerignore").read_text().splitlines()]
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*", "the context is an allowlist"
    admitted = {rule[1:] for rule in rules if rule.startswith("!")}
    copied = {
        source
        for line in re.findall(r"^COPY\s+(.+)$", containerfile(), re.MULTILINE)
        for source in line.split()[:-1]
        if not source.startswith("--")
    }
    assert copied and copied <= admitted, copied - admitted
    assert not {".venv", ".venv-ui", ".cache", ".git", "bench", "tests"} & admitted
    assert (ROOT / ".dockerignore").resolve() == (ROOT / ".containerignore").resolve()


def test_the_image_runs_as_a_user_with_a_health_check_and_a_cache_volume():
    text = containerfile()
    assert re.search(r"^FROM debian:\S+", text, re.MULTILINE)
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, re.MULTILINE)
    assert "VOLUME /cache" in text and "HF_HOME=/cache/huggingface" in text
    assert "-r /tmp/requirements_multimodal.txt" in text


def test_the_compose_file_puts_the_front_before_two_vllm_upstreams():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    front = services["front"]
    environment = front["environment"]
    assert environment["ENGINE"] == "openai"
    upstreams = [name for name, service in services.items() if service.get("image", "").startswith("vllm/vllm-openai")]
    assert len(upstreams) == 2
    assert json.loads(environment["ENGINE_URLS"]) == [f"http://{name}:8000/v1" for name in upstreams]
    for name in upstreams:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        assert "--trust-request-mm-kwargs" in services[name]["command"] and services[name]["ipc"] == "host"
    assert set(front["depends_on"]) == set(upstreams)


def test_the_image_builds_runs_and_answers():
    if os.environ.get("REQUIRE_CONTAINER_CHECK") != "1":
        pytest.skip("REQUIRE_CONTAINER_CHECK=1 runs scripts/container_check.sh (scripts/test.sh sets it)")
    result = subprocess.run(
        ["scripts/container_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
