"""A Gradio chat for the Qwen2.5-Omni server: a client of its OpenAI-compatible API, it loads no model.

    pip install -r requirements-ui.txt
    MULTIMODAL_API_URL=http://localhost:8000 python -m qwen_omni_server.ui   # port: GRADIO_SERVER_PORT (7860)

A conversation with history (every turn goes to `/v1/chat/completions` with the turns before it,
pictures, sounds and videos in any turn), the answer streaming in as the model writes it, and,
when the server speaks, the voice playing as it is made. "Start over" clears the conversation.
Errors from the API are shown as readable messages.

Access: the UI sends the server's API key (MULTIMODAL_API_KEY or API_KEY) for whoever uses it, so it
listens on 127.0.0.1 unless GRADIO_SERVER_NAME says otherwise. With UI_USERNAME and UI_PASSWORD set
it asks for that login (on any address). Listening beyond loopback (0.0.0.0, ::, a LAN address, a
host name other than localhost, or GRADIO_SHARE=True) while holding an API key needs them: without
a login it refuses to start.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import mimetypes
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import gradio as gr
import httpx

from qwen_omni_server.core.audio import SPEECH_SAMPLE_RATE, wav_of_pcm16

API_URL = os.environ.get("MULTIMODAL_API_URL", "http://localhost:8000").rstrip("/")


def api_key(environ: Mapping[str, str]) -> str | None:
    """The key the UI sends to the API: MULTIMODAL_API_KEY, else API_KEY."""
    return environ.get("MULTIMODAL_API_KEY") or environ.get("API_KEY") or None


API_KEY = api_key(os.environ)
PART_TYPES = {"image": "image_url", "audio": "audio_url", "video": "video_url"}


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


def user_turn(message: dict[str, Any]) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """The chat box's text and files as an OpenAI user message (media as data URLs), the files' paths,
    and the message part each file became (to name the file in an error)."""
    parts: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    files = [f if isinstance(f, str) else f.get("path", "") for f in message.get("files") or []]
    for path in files:
        mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
        kind = mime.split("/")[0] if mime.split("/")[0] in PART_TYPES else "image"
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        names[f"content[{len(parts)}]"] = Path(path).name
        parts.append({"type": PART_TYPES[kind], PART_TYPES[kind]: {"url": f"data:{mime};base64,{data}"}})
    if (message.get("text") or "").strip():
        parts.append({"type": "text", "text": message["text"]})
    return {"role": "user", "content": parts}, files, names


# The voice plays as it arrives: each PCM16 piece reaches the page through a hidden textbox, and this
# schedules it right after the previous one with the Web Audio API (Gradio's own streaming player
# needs an ffmpeg binary on the UI's machine).
PLAY_PIECE = """(piece) => {
  if (!piece) return;
  const bytes = Uint8Array.from(atob(piece.slice(piece.indexOf(":") + 1)), (c) => c.charCodeAt(0));
  const pcm = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
  const voice = (window.omniVoice ||= {context: new AudioContext({sampleRate: RATE}), next: 0, pieces: 0, seconds: 0});
  const buffer = voice.context.createBuffer(1, Math.max(1, pcm.length), RATE);
  const samples = buffer.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32768;
  const source = voice.context.createBufferSource();
  source.buffer = buffer;
  source.connect(voice.context.destination);
  voice.next = Math.max(voice.next, voice.context.currentTime);
  source.start(voice.next);
  voice.next += buffer.duration;
  voice.pieces += 1;
  voice.seconds += buffer.duration;
}""".replace("RATE", str(SPEECH_SAMPLE_RATE))
SILENCE = "() => { if (window.omniVoice) { window.omniVoice.context.close(); window.omniVoice = null; } }"


def stream_answer(body: dict[str, Any]) -> Iterator[tuple[str, str, bytes | None, dict]]:
    """POST a streamed chat completion; yield (kind, text, audio, usage) as events arrive. Raises
    RuntimeError with a readable message on an HTTP or stream error."""
    with (
        httpx.Client(timeout=600, headers=_headers()) as client,
        client.stream("POST", f"{API_URL}/v1/chat/completions", json=body) as response,
    ):
        if response.status_code != 200:
            response.read()
            raise RuntimeError(_error_text(response))
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                yield "usage", "", None, event["usage"]
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                audio = delta.get("audio") or {}
                text = delta.get("content") or audio.get("transcript") or ""
                if text:
                    yield "text", text, None, {}
                if audio.get("data"):
                    yield "audio", "", base64.b64decode(audio["data"]), {}
            if event.get("warnings"):
                yield "warnings", "; ".join(event["warnings"]), None, {}


def respond(
    message: dict[str, Any],
    chat: list[dict],
    conversation: list[dict],
    system_prompt: str,
    max_tokens: float,
    speak: bool,
    voice: str | None,
) -> Iterator[tuple]:
    """One turn: send the conversation so far plus this message; stream the answer (and its voice) in.
    Yields (chat box, chat, conversation, voice piece, whole voice, timings, error)."""
    turn, files, names = user_turn(message)
    if not turn["content"]:
        yield gr.skip(), chat, conversation, gr.skip(), gr.skip(), gr.skip(), "⚠️ write something or attach a file"
        return
    chat = [*chat, *({"role": "user", "content": {"path": f}} for f in files)]
    if (message.get("text") or "").strip():
        chat.append({"role": "user", "content": message["text"]})
    chat.append({"role": "assistant", "content": ""})
    system = [{"role": "system", "content": system_prompt}] if system_prompt and system_prompt.strip() else []
    body: dict[str, Any] = {
        "messages": [*system, *conversation, turn],
        "max_tokens": int(max_tokens),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if speak:
        body.update(modalities=["text", "audio"], audio={"voice": voice, "format": "pcm16"})
    yield {"text": "", "files": []}, chat, conversation, "", None, "", ""
    started, first, notes, answer = time.perf_counter(), None, "", ""
    usage: dict[str, Any] = {}
    voice_pieces: list[bytes] = []
    try:
        for kind, text, audio, extra in stream_answer(body):
            first = first or time.perf_counter()
            if kind == "text":
                answer += text
                chat[-1] = {"role": "assistant", "content": answer}
            usage, notes = extra or usage, text if kind == "warnings" else notes
            piece = gr.skip()
            if audio:
                voice_pieces.append(audio)
                piece = f"{len(voice_pieces)}:{base64.b64encode(audio).decode('ascii')}"
            yield gr.skip(), chat, conversation, piece, gr.skip(), gr.skip(), ""
    except (RuntimeError, httpx.HTTPError) as error:
        detail = str(error) if isinstance(error, RuntimeError) else f"the server could not be reached ({error})"
        for part, name in names.items():  # which file a message part was
            detail = detail.replace(f"messages[{len(system) + len(conversation)}].{part}", f"{part} ({name})")
        yield gr.skip(), chat, conversation, gr.skip(), gr.skip(), "", f"⚠️ {detail}"
        return
    conversation = [*conversation, turn, {"role": "assistant", "content": answer}]
    timings = timings_line(time.perf_counter() - started, (first or time.perf_counter()) - started, usage, voice_pieces)
    whole = wav_of_pcm16(b"".join(voice_pieces)) if voice_pieces else None
    yield gr.skip(), chat, conversation, gr.skip(), whole, timings + (f" · {notes}" if notes else ""), ""


def timings_line(total: float, first: float, usage: dict, voice_pieces: list[bytes]) -> str:
    """First token and total time, the prompt's and answer's tokens, and the voice's length."""
    line = f"first token {first * 1000:.0f} ms · total {total * 1000:.0f} ms"
    if usage:
        by_modality = usage.get("prompt_tokens_details", {}).get("by_modality", {})
        line += (
            f" · prompt {usage['prompt_tokens']} tokens ({', '.join(f'{k} {v}' for k, v in by_modality.items() if v)})"
        )
        line += f" · answer {usage['completion_tokens']} tokens"
    if voice_pieces:
        seconds = sum(map(len, voice_pieces)) / 2 / SPEECH_SAMPLE_RATE
        line += f" · voice {seconds:.1f} s in {len(voice_pieces)} pieces"
    return line


