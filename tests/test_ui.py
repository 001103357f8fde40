"""The Gradio chat in a real headless browser (Debian's chromium, driven by Playwright), against the
real server code on the tiny model. The UI starts first and the server seconds later: the page catches
up (speech, voices, the answer's bounds, the default system prompt). Then three turns (a picture, a
video sent as its last frame and sound track, a spoken answer) with what the model got folded under
each answer and the voice's player; a webcam recording; a cut picture's warning under its answer; a
broken file's readable error; no raw component names in the page."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import make_media
import pytest
import torch
import uvicorn
from conftest import ROOT, tiny_settings
from servers import free_port

from qwen_omni_server.local.engine import OmniEngine
from qwen_omni_server.local.speech import Codec
from qwen_omni_server.api.app import create_app
from qwen_omni_server.core.settings import Settings

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
    "--use-fake-device-for-media-stream",  # a made-up camera and microphone for the webcam test
    "--use-fake-ui-for-media-stream",
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


SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory"
    " and visual inputs, as well as generating text and speech."
)
LIMIT, DEFAULT_TOKENS = 1000, 24  # the server's MAX_NEW_TOKENS_LIMIT and DEFAULT_MAX_NEW_TOKENS, for the page to show


@pytest.fixture(scope="module")
def api_port() -> int:
    return free_port()


class Api:
    """The real server code on the tiny model, on a port chosen before it starts (the UI may be up first). Its
    model loads in the background once `loaded` is set (`/health` says "loading" until then), and it stops
    and starts again as a restarted server does (loading the model again)."""

    def __init__(self, port: int, settings: Settings) -> None:
        self.url, self.port, self.settings = f"http://127.0.0.1:{port}", port, settings
        self.loaded = threading.Event()
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    def load(self, settings: Settings) -> OmniEngine:
        """The tiny model speaking, its talker's end codes switched off (a random talker may end before it
        makes a sound), so a spoken answer always has a voice: 2 s of it, in 0.48 s chunks."""
        self.loaded.wait(120)
        engine = OmniEngine.load(settings)
        with torch.no_grad():
            head = engine.model.talker.codec_head.weight
            head.mul_(1000)
            head[list(Codec.of(engine.model.config).ends)] = 0
        return engine

    def start(self) -> None:
        app = create_app(self.settings, load_engine=self.load)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(30)

    def ready(self) -> str:
        """Let the model load; its URL once `/health` says ok."""
        self.loaded.set()
        deadline = time.monotonic() + 60
        while httpx.get(f"{self.url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.05)
        return self.url


@pytest.fixture(scope="module")
def api(api_port, tiny_model_dir):
    """The server, started (when a test first asks for it: the UI may be up before it), its model held back."""
    settings = tiny_settings(
        tiny_model_dir,
        enable_audio_output=True,
        max_speech_seconds=2,
        speech_chunk_blocks=1,
        max_new_tokens_limit=LIMIT,
        default_max_new_tokens=DEFAULT_TOKENS,
        default_system_prompt=SYSTEM_PROMPT,
    )
    server = Api(api_port, settings)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def live_api(api) -> str:
    """The server with its model loaded; its URL."""
    return api.ready()


@pytest.fixture(scope="module")
def ui(api_port, tmp_path_factory):
    """The Gradio app, as a separate process in its own environment, pointed at the server's address
    (whether the server is up yet or not)."""
    port = free_port()
    env = {
        **{name: value for name, value in os.environ.items() if name not in ("UI_USERNAME", "UI_PASSWORD")},
        "MULTIMODAL_API_URL": f"http://127.0.0.1:{api_port}",
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


def eventually(page, condition: str, arg=None, seconds: float = 20) -> bool:
    """Whether the JavaScript `condition` becomes true in the page within `seconds`."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(condition, arg=arg, timeout=seconds * 1000)
        return True
    except PlaywrightTimeout:
        return False


def open_page(page, ui: str) -> None:
    """Open the UI and wait until it has read a live server."""
    page.goto(ui, wait_until="load")
    page.locator("#message textarea").wait_for()
    eventually(page, "document.querySelector('#server-status').innerText.includes('health: ok')")


def send(page, text: str, *files: Path) -> None:
    """Type a message, attach files, send it, and wait until its answer is complete (or an error shows)."""
    before = timings(page)
    if files:
        page.locator("#message input[type=file]").set_input_files([str(f) for f in files])
        for f in files:  # attached once its thumbnail (which names it) is shown
            page.wait_for_function(
                "stem => !!document.querySelector('#message .thumbnails')?.innerHTML.includes(stem)", arg=f.stem
            )
    page.locator("#message textarea").fill(text)
    page.locator("#message textarea").press("Enter")
    page.wait_for_function(
        "before => { const t = document.querySelector('#timings').innerText, e = document.querySelector('#error');"
        " const now = t.slice(t.indexOf('first token'));"
        " return (t.includes('first token') && t.includes('prompt') && now !== before) || e.innerText.includes('⚠️'); }",
        arg=before,
    )


