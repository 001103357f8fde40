"""A Gradio web UI for the Qwen2.5-Omni server: a client of its HTTP API, it loads no model.

    pip install -r requirements-ui.txt
    MULTIMODAL_API_URL=http://localhost:8000 python gradio_multimodal_app.py   # port: GRADIO_SERVER_PORT (7860)

Text, a system prompt, images, audio and video (uploads, microphone, webcam), the two video
flags, the answer length, and (when the server speaks) a voice and "speak the answer". The
answer streams in as the model writes it; errors from the API are shown as readable messages.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
import httpx

API_URL = os.environ.get("MULTIMODAL_API_URL", "http://localhost:8000").rstrip("/")
API_KEY = os.environ.get("MULTIMODAL_API_KEY") or os.environ.get("API_KEY")


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}


def server_info() -> tuple[str, list[str], bool]:
    """A line about the server (model, devices, health), its voices, and whether it can speak."""
    try:
        about = httpx.get(f"{API_URL}/", headers=_headers(), timeout=5).json()
        health = httpx.get(f"{API_URL}/health", headers=_headers(), timeout=5).json()
    except (httpx.HTTPError, ValueError) as error:
        return (
            f"**Server {API_URL} unreachable** ({type(error).__name__}). Start it with `scripts/serve.sh`.",
            [],
            False,
        )
    model = about.get("model") or {}
    if "devices" not in model:
        return f"**{API_URL}**: {health.get('status', 'unknown')} ({health.get('detail') or 'loading'})", [], False
    speech = "speech on" if model.get("audio_output") else "speech off"
    line = (
        f"**Model** `{model['model']}` · {model['dtype']} on {', '.join(model['devices'])} · {speech} · "
        f"health: **{health.get('status')}** · API {API_URL}"
    )
    return line, list(model.get("voices") or []), bool(model.get("audio_output"))


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    detail = body.get("detail") or (body.get("error") or {}).get("message") or body
    return f"HTTP {response.status_code}: {detail}"


def _paths(files: Any) -> list[str]:
    if not files:
        return []
    files = files if isinstance(files, list) else [files]
    return [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in files]


def ask(
    text: str,
    system_prompt: str,
    images: Any,
    audios: Any,
    videos: Any,
    microphone: str | None,
    webcam: str | None,
    extract_audio: bool,
    extract_frame: bool,
    max_new_tokens: float,
    speak: bool,
    voice: str | None,
) -> Iterator[tuple[str, str | None, str, str]]:
    """Send the request with stream=true; yield (answer so far, spoken answer file, timings, error)."""
    data = {
        "text": text or "",
        "max_new_tokens": str(int(max_new_tokens)),
        "stream": "true",
        "extract_video_audio": str(bool(extract_audio)).lower(),
        "extract_video_frame": str(bool(extract_frame)).lower(),
    }
    if system_prompt and system_prompt.strip():
        data["system_prompt"] = system_prompt
    if speak:
        data["return_audio"] = "true"
        if voice:
            data["speaker"] = voice
    uploads = [("images", p) for p in _paths(images)] + [("audios", p) for p in _paths(audios) + _paths(microphone)]
    uploads += [("videos", p) for p in _paths(videos) + _paths(webcam)]
    started = time.perf_counter()
    answer, first_token, usage, spoken = "", None, {}, None
    try:
        with ExitStack() as files, httpx.Client(timeout=600, headers=_headers()) as client:
            parts = [(field, (Path(path).name, files.enter_context(open(path, "rb")))) for field, path in uploads]
            with client.stream("POST", f"{API_URL}/multimodal", data=data, files=parts) as response:
                if response.status_code != 200:
                    response.read()
                    yield "", None, "", f"⚠️ {_error_text(response)}"
                    return
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        yield answer, None, "", f"⚠️ {event['error']['message']}"
                        return
                    usage = event.get("usage") or usage
                    delta = event["choices"][0]["delta"] if event.get("choices") else {}
                    if delta.get("audio"):
                        spoken = _save_wav(delta["audio"]["data"])
                    if delta.get("content"):
                        first_token = first_token or time.perf_counter()
                        answer += delta["content"]
                        yield answer, None, "", ""
    except httpx.HTTPError as error:
        yield (
            answer,
            None,
            "",
            f"⚠️ the server could not be reached ({type(error).__name__}): is it running at {API_URL}?",
        )
        return
    total = time.perf_counter() - started
    timings = (
        f"first token {((first_token or time.perf_counter()) - started) * 1000:.0f} ms · total {total * 1000:.0f} ms"
    )
    if usage:
        timings += (
            f" · prompt {usage['prompt_tokens']} tokens "
            f"({', '.join(f'{k} {v}' for k, v in usage['prompt_tokens_details']['by_modality'].items() if v)})"
            f" · answer {usage['completion_tokens']} tokens"
        )
    yield answer, spoken, timings, ""


def _save_wav(data: str) -> str:
    handle, path = tempfile.mkstemp(prefix="answer-", suffix=".wav")
    with os.fdopen(handle, "wb") as out:
        out.write(base64.b64decode(data))
    return path


def build() -> gr.Blocks:
    status, voices, can_speak = server_info()
    with gr.Blocks(title="Qwen2.5-Omni") as demo:
        gr.Markdown("# Qwen2.5-Omni")
        server_line = gr.Markdown(status, elem_id="server-status")
        with gr.Row():
            with gr.Column():
                text = gr.Textbox(label="Your question", lines=3, elem_id="text")
                system_prompt = gr.Textbox(
                    label="System prompt", placeholder="You are a helpful AI assistant.", elem_id="system-prompt"
                )
                with gr.Row():
                    images = gr.File(label="Images", file_count="multiple", elem_id="images")
                    audios = gr.File(label="Audio", file_count="multiple", elem_id="audios")
                    videos = gr.File(label="Videos", file_count="multiple", elem_id="videos")
                with gr.Row():
                    microphone = gr.Audio(label="Microphone", sources=["microphone"], type="filepath")
                    webcam = gr.Video(label="Webcam", sources=["webcam"])
                with gr.Row():
                    extract_audio = gr.Checkbox(label="Use each video's audio track")
                    extract_frame = gr.Checkbox(label="Use each video's last frame")
                max_new_tokens = gr.Slider(16, 2048, value=512, step=16, label="Max new tokens")
                with gr.Row(visible=can_speak):
                    speak = gr.Checkbox(label="Speak the answer", value=False)
                    voice = gr.Dropdown(choices=voices, value=voices[0] if voices else None, label="Voice")
                submit = gr.Button("Ask", variant="primary", elem_id="submit")
            with gr.Column():
                error = gr.Markdown(elem_id="error")
                answer = gr.Textbox(label="Answer", lines=12, elem_id="answer")
                spoken = gr.Audio(label="Spoken answer", type="filepath", elem_id="spoken")
                timings = gr.Markdown(elem_id="timings")
        submit.click(
            ask,
            [
                text,
                system_prompt,
                images,
                audios,
                videos,
                microphone,
                webcam,
                extract_audio,
                extract_frame,
                max_new_tokens,
                speak,
                voice,
            ],
            [answer, spoken, timings, error],
        )
        demo.load(lambda: server_info()[0], None, server_line)
    return demo


if __name__ == "__main__":
    build().launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"))
