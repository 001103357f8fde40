"""The Gradio UI in a real headless browser (Debian's chromium, driven by Playwright), against the
real server code on the tiny model: load the page, upload an image, ask, see the answer; upload a
broken file, see a readable error."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

import make_media
from conftest import ROOT
from servers import free_port

UI_PYTHON = ROOT / ".venv-ui" / "bin" / "python"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
]
missing = [
    what
    for what, ok in (
        ("the UI environment .venv-ui (scripts/test.sh makes it)", UI_PYTHON.exists()),
        ("Debian's chromium", Path(CHROMIUM).exists()),
    )
    if not ok
]
if missing and os.environ.get("REQUIRE_BROWSER_TEST"):
    raise RuntimeError(f"the browser test must run here, but {' and '.join(missing)} is missing")
pytestmark = pytest.mark.skipif(bool(missing), reason=f"needs {' and '.join(missing)}")


@pytest.fixture(scope="module")
def ui(live_server, tmp_path_factory):
    """The Gradio app, as a separate process in its own environment, pointed at the live server."""
    port = free_port()
    env = {
        **os.environ,
        "MULTIMODAL_API_URL": live_server,
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    log = tmp_path_factory.mktemp("ui") / "gradio.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [str(UI_PYTHON), str(ROOT / "gradio_multimodal_app.py")], env=env, stdout=output, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(900):
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None:
                raise RuntimeError(f"the UI exited: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def page(ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def ask_with_image(page, ui, picture: Path, question: str) -> None:
    page.goto(ui, wait_until="networkidle")
    page.locator("#text textarea").fill(question)
    page.locator("#images input[type=file]").set_input_files(str(picture))
    # The upload is done once the file is listed (Gradio may hide a long name's text, so not "visible").
    page.wait_for_function("stem => document.querySelector('#images').textContent.includes(stem)", arg=picture.stem)
    page.locator("#submit").click()


def test_the_page_shows_the_server_and_answers_an_image(page, ui, tmp_path):
    picture = tmp_path / "photo.png"
    picture.write_bytes(make_media.image_bytes("PNG", (200, 150)))
    ask_with_image(page, ui, picture, "What is in this picture?")
    status = page.locator("#server-status").inner_text()
    assert "float32 on cpu" in status and "health: ok" in status
    page.wait_for_function("document.querySelector('#timings').innerText.includes('prompt')")
    assert page.locator("#answer textarea").input_value()
    timings = page.locator("#timings").inner_text()
    assert "image" in timings and "first token" in timings
    assert page.locator("#error").inner_text().strip() == ""
    page.screenshot(path=str(tmp_path / "answer.png"), full_page=True)


def test_a_broken_file_shows_a_readable_error(page, ui, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(make_media.image_bytes("PNG")[:120])
    ask_with_image(page, ui, broken, "And this one?")
    page.wait_for_function("document.querySelector('#error').innerText.includes('HTTP')")
    error = page.locator("#error").inner_text()
    assert "HTTP 400" in error and "images[0] 'broken.png'" in error and "broken or truncated" in error
    assert "Traceback" not in error