def what_the_model_got(page, index: int = -1) -> str:
    """The text of an answer's folded "What the model got" (the last by default), opened; "" when there is none."""
    folds = page.locator("#chat .thought-group", has_text="What the model got")
    if folds.count() == 0:
        return ""
    fold = folds.nth(index if index >= 0 else folds.count() + index)
    if not fold.locator(".title.expanded").count():
        fold.locator(".title").click()
        fold.locator(".content").wait_for()
    return fold.inner_text()


STATUS_SAYS = "text => document.querySelector('#server-status').innerText.includes(text)"
OFFERS_SPEECH = """() => document.querySelector('#server-status').innerText.includes('speech on')
    && document.querySelector('#speak')?.offsetParent != null && !!document.querySelector('#voice input')?.value"""


def offers(page) -> dict:
    """What the page offers from the server: speech and voices, the answer's bound, the default system prompt."""
    return page.evaluate(
        """() => {
        const speak = document.querySelector('#speak'), voice = document.querySelector('#voice input');
        const range = document.querySelector('#max-tokens input[type=range]');
        return {
            status: document.querySelector('#server-status').innerText,
            speak: !!speak && speak.offsetParent !== null,
            voice: voice && voice.offsetParent !== null ? voice.value : null,
            max: range && range.max, value: range && range.value,
            placeholder: document.querySelector('#system-prompt textarea').placeholder,
        }; }"""
    )


def test_a_ui_started_before_the_server_offers_what_it_can_once_it_is_up(page, ui, request):
    page.goto(ui, wait_until="load")
    page.locator("#message textarea").wait_for()
    assert eventually(page, STATUS_SAYS, "unreachable"), offers(page)
    assert not offers(page)["speak"]
    time.sleep(2)  # the UI has been up a while when the server comes
    api = request.getfixturevalue("api")  # up, its model loading
    loading = eventually(page, STATUS_SAYS, "loading")
    seen = offers(page)
    assert loading and not seen["speak"], f"the page did not follow the server as it came up: {seen}"
    # What `/` says while the model loads is in the page already: the answer's bounds, the default system prompt.
    assert (seen["max"], seen["value"], seen["placeholder"]) == (str(LIMIT), str(DEFAULT_TOKENS), SYSTEM_PROMPT), seen
    voices = httpx.get(f"{api.ready()}/", timeout=10).json()["model"]["voices"]
    caught_up = eventually(page, OFFERS_SPEECH)
    seen = offers(page)
    assert caught_up, f"the page opened before the server never offered speech: {seen}"
    fresh = page.context.browser.new_page()
    try:
        open_page(fresh, ui)
        eventually(fresh, OFFERS_SPEECH)
        for now in (seen, offers(fresh)):
            assert "float32 on cpu" in now["status"] and "health: ok" in now["status"] and now["speak"], now
            assert now["voice"] == voices[0], now
            assert (now["max"], now["value"]) == (str(LIMIT), str(DEFAULT_TOKENS)), now
            assert now["placeholder"] == SYSTEM_PROMPT, now
    finally:
        fresh.close()


def test_a_restarted_server_is_followed_and_the_choices_stay(page, ui, api, live_api):
    open_page(page, ui)
    assert eventually(page, OFFERS_SPEECH), f"the page offers no speech: {offers(page)}"
    voices = httpx.get(f"{live_api}/", timeout=10).json()["model"]["voices"]
    page.locator("#speak input").check()
    page.locator("#voice input").click()
    page.get_by_role("option", name=voices[-1]).click()
    page.locator("#max-tokens input[type=number]").fill("100")
    page.locator("#max-tokens input[type=number]").press("Enter")
    api.stop()
    assert eventually(page, STATUS_SAYS, "unreachable"), f"the page did not see the server go: {offers(page)}"
    assert offers(page)["speak"] and page.locator("#speak input").is_checked()
    api.start()
    api.ready()
    assert eventually(page, STATUS_SAYS, "health: ok"), f"the page did not see the server come back: {offers(page)}"
    now = offers(page)
    assert now["speak"] and page.locator("#speak input").is_checked(), now
    assert (now["voice"], now["value"]) == (voices[-1], "100"), now


def test_no_raw_component_names_show(page, ui, live_api):
    open_page(page, ui)
    text = page.locator("body").inner_text()
    names = ["MultimodalTextbox", "Textbox", "Chatbot", "Dropdown", "Slider", "Checkbox", "Markdown", "Accordion"]
    shown = [name for name in names if re.search(rf"\b{name}\b", text)]
    assert not shown, f"raw component names in the page: {shown}"


