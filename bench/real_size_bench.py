"""Real size on the CPU, end to end: the 3B architecture with random weights through the server's engine.

    OMP_NUM_THREADS=1 .venv/bin/python bench/real_size_bench.py [--checkpoint /tmp/real3b] \
        [--speech 10,30,60] [--skip-first] [--skip-photo] [--skip-video] [--out bench/out/real_size.json]

The checkpoint (the real 3B architecture, configs/, random weights, talker and token2wav included, a
tokenizer made here; ~11 GB in bf16) is built once into --checkpoint and reused. It loads as the server
loads it: `OmniEngine.load(Settings(model_path=..., enable_audio_output=True, dtype="bfloat16",
device_map="cpu"))` (placement, weights resident, warm-up, and on the CPU the pixel budgets lowered to fit
REQUEST_TIMEOUT_SECONDS). Random weights answer nonsense but hold the real memory and take the real time.

Rows, in this order (cheapest first), each printed and written to --out as soon as it has run, so a run cut
short keeps what it measured:
- load: seconds to load and to warm up, RSS once ready.
- first / second: the same short text request twice right after load; equal seconds = weights resident.
- speech N s: a spoken answer of N seconds (a talker whose end codes can never be sampled, bounded by
  MAX_SPEECH_SECONDS = SPEECH_SECONDS_PER_TOKEN = N); ok = audio of N s came back with no error. Peak RSS:
  /proc/self/status VmHWM after resetting it (echo 5 > /proc/self/clear_refs) before the request; it
  should not grow with N (speech is synthesized chunk by chunk).
- photo (after the first speech row): a 12 MP picture (4000x3000 JPEG, decoded as the server decodes uploads) at the CPU's budgets.
- video: a 60 s 1280x720 30 fps H.264 + AAC clip (made with PyAV), decoded as the server decodes uploads.
  Both: seconds against REQUEST_TIMEOUT_SECONDS.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from qwen_omni_server.api.uploads import decode_file  # noqa: E402
from qwen_omni_server.core.settings import Settings  # noqa: E402
from qwen_omni_server.core.types import GenerationRequest  # noqa: E402
from qwen_omni_server.local.engine import OmniEngine  # noqa: E402
from qwen_omni_server.local.loading import MODEL_SHORTHANDS  # noqa: E402
from qwen_omni_server.local.speech import Codec  # noqa: E402

OUT = ROOT / "bench" / "out" / "real_size.json"
SPEECH_RATE = 24_000
PHOTO_SIZE = (4000, 3000)  # 12 MP
VIDEO_SECONDS, VIDEO_FPS, VIDEO_SIZE = 60, 30, (1280, 720)
TEXT = "Say hello."
MEDIA_PROMPT = "Describe what you see and hear."


# ---------------------------------------------------------------- the checkpoint


def build_checkpoint(folder: Path, model: str = "3b") -> Path:
    """The real architecture with random weights and its talker and token2wav, built on the CPU and saved
    with a tokenizer made here (once: an existing checkpoint is reused)."""
    import tiny_model

    if (folder / "spk_dict.pt").exists() and (folder / "config.json").exists():
        return folder
    started = time.perf_counter()
    tiny_model.build_real_size(MODEL_SHORTHANDS[model], folder)
    gc.collect()
    print(f"built {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


# ---------------------------------------------------------------- memory


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def gib(kib: int) -> float:
    return round(kib / 2**20, 2)


# ---------------------------------------------------------------- inputs


def photo_request(settings: Settings, tokens: int) -> tuple[GenerationRequest, float]:
    """A 12 MP JPEG (gradients and noise) decoded as the server decodes an upload; returns the decode seconds."""
    width, height = PHOTO_SIZE
    x, y = np.meshgrid(np.linspace(0, 255, width, dtype=np.float32), np.linspace(0, 255, height, dtype=np.float32))
    noise = np.random.default_rng(0).integers(0, 40, (height, width, 1)).astype(np.float32)
    picture = np.clip(np.stack([x, y, (x + y) / 2], axis=-1) * 0.8 + noise, 0, 255).astype(np.uint8)
    data = io.BytesIO()
    Image.fromarray(picture).save(data, "JPEG", quality=90)
    started = time.perf_counter()
    image, _ = decode_file("image", io.BytesIO(data.getvalue()), settings)
    seconds = time.perf_counter() - started
    return GenerationRequest(MEDIA_PROMPT, None, images=[image], max_new_tokens=tokens), seconds


def video_request(settings: Settings, tokens: int) -> tuple[GenerationRequest, float]:
    """A 60 s 720p clip with its audio, decoded as the server decodes an upload (api/uploads.py)."""
    import make_media

    data = make_media.video_bytes(seconds=VIDEO_SECONDS, fps=VIDEO_FPS, size=VIDEO_SIZE, audio=True)
    started = time.perf_counter()
    clip, _ = decode_file("video", io.BytesIO(data), settings)
    seconds = time.perf_counter() - started
    return GenerationRequest(MEDIA_PROMPT, None, videos=[clip], max_new_tokens=tokens), seconds


# ---------------------------------------------------------------- one row


def run_row(engine: OmniEngine, name: str, request: GenerationRequest, **extra) -> dict:
    """Answer `request`; seconds, tokens, audio seconds, RSS before and its peak (VmHWM reset first)."""
    gc.collect()
    row: dict = {"row": name, **extra}
    rss_before = status_kib("VmRSS")
    row["peak_method"] = "VmHWM after clear_refs=5" if reset_peak() else "VmHWM since start (reset failed)"
    started = time.perf_counter()
    try:
        result = engine.generate(request)
        row.update(
            ok=True,
            prompt_tokens=result.prompt_tokens,
            by_modality=result.prompt_tokens_by_modality,
            completion_tokens=result.completion_tokens,
            audio_s=None if result.audio is None else round(len(result.audio) / SPEECH_RATE, 2),
            warnings=result.warnings,
            timings_ms=result.timings_ms,
        )
    except Exception as error:  # noqa: BLE001 - the row says what failed; the others still run
        row.update(ok=False, error=f"{type(error).__name__}: {error}"[:500], trace=traceback.format_exc()[-2000:])
    row["seconds"] = round(time.perf_counter() - started, 1)
    row.update(rss_before_gib=gib(rss_before), peak_rss_gib=gib(status_kib("VmHWM")))
    row["peak_above_before_gib"] = round(row["peak_rss_gib"] - row["rss_before_gib"], 2)
    row["rss_after_gib"] = gib(status_kib("VmRSS"))
    return row


def silence_the_end(engine: OmniEngine) -> None:
    """A talker that speaks until its bound: its end codes' output weights zeroed, the others scaled up (as
    tests/test_speech.py's speaker_without_end), so an end code is never sampled."""
    with torch.no_grad():
        head = engine.model.talker.codec_head.weight
        head.mul_(1000)
        head[list(Codec.of(engine.model.config).ends)] = 0


