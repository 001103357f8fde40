"""The Gradio chat in a real headless browser (Debian's chromium, driven by Playwright), against the
real server code on the tiny model: two turns (a picture in the first, the second spoken), the
voice's player, starting over; a broken file gives a readable error."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import make_media
import pytest
import torch
from conftest import ROOT, serve, tiny_settings
from servers import free_port

from qwen_omni_server.local.engine import OmniEngine
from qwen_omni_server.local.speech import Codec
from qwen_omni_server.server import create_app

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
    "--autoplay-policy=no-user-gesture-required",
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
def api(tiny_model_dir):
    """The real server code on the tiny model, its talker's end codes switched off (a random talker may
    end before it makes a sound), so a spoken answer always has a voice: 2 s of it, in 0.48 s chunks."""
    engine = OmniEngine.load(
        tiny_settings(tiny_model_dir, enable_audio_output=True, max_speech_seconds=2, speech_chunk_blocks=1)
    )
    with torch.no_grad():
        head = engine.model.talker.codec_head.weight
        head.mul_(1000)
        head[list(Codec.of(engine.model.config).ends)] = 0
    yield from serve(create_app(engine.settings, engine=engine))


@pytest.fixture(scope="module")
def ui(api, tmp_path_factory):
    """The Gradio app, as a separate process in its own environment, pointed at the live server."""
    port = free_port()
    env = {
        **{name: value for name, value in os.environ.items() if name not in ("UI_USERNAME", "UI_PASSWORD")},
        "MULTIMODAL_API_URL": api,
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    log = tmp_path_factory.mktemp("ui") / "gradio.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [str(UI_PYTHON), "-m", "qwen_omni_server.ui"], env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT
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


def timings(page) -> str:
    """The answer's timings line (without the progress timer Gradio shows while a turn runs)."""
    text = page.locator("#timings").inner_text()
    return text[text.find("first token") :] if "first token" in text else ""


def send(page, text: str, *files: Path) -> None:
    """Type a message, attach files, send it, and wait until its answer is complete (or an error shows)."""
    before = timings(page)
    if files:
        page.locator("#message input[type=file]").set_input_files([str(f) for f in files])
        for f in files:  # attached once its thumbnail (which names it) is shown
            page.wait_for_function(
                "stem => document.querySelector('#message .thumbnails').innerHTML.includes(stem)", arg=f.stem
            )
    page.locator("#message textarea").fill(text)
    page.locator("#message textarea").press("Enter")
    page.wait_for_function(
        "before => { const t = document.querySelector('#timings').innerText, e = document.querySelector('#error');"
        " const now = t.slice(t.indexOf('first token'));"
        " return (t.includes('first token') && t.includes('prompt') && now !== before) || e.innerText.includes('⚠️'); }",
        arg=before,
    )


def test_a_two_turn_chat_with_a_picture_and_a_spoken_answer(page, ui, tmp_path):
    picture = tmp_path / "photo.png"
    picture.write_bytes(make_media.image_bytes("PNG", (200, 150)))
    page.goto(ui, wait_until="load")
    page.locator("#message textarea").wait_for()
    status = page.locator("#server-status").inner_text()
    assert "float32 on cpu" in status and "health: ok" in status and "speech on" in status
    send(page, "What is in this picture?", picture)
    first = timings(page)
    assert "image" in first and "first token" in first and "⚠️" not in page.locator("#error").inner_text()
    page.locator("#speak input").check()
    send(page, "Tell me more, aloud.")
    second = timings(page)
    assert "⚠️" not in page.locator("#error").inner_text()
    # The second turn carries the first (its picture included): a longer prompt, with the image in it.
    assert "image" in second and prompt_tokens(second) > prompt_tokens(first)
    bubbles = page.locator("#chat .message-row")
    assert bubbles.count() >= 4  # picture and question, answer, question, answer
    # The voice played as it came: several pieces, scheduled one after another in the page's audio context.
    page.wait_for_function("window.omniVoice && window.omniVoice.seconds > 1.95")
    voice = page.evaluate("({pieces: window.omniVoice.pieces, seconds: window.omniVoice.seconds})")
    assert voice["pieces"] > 1 and abs(voice["seconds"] - 2.0) < 0.05 and "voice 2.0 s" in second
    if os.environ.get("UI_SCREENSHOT"):
        page.screenshot(path=os.environ["UI_SCREENSHOT"], full_page=True)
    page.locator("#start-over").click()
    page.wait_for_function("document.querySelectorAll('#chat .message-row').length === 0")


def prompt_tokens(timings: str) -> int:
    return int(timings.split("prompt ")[1].split()[0])


def test_a_broken_file_shows_a_readable_error(page, ui, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(make_media.image_bytes("PNG")[:120])
    page.goto(ui, wait_until="load")
    page.locator("#message textarea").wait_for()
    send(page, "And this one?", broken)
    error = page.locator("#error").inner_text()
    assert "HTTP 400" in error and "broken.png" in error and "broken or truncated" in error
    assert "Traceback" not in error
