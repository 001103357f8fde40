"""A Gradio chat for the Qwen2.5-Omni server: a client of its OpenAI-compatible API, it loads no model.

    pip install -r requirements-ui.txt
    MULTIMODAL_API_URL=http://localhost:8000 python -m qwen_omni_server.ui   # port: GRADIO_SERVER_PORT (7860)

A conversation with history (every turn goes to `/v1/chat/completions` with the turns before it,
pictures, sounds and videos in any turn, recorded from the microphone or the webcam too), the answer
streaming in as the model writes it, and, when the server speaks, the voice playing as it is made.
Videos may be sent as their last frame and/or their sound track (the server's `extract_video_frame` /
`extract_video_audio`). Under each answer, folded, what the model got of each file and any warning.
What the server offers (voices, speech, the answer's bounds, its default system prompt) is read when a
page opens and again every few seconds, so a UI started before the server catches up with it.
"Start over" clears the conversation. Errors from the API are shown as readable messages.

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
import re
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
import httpx

from qwen_omni_server.core.audio import SPEECH_SAMPLE_RATE, wav_of_pcm16

API_URL = os.environ.get("MULTIMODAL_API_URL", "http://localhost:8000").rstrip("/")


def api_key(environ: Mapping[str, str]) -> str | None:
    """The key the UI sends to the API: MULTIMODAL_API_KEY, else API_KEY."""
    return environ.get("MULTIMODAL_API_KEY") or environ.get("API_KEY") or None


API_KEY = api_key(os.environ)
PART_TYPES = {"image": "image_url", "audio": "audio_url", "video": "video_url"}
CSS = "#chat .message-row img, #chat .message-row video { max-height: 140px; width: auto; }"  # files in the chat, small
CHECK_SECONDS = 2.0  # how often a page reads the server again while it is away or loading
CHECK_SECONDS_READY = 5.0  # and once it is ready (a server gone or restarted shows within this)


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}


@dataclass(frozen=True)
class ServerInfo:
    """What the server offers, as a page shows it; the bounds are the server's own defaults until it says."""

    line: str
    ready: bool = False
    answered: bool = False
    voices: tuple[str, ...] = ()
    speaks: bool = False
    max_new_tokens_limit: int = 2048
    default_max_new_tokens: int = 512
    system_prompt: str = ""


def server_info() -> ServerInfo:
    """Read `GET /` and `/health`: the line about the server (model, devices, health) and what it offers."""
    try:
        response = httpx.get(f"{API_URL}/", headers=_headers(), timeout=5)
        health = httpx.get(f"{API_URL}/health", headers=_headers(), timeout=5).json()
        about = response.json()
    except (httpx.HTTPError, ValueError) as error:
        return ServerInfo(
            f"**Server {API_URL} unreachable** ({type(error).__name__}). Start it with `scripts/serve.sh`:"
            " this page finds it within seconds."
        )
    if response.status_code in (401, 403):
        code = response.status_code
        return ServerInfo(f"**Server {API_URL}** refuses the UI's key (HTTP {code}): check MULTIMODAL_API_KEY.")
    limits, defaults = about.get("limits") or {}, about.get("defaults") or {}
    offered: dict[str, Any] = {
        "answered": True,
        "max_new_tokens_limit": int(limits.get("max_new_tokens_limit") or ServerInfo.max_new_tokens_limit),
        "default_max_new_tokens": int(defaults.get("max_new_tokens") or ServerInfo.default_max_new_tokens),
        "system_prompt": str(defaults.get("system_prompt") or ""),
    }
    model = about.get("model") or {}
    if "devices" not in model:
        state = health.get("status", "unknown")
        detail = f": {health['detail']}" if health.get("detail") else "…" if state == "loading" else ""
        return ServerInfo(f"**Server {API_URL}**: {state}{detail}", **offered)
    speaks = bool(model.get("audio_output"))
    line = (
        f"**Model** `{model['model']}` · {model.get('dtype')} on {', '.join(model['devices'])} · "
        f"speech {'on' if speaks else 'off'} · health: **{health.get('status')}** · API {API_URL}"
    )
    return ServerInfo(line, True, voices=tuple(model.get("voices") or ()), speaks=speaks, **offered)


