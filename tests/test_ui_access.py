"""Who may use the web UI, and with it the API key the UI holds: it listens on 127.0.0.1 unless told
otherwise, asks for the UI_USERNAME / UI_PASSWORD login whenever that is set, and refuses to start
beyond loopback with an API key and no login (one line, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from conftest import ROOT
from servers import free_port

UI_PYTHON = ROOT / ".venv-ui" / "bin" / "python"
if not UI_PYTHON.exists() and os.environ.get("REQUIRE_BROWSER_TEST"):
    raise RuntimeError("the UI tests must run here, but the UI environment .venv-ui is missing")
pytestmark = pytest.mark.skipif(not UI_PYTHON.exists(), reason="needs the UI environment .venv-ui")

CLEARED = ("API_KEY", "MULTIMODAL_API_KEY", "UI_USERNAME", "UI_PASSWORD", "GRADIO_SERVER_NAME", "GRADIO_SHARE")
LOGIN = {"UI_USERNAME": "alice", "UI_PASSWORD": "wonderland"}
REFUSED = "refused"
CASES: dict[str, tuple[dict[str, str], object]] = {
    "nothing set": ({}, {"server_name": "127.0.0.1"}),
    "a key on loopback": ({"API_KEY": "k"}, {"server_name": "127.0.0.1"}),
    "a key on localhost": ({"API_KEY": "k", "GRADIO_SERVER_NAME": "localhost"}, {"server_name": "localhost"}),
    "a key on ::1": ({"MULTIMODAL_API_KEY": "k", "GRADIO_SERVER_NAME": "::1"}, {"server_name": "::1"}),
    "0.0.0.0 without a key": ({"GRADIO_SERVER_NAME": "0.0.0.0"}, {"server_name": "0.0.0.0"}),
    "a key on 0.0.0.0": ({"API_KEY": "k", "GRADIO_SERVER_NAME": "0.0.0.0"}, REFUSED),
    "a key on ::": ({"MULTIMODAL_API_KEY": "k", "GRADIO_SERVER_NAME": "::"}, REFUSED),
    "a key on a LAN address": ({"API_KEY": "k", "GRADIO_SERVER_NAME": "192.168.1.5"}, REFUSED),
    "a key on a host name": ({"API_KEY": "k", "GRADIO_SERVER_NAME": "ui.example.org"}, REFUSED),
    "a key and a share link": ({"API_KEY": "k", "GRADIO_SHARE": "True"}, REFUSED),
    "a key on 0.0.0.0 with a login": (
        {"API_KEY": "k", "GRADIO_SERVER_NAME": "0.0.0.0", **LOGIN},
        {"server_name": "0.0.0.0", "auth": [["alice", "wonderland"]]},
    ),
    "a login on loopback": (LOGIN, {"server_name": "127.0.0.1", "auth": [["alice", "wonderland"]]}),
    "half a login": ({"UI_USERNAME": "alice"}, REFUSED),
}
EVALUATE = """
import json, sys
from qwen_omni_server.ui.app import launch_options
results = {}
for name, environ in json.load(sys.stdin).items():
    try:
        results[name] = launch_options(environ)
    except SystemExit as refusal:
        results[name] = {"refused": str(refusal.code)}
print(json.dumps(results))
"""


def ui_env(**extra: str) -> dict[str, str]:
    """Our environment without any key, login or address, the API on a port nothing listens on, plus `extra`."""
    env = {name: value for name, value in os.environ.items() if name not in CLEARED}
    env.update(
        MULTIMODAL_API_URL=f"http://127.0.0.1:{free_port()}",
        GRADIO_SERVER_PORT=str(free_port()),
        GRADIO_ANALYTICS_ENABLED="False",
        OMP_NUM_THREADS="1",
    )
    return {**env, **extra}


@pytest.fixture(scope="module")
def decisions() -> dict[str, dict]:
    """`launch_options` on every case, in the UI's environment (one process)."""
    cases = json.dumps({name: environ for name, (environ, _) in CASES.items()})
    result = subprocess.run(
        [str(UI_PYTHON), "-c", EVALUATE],
        check=False,
        input=cases,
        env=ui_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("case", CASES)
def test_launch_options(decisions, case):
    expected = CASES[case][1]
    decision = decisions[case]
    if expected is REFUSED:
        line = decision.get("refused", "")
        assert "UI_USERNAME" in line and "UI_PASSWORD" in line and "\n" not in line, decision
    else:
        assert decision == expected


@contextmanager
def running_ui(env: dict[str, str]) -> Iterator[tuple[subprocess.Popen, str]]:
    """The UI as its own process; yields it and its loopback URL once that answers, or once it has exited."""
    process = subprocess.Popen(
        [str(UI_PYTHON), "-m", "qwen_omni_server.ui"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{env['GRADIO_SERVER_PORT']}"
    try:
        deadline = time.monotonic() + 90
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield process, url
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(30)


def test_a_key_on_all_addresses_without_a_login_is_refused():
    with running_ui(ui_env(GRADIO_SERVER_NAME="0.0.0.0", API_KEY="secret")) as (process, url):
        if process.poll() is None:
            pytest.fail(f"the UI serves the API key on 0.0.0.0 without a login ({url} answers)")
        stdout, stderr = process.communicate()
    assert process.returncode != 0
    assert "Traceback" not in stderr and stdout == ""
    assert len(stderr.strip().splitlines()) == 1
    assert "UI_USERNAME" in stderr and "UI_PASSWORD" in stderr and "0.0.0.0" in stderr


def test_with_a_login_the_page_asks_for_it():
    env = ui_env(API_KEY="secret", **LOGIN)
    with running_ui(env) as (process, url):
        assert process.poll() is None, process.communicate()[1][-2000:]
        page = httpx.get(f"{url}/", timeout=10).text
        assert '"auth_required":true' in page and "server-status" not in page
        assert httpx.get(f"{url}/config", timeout=10).status_code == 401
        assert httpx.get(f"{url}/gradio_api/info", timeout=10).status_code == 401
        wrong = httpx.post(f"{url}/login", data={"username": "alice", "password": "guess"}, timeout=10)
        assert wrong.status_code != 200
        with httpx.Client(base_url=url, timeout=10) as browser:
            assert browser.post("/login", data={"username": "alice", "password": "wonderland"}).status_code == 200
            config = browser.get("/config")
            assert config.status_code == 200 and "server-status" in config.text