def speech_row(engine: OmniEngine, seconds: float, tokens: int) -> dict:
    settings = engine.settings
    engine.settings = settings.model_copy(
        update={"max_speech_seconds": float(seconds), "speech_seconds_per_token": float(seconds)}
    )
    try:
        request = GenerationRequest(TEXT, None, max_new_tokens=tokens, return_audio=True, seed=1)
        row = run_row(engine, f"speech {seconds:g} s", request, asked_audio_s=seconds)
    finally:
        engine.settings = settings
    row["ok"] = bool(row.get("ok") and row.get("audio_s") and row["audio_s"] >= seconds * 0.95)
    if row.get("audio_s"):
        row["cpu_s_per_speech_s"] = round(row["seconds"] / row["audio_s"], 1)
    return row


# ---------------------------------------------------------------- report


def machine() -> dict:
    flags = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if "model name" in line), "?")
    return {
        "cpu": model,
        "threads": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_bf16" in flags,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def describe(row: dict) -> str:
    def cell(key, digits=1):
        value = row.get(key)
        return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))

    note = row.get("error") or row.get("note") or ""
    return (
        f"{row['row']:<14} {'yes' if row.get('ok') else 'NO':<4} {cell('seconds'):>8} {cell('timeout_s', 0):>8} "
        f"{cell('prompt_tokens'):>7} {cell('completion_tokens'):>5} {cell('audio_s'):>7} "
        f"{cell('rss_before_gib', 2):>7} {cell('peak_rss_gib', 2):>7} {cell('peak_above_before_gib', 2):>7}  {note}"
    )