def refresh(known: ServerInfo | None, max_tokens: float, voice: str | None) -> tuple:
    """Read the server again and update what changed: (known, status line, speech group, "Speak the answer",
    voice, max tokens, system prompt, timer). A page's first answer from the server sets the defaults; a
    server that was ready and is now away or loading changes the line alone until it is ready again."""
    info = server_info()
    if info == known:
        return (known, *(gr.skip() for _ in range(7)))
    timer = gr.Timer(CHECK_SECONDS_READY if info.ready else CHECK_SECONDS)
    if known is not None and known.ready and not info.ready:
        return (replace(known, line=info.line, ready=False), info.line, *(gr.skip() for _ in range(5)), timer)
    if known is None or not known.answered:
        max_tokens = info.default_max_new_tokens
    voices = list(info.voices)
    chosen = voice if voice in voices else next(iter(voices), None)
    return (
        info,
        info.line,
        gr.Group(visible=info.speaks),
        gr.skip() if info.speaks else False,
        gr.Dropdown(choices=voices, value=chosen),
        gr.Slider(maximum=info.max_new_tokens_limit, value=min(max_tokens, info.max_new_tokens_limit)),
        gr.Textbox(placeholder=info.system_prompt or "the server's default"),
        timer,
    )


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    detail = body.get("detail") or (body.get("error") or {}).get("message") or body
    return f"HTTP {response.status_code}: {detail}"


def user_turn(message: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The chat box's text and files as an OpenAI user message (media as data URLs), and the files' paths.
    The message's `names` (the UI's own, not sent) tell which file each part was, to name it in errors."""
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
    return {"role": "user", "content": parts, "names": names}, files


FILE_PART = re.compile(r"messages\[(\d+)\]\.(content\[\d+\])")


def name_files(text: str, messages: list[dict[str, Any]]) -> str:
    """`text` with each `messages[i].content[j]` that was a file written as that file's name."""

    def name(match: re.Match[str]) -> str:
        index = int(match[1])
        names = messages[index].get("names") or {} if index < len(messages) else {}
        return names.get(match[2], match[0])

    return FILE_PART.sub(name, text)


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


def sendable(body: dict[str, Any]) -> dict[str, Any]:
    """The body without the UI's own `names` of each message."""
    messages = [{k: v for k, v in message.items() if k != "names"} for message in body["messages"]]
    return {**body, "messages": messages}