def test_a_picture_and_a_video_as_frame_and_sound_then_a_spoken_answer(page, ui, live_api, tmp_path):
    picture = make_media.write(tmp_path / "photo.png", make_media.image_bytes("PNG", (200, 150)))
    video = make_media.write(tmp_path / "clip.mp4", make_media.video_bytes(2.0, audio=True))
    open_page(page, ui)
    options = [page.get_by_label(o) for o in ("Send videos as their last frame", "Send videos as their sound track")]
    assert [option.count() for option in options] == [1, 1], "no video options in the page"
    for option in options:
        option.check()
    send(page, "What are this picture and this clip?", picture, video)
    first = timings(page)
    assert "first token" in first and "⚠️" not in page.locator("#error").inner_text(), page.locator(
        "#error"
    ).inner_text()
    got = what_the_model_got(page)
    # The picture, then the video as its last frame (a second image) and its sound track (an audio): no video.
    assert re.search(r"image 1: \d+×\d+, \d+ tokens", got), f"no account of the picture under the answer: {got!r}"
    assert "image 2:" in got and re.search(r"audio 1: 2 s, \d+ tokens", got) and "video" not in got, got
    assert "image" in first and "audio" in first and "video" not in first, first

    page.locator("#speak input").check()
    for _ in range(3):  # unseeded, the random tiny talker may end before a sound (the answer says so): ask again
        send(page, "Tell me more, aloud.")
        second = timings(page)
        if " voice " in second or "before it spoke a sound" not in what_the_model_got(page):
            break
    assert "⚠️" not in page.locator("#error").inner_text()
    # The second turn carries the first (the picture, the frame and the sound): a longer prompt, with them in it.
    assert "image" in second and "audio" in second and prompt_tokens(second) > prompt_tokens(first)
    assert page.locator("#chat .message-row").count() >= 4
    # The voice played as it came: every piece of it (about the 2 s the server makes), one after another in the
    # page's audio context.
    made = re.search(r"voice ([\d.]+) s in (\d+) pieces", second)
    assert made and 1.5 < float(made[1]) <= 2.05 and int(made[2]) > 1, second
    played = eventually(page, "n => window.omniVoice && window.omniVoice.pieces >= n", int(made[2]))
    voice = page.evaluate("window.omniVoice && {pieces: window.omniVoice.pieces, seconds: window.omniVoice.seconds}")
    assert played and abs(voice["seconds"] - float(made[1])) < 0.051, f"the page played {voice}; {second}"
    if os.environ.get("UI_SCREENSHOT"):
        what_the_model_got(page, 0)  # opened, for the README's picture
        page.screenshot(path=os.environ["UI_SCREENSHOT"], full_page=True)
    page.locator("#start-over").click()
    page.wait_for_function("document.querySelectorAll('#chat .message-row').length === 0")


def prompt_tokens(timings: str) -> int:
    return int(timings.split("prompt ")[1].split()[0])


def test_a_webcam_recording_goes_with_the_next_message(page, ui, live_api):
    open_page(page, ui)
    assert page.get_by_text("Record a video with the webcam").count() == 1, "no way to record from the webcam"
    page.get_by_text("Record a video with the webcam").click()
    page.get_by_text("Click to Access Webcam").click()
    page.locator("#recording .capture-button").click()
    time.sleep(1.5)
    page.locator("#recording .capture-button").click()
    page.locator("#recording video[src]").wait_for()
    send(page, "What did the camera see?")
    assert "⚠️" not in page.locator("#error").inner_text(), page.locator("#error").inner_text()
    assert "video" in timings(page)
    got = what_the_model_got(page)
    assert re.search(r"video 1: \d+ frames? at [\d.]+ fps over [\d.]+ s, \d+ tokens, with its sound", got), got
    assert page.locator("#recording video[src]").count() == 0  # sent once, then cleared


def test_a_cut_picture_gives_a_warning_under_its_answer(page, ui, live_api, tmp_path):
    cut = make_media.write(tmp_path / "cut.png", make_media.damaged_png("cut", (320, 240)))
    open_page(page, ui)
    send(page, "What is left of this one?", cut)
    assert "⚠️" not in page.locator("#error").inner_text(), page.locator("#error").inner_text()
    got = what_the_model_got(page)
    shown = f"under the answer: {got!r}; below the box: {page.locator('#timings').inner_text()!r}"
    assert "1 warning" in got and "⚠️ cut.png:" in got and re.search(r"image 1: \d+×\d+", got), shown


def test_a_broken_file_shows_a_readable_error(page, ui, live_api, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(make_media.image_bytes("PNG")[:120])
    open_page(page, ui)
    send(page, "And this one?", broken)
    error = page.locator("#error").inner_text()
    assert "HTTP 400" in error and "broken.png" in error and "broken or truncated" in error
    assert "Traceback" not in error