def build() -> gr.Blocks:
    status, voices, can_speak = server_info()
    with gr.Blocks(title="Qwen2.5-Omni") as demo:
        gr.Markdown("# Qwen2.5-Omni")
        server_line = gr.Markdown(status, elem_id="server-status")
        conversation = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                chat = gr.Chatbot(label="Conversation", height=520, elem_id="chat")
                box = gr.MultimodalTextbox(
                    placeholder="Ask, and attach pictures, sounds or videos…",
                    file_count="multiple",
                    file_types=["image", "audio", "video"],
                    sources=["upload", "microphone"],
                    elem_id="message",
                )
                error = gr.Markdown(elem_id="error")
                timings = gr.Markdown(elem_id="timings")
            with gr.Column(scale=1):
                system_prompt = gr.Textbox(
                    label="System prompt", placeholder="You are a helpful AI assistant.", elem_id="system-prompt"
                )
                max_tokens = gr.Slider(16, 2048, value=512, step=16, label="Max new tokens")
                with gr.Group(visible=can_speak):
                    speak = gr.Checkbox(label="Speak the answer", value=False, elem_id="speak")
                    voice = gr.Dropdown(choices=voices, value=voices[0] if voices else None, label="Voice")
                piece = gr.Textbox(visible=False, elem_id="voice-piece")
                spoken = gr.Audio(label="The last spoken answer", interactive=False, elem_id="spoken")
                restart = gr.Button("Start over", elem_id="start-over")
        box.submit(
            respond,
            [box, chat, conversation, system_prompt, max_tokens, speak, voice],
            [box, chat, conversation, piece, spoken, timings, error],
        )
        piece.change(None, [piece], None, js=PLAY_PIECE)
        restart.click(lambda: ([], [], None, "", ""), None, [chat, conversation, spoken, timings, error], js=SILENCE)
        demo.load(lambda: server_info()[0], None, server_line)
    return demo