HEADER = (
    f"{'row':<14} {'ok':<4} {'seconds':>8} {'timeout':>8} {'prompt':>7} {'new':>5} {'audio_s':>7} "
    f"{'rss_GiB':>7} {'peak':>7} {'+peak':>7}  note"
)


def save(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))


def add(report: dict, out: Path, row: dict) -> None:
    report["rows"].append(row)
    save(report, out)
    print(describe(row), flush=True)


# ---------------------------------------------------------------- main


class Notes(logging.Handler):
    """Keeps the engine's log lines (the CPU's budgets are said there) for the report."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage()[:1000])


def load(checkpoint: Path, report: dict, out: Path) -> OmniEngine:
    settings = Settings(
        model_path=str(checkpoint), enable_audio_output=True, dtype="bfloat16", device_map="cpu", cpu_threads=1
    )
    notes = Notes()
    logging.getLogger("qwen_omni_server").addHandler(notes)
    logging.getLogger("qwen_omni_server").setLevel(logging.INFO)
    reset_peak()
    started = time.perf_counter()
    engine = OmniEngine.load(settings)
    report["engine_log"] = notes.lines
    row = {
        "row": "load",
        "ok": True,
        "seconds": round(time.perf_counter() - started, 1),
        "note": f"load {engine.startup.get('load_seconds')} s + warm-up {engine.startup.get('warmup_seconds')} s",
        "startup": engine.startup,
        "rss_before_gib": gib(status_kib("VmRSS")),
        "peak_rss_gib": gib(status_kib("VmHWM")),
    }
    s = engine.settings
    defaults = Settings(model_path=str(checkpoint))
    report["default_budgets"] = {
        "image_max_pixels": defaults.image_max_pixels,
        "video_total_pixels": defaults.video_total_pixels,
    }
    report["budgets"] = {
        "image_max_pixels": s.image_max_pixels,
        "video_total_pixels": s.video_total_pixels,
        "video_max_pixels": s.video_max_pixels,
        "request_timeout_seconds": s.request_timeout_seconds,
    }
    print(HEADER, flush=True)
    add(report, out, row)
    return engine


def media_rows(engine: OmniEngine, args, report: dict, out: Path) -> None:
    timeout = engine.settings.request_timeout_seconds
    for name, skip in (("photo", args.skip_photo), ("video", args.skip_video)):
        if skip:
            continue
        if name == "photo":
            request, decode_s = photo_request(engine.settings, args.tokens)
        else:
            request, decode_s = video_request(engine.settings, args.tokens)
        row = run_row(engine, f"{name}", request, timeout_s=timeout, decode_s=round(decode_s, 1))
        row["within_timeout"] = bool(row.get("ok") and row["seconds"] + decode_s <= timeout)
        row["note"] = row.get("note") or f"decode {decode_s:.1f} s; within timeout: {row['within_timeout']}"
        add(report, out, row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/real3b"), help="built here when missing")
    parser.add_argument("--speech", default="10,30,60", help="spoken answers' seconds, comma-separated; '' for none")
    parser.add_argument("--skip-first", action="store_true", help="skip the first/second text requests")
    parser.add_argument("--skip-photo", action="store_true")
    parser.add_argument("--skip-video", action="store_true")
    parser.add_argument("--tokens", type=int, default=8, help="max_new_tokens of each request")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    build_checkpoint(args.checkpoint)
    if args.build_only:
        return 0
    report = {"machine": machine(), "checkpoint": str(args.checkpoint), "args": vars(args), "rows": []}
    try:
        report["machine"]["lscpu_flags"] = subprocess.run(["lscpu"], capture_output=True, text=True).stdout[-2000:]
    except OSError:
        pass
    engine = load(args.checkpoint, report, args.out)
    if not args.skip_first:
        for name in ("first", "second"):
            add(report, args.out, run_row(engine, name, GenerationRequest(TEXT, None, max_new_tokens=args.tokens)))
    seconds = [float(s) for s in args.speech.split(",") if s.strip()]
    if seconds:
        silence_the_end(engine)
    for index, length in enumerate(seconds):  # the shortest spoken answer, then the media, then the longer ones
        add(report, args.out, speech_row(engine, length, args.tokens))
        if index == 0:
            media_rows(engine, args, report, args.out)
    if not seconds:
        media_rows(engine, args, report, args.out)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