def stream_answer(body: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """POST a streamed chat completion; yield (kind, value) as events arrive: text (str), audio (bytes),
    usage, inputs (dicts) and warnings (a list). Raises RuntimeError with a readable message on an HTTP or
    stream error."""
    with (
        httpx.Client(timeout=600, headers=_headers()) as client,
        client.stream("POST", f"{API_URL}/v1/chat/completions", json=sendable(body)) as response,
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
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                audio = delta.get("audio") or {}
                text = delta.get("content") or audio.get("transcript") or ""
                if text:
                    yield "text", text
                if audio.get("data"):
                    yield "audio", base64.b64decode(audio["data"])
            for kind in ("usage", "inputs", "warnings"):
                if event.get(kind):
                    yield kind, event[kind]


def request_body(
    turn: dict[str, Any],
    conversation: list[dict],
    system_prompt: str,
    max_tokens: float,
    speak: bool,
    voice: str | None,
    video_frame: bool,
    video_audio: bool,
) -> dict[str, Any]:
    """The /v1 body for the conversation so far plus this turn (the video options only when set)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt and system_prompt.strip() else []
    body: dict[str, Any] = {
        "messages": [*system, *conversation, turn],
        "max_tokens": int(max_tokens),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if speak:
        body.update(modalities=["text", "audio"], audio={"voice": voice, "format": "pcm16"})
    if video_frame:
        body["extract_video_frame"] = True
    if video_audio:
        body["extract_video_audio"] = True
    return body


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _number(value: float) -> str:
    return f"{round(value, 1):g}"


def _tokens(entry: Mapping[str, Any]) -> str:
    return f", {_count(entry['tokens'], 'token')}" if "tokens" in entry else ""


def _video_words(video: Mapping[str, Any]) -> str:
    words = f"{_count(video['frames'], 'frame')} at {_number(video['fps'])} fps over {_number(video['seconds'])} s"
    words += _tokens(video)
    sound = f" ({_count(video['audio_tokens'], 'token')})" if "audio_tokens" in video else ""
    if video.get("audio_interleaved"):
        return f"{words}, with its sound{sound}"
    if sound:
        return f"{words}, its sound after it{sound}"
    return (
        f"{words}, {_number(video['audio_seconds'])} s of sound" if "audio_seconds" in video else f"{words}, no sound"
    )


def inputs_words(inputs: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    """What the model got of each file, in words: "image 1: 644×196, 161 tokens", "audio 1: 1.5 s, 37 tokens"…"""
    lines = [
        f"image {n}: {image['width']}×{image['height']}{_tokens(image)}"
        for n, image in enumerate(inputs.get("images") or [], 1)
    ]
    lines += [
        f"audio {n}: {_number(audio['seconds'])} s{_tokens(audio)}"
        for n, audio in enumerate(inputs.get("audios") or [], 1)
    ]
    lines += [f"video {n}: {_video_words(video)}" for n, video in enumerate(inputs.get("videos") or [], 1)]
    return lines


@dataclass
class Answer:
    """One answer as its events arrive: its text, voice, usage, what the model got, warnings, times."""

    started: float = field(default_factory=time.perf_counter)
    first: float | None = None
    text: str = ""
    voice: list[bytes] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)

    def add(self, kind: str, value: Any) -> str | None:
        """Take one event of `stream_answer`; return the voice piece for the page's player, if it was one."""
        if kind in ("text", "audio"):
            self.first = self.first or time.perf_counter()
        if kind == "text":
            self.text += value
        elif kind == "audio":
            self.voice.append(value)
            return f"{len(self.voice)}:{base64.b64encode(value).decode('ascii')}"
        elif kind == "usage":
            self.usage = value
        elif kind == "inputs":
            self.inputs = value
        elif kind == "warnings":
            self.warnings += [name_files(warning, self.messages) for warning in value]
        return None

    def folded(self) -> list[dict[str, Any]]:
        """The chat message under the answer, folded: what the model got and the warnings (open when any)."""
        lines = inputs_words(self.inputs) + [f"⚠️ {warning}" for warning in self.warnings]
        if not lines:
            return []
        metadata: dict[str, Any] = {"title": "What the model got"}
        if self.warnings:
            metadata["log"] = _count(len(self.warnings), "warning")
        else:
            metadata["status"] = "done"
        return [{"role": "assistant", "content": "\n".join(f"- {line}" for line in lines), "metadata": metadata}]

    def timings(self) -> str:
        """First token and total time, the prompt's and answer's tokens, and the voice's length."""
        now = time.perf_counter()
        line = f"first token {((self.first or now) - self.started) * 1000:.0f} ms · total {(now - self.started) * 1000:.0f} ms"
        if self.usage:
            by_modality = self.usage.get("prompt_tokens_details", {}).get("by_modality", {})
            kinds = ", ".join(f"{k} {v}" for k, v in by_modality.items() if v)
            line += f" · prompt {self.usage['prompt_tokens']} tokens ({kinds})"
            line += f" · answer {self.usage['completion_tokens']} tokens"
        if self.voice:
            seconds = sum(map(len, self.voice)) / 2 / SPEECH_SAMPLE_RATE
            line += f" · voice {seconds:.1f} s in {len(self.voice)} pieces"
        return line


OUTPUTS = ("box", "chat", "conversation", "piece", "spoken", "timings", "error", "recording")


def outputs(**values: Any) -> tuple:
    """`respond`'s outputs, in OUTPUTS' order, each left as it is unless given."""
    return tuple(values.get(name, gr.skip()) for name in OUTPUTS)


def respond(
    message: dict[str, Any],
    chat: list[dict],
    conversation: list[dict],
    system_prompt: str,
    max_tokens: float,
    speak: bool,
    voice: str | None,
    video_frame: bool,
    video_audio: bool,
    recording: str | None,
) -> Iterator[tuple]:
    """One turn: send the conversation so far plus this message (and the webcam's recording); stream the
    answer (and its voice) in, then what the model got under it. Yields `outputs(...)`."""
    message = {**message, "files": [*(message.get("files") or []), *([recording] if recording else [])]}
    turn, files = user_turn(message)
    if not turn["content"]:
        yield outputs(error="⚠️ write something, attach a file or record one")
        return
    chat = [*chat, *({"role": "user", "content": {"path": f}} for f in files)]
    if (message.get("text") or "").strip():
        chat.append({"role": "user", "content": message["text"]})
    chat.append({"role": "assistant", "content": ""})
    body = request_body(turn, conversation, system_prompt, max_tokens, speak, voice, video_frame, video_audio)
    yield outputs(box={"text": "", "files": []}, chat=chat, piece="", spoken=None, timings="", error="", recording=None)
    answer = Answer(messages=body["messages"])
    try:
        for kind, value in stream_answer(body):
            piece = answer.add(kind, value)
            chat[-1] = {"role": "assistant", "content": answer.text}
            yield outputs(chat=chat, piece=piece or gr.skip(), error="")
    except (RuntimeError, httpx.HTTPError) as error:
        detail = str(error) if isinstance(error, RuntimeError) else f"the server could not be reached ({error})"
        yield outputs(timings="", error=f"⚠️ {name_files(detail, body['messages'])}")
        return
    conversation = [*conversation, turn, {"role": "assistant", "content": answer.text}]
    whole = wav_of_pcm16(b"".join(answer.voice)) if answer.voice else None
    yield outputs(chat=[*chat, *answer.folded()], conversation=conversation, spoken=whole, timings=answer.timings())


class Controls(NamedTuple):
    """The page's components that events read or write."""

    known: gr.State
    server_line: gr.Markdown
    conversation: gr.State
    chat: gr.Chatbot
    box: gr.MultimodalTextbox
    video_frame: gr.Checkbox
    video_audio: gr.Checkbox
    recording: gr.Video
    error: gr.Markdown
    timings: gr.Markdown
    system_prompt: gr.Textbox
    max_tokens: gr.Slider
    speech: gr.Group
    speak: gr.Checkbox
    voice: gr.Dropdown
    piece: gr.Textbox
    spoken: gr.Audio
    restart: gr.Button
    timer: gr.Timer


def _message_column() -> dict[str, Any]:
    """The conversation, the message box, the error and the timings."""
    chat = gr.Chatbot(label="Conversation", height="75vh", elem_id="chat")
    box = gr.MultimodalTextbox(
        label="Message",
        show_label=False,
        placeholder="Ask, and attach pictures, sounds or videos…",
        file_count="multiple",
        file_types=["image", "audio", "video"],
        sources=["upload", "microphone"],
        elem_id="message",
    )
    error = gr.Markdown(elem_id="error")
    timings = gr.Markdown(elem_id="timings")
    return {"chat": chat, "box": box, "error": error, "timings": timings}


def _videos() -> dict[str, Any]:
    """The options for a message's videos, and the webcam, whose recording goes with the next message."""
    with gr.Group():
        video_frame = gr.Checkbox(label="Send videos as their last frame", elem_id="video-frame")
        video_audio = gr.Checkbox(label="Send videos as their sound track", elem_id="video-audio")
    with gr.Accordion("Record a video with the webcam", open=False, elem_id="webcam"):
        recording = gr.Video(
            label="Sent with the next message",
            sources=["webcam"],
            include_audio=True,
            webcam_options=gr.WebcamOptions(mirror=False),  # mirroring needs ffmpeg on the UI's machine
            height=240,
            elem_id="recording",
        )
    return {"video_frame": video_frame, "video_audio": video_audio, "recording": recording}


def _side_column() -> dict[str, Any]:
    """The system prompt, the answer's length, the videos' options, the voice, the last spoken answer and
    "Start over"."""
    system_prompt = gr.Textbox(
        label="System prompt",
        info="Left empty, the server's default (shown here) is used.",
        lines=4,
        elem_id="system-prompt",
    )
    max_tokens = gr.Slider(1, 2048, value=512, step=1, label="Max new tokens", elem_id="max-tokens")
    videos = _videos()
    with gr.Group(visible=False) as speech:
        speak = gr.Checkbox(label="Speak the answer", value=False, elem_id="speak")
        voice = gr.Dropdown(choices=[], label="Voice", elem_id="voice")
    piece = gr.Textbox(visible=False, elem_id="voice-piece")
    spoken = gr.Audio(label="The last spoken answer", interactive=False, elem_id="spoken")
    restart = gr.Button("Start over", elem_id="start-over")
    return {
        "system_prompt": system_prompt,
        "max_tokens": max_tokens,
        **videos,
        "speech": speech,
        "speak": speak,
        "voice": voice,
        "piece": piece,
        "spoken": spoken,
        "restart": restart,
    }


def _wire(demo: gr.Blocks, c: Controls) -> None:
    """The events: a message, a voice piece, "Start over", and reading the server (page load, timer)."""
    c.box.submit(
        respond,
        [
            c.box,
            c.chat,
            c.conversation,
            c.system_prompt,
            c.max_tokens,
            c.speak,
            c.voice,
            c.video_frame,
            c.video_audio,
            c.recording,
        ],
        [getattr(c, name) for name in OUTPUTS],
    )
    c.piece.change(None, [c.piece], None, js=PLAY_PIECE)
    c.restart.click(
        lambda: ([], [], None, "", ""), None, [c.chat, c.conversation, c.spoken, c.timings, c.error], js=SILENCE
    )
    reread = {
        "fn": refresh,
        "inputs": [c.known, c.max_tokens, c.voice],
        "outputs": [c.known, c.server_line, c.speech, c.speak, c.voice, c.max_tokens, c.system_prompt, c.timer],
        "show_progress": "hidden",
        "concurrency_limit": None,
    }
    demo.load(**reread)
    c.timer.tick(**reread)


def build() -> gr.Blocks:
    """The page; what the server offers is read when it opens, and again while it is away or changes."""
    with gr.Blocks(title="Qwen2.5-Omni") as demo:
        gr.Markdown("# Qwen2.5-Omni")
        server_line = gr.Markdown(f"Reading the server at {API_URL}…", elem_id="server-status")
        known, conversation, timer = gr.State(None), gr.State([]), gr.Timer(CHECK_SECONDS)
        with gr.Row():
            with gr.Column(scale=3):
                message = _message_column()
            with gr.Column(scale=1):
                side = _side_column()
        controls = Controls(
            known=known, server_line=server_line, conversation=conversation, timer=timer, **message, **side
        )
        _wire(demo, controls)
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
    build().launch(css=CSS, **options)