def is_loopback(host: str) -> bool:
    """Whether listening on `host` reaches this machine alone (a name other than localhost counts as not)."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def launch_options(environ: Mapping[str, str]) -> dict[str, Any]:
    """Gradio's `launch` arguments for this environment: the address (127.0.0.1 by default) and the
    login (UI_USERNAME, UI_PASSWORD) when set. Raises SystemExit with one line when only half a
    login is set, or when the UI would listen beyond loopback with an API key and no login."""
    host = environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    options: dict[str, Any] = {"server_name": host}
    if (environ.get("GRADIO_SHARE") or "").lower() == "true":
        options["share"] = True
    username, password = environ.get("UI_USERNAME") or "", environ.get("UI_PASSWORD") or ""
    if username and password:
        options["auth"] = [(username, password)]
    elif username or password:
        raise SystemExit("qwen_omni_server.ui: set both UI_USERNAME and UI_PASSWORD for the UI's login, or neither")
    elif api_key(environ) and exposed(options):
        where = "a public share link" if options.get("share") else host
        raise SystemExit(
            f"qwen_omni_server.ui: refusing to serve the API key on {where} without a login: set UI_USERNAME"
            " and UI_PASSWORD, or listen on 127.0.0.1 (GRADIO_SERVER_NAME, GRADIO_SHARE unset)"
        )
    return options


def exposed(options: Mapping[str, Any]) -> bool:
    """Whether `launch(**options)` can be reached from other machines."""
    return bool(options.get("share")) or not is_loopback(options["server_name"])


def main() -> None:
    """Check who may reach the UI, then serve it."""
    options = launch_options(os.environ)
    if "auth" not in options and exposed(options):
        print(
            f"qwen_omni_server.ui: reachable beyond this machine ({options['server_name']}) without a login;"
            " it holds no API key",
            file=sys.stderr,
        )
    build().launch(**options)
