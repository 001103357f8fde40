"""Media benchmark: the figures issue "Media" asks for, each with its ratio to a baseline from the same run.

    .venv/bin/python bench/media_bench.py            # about 3 minutes on 2 cores; clips cached in bench/out/

1. Last frame of a 720p H.264+AAC clip: 10 minutes vs 10 seconds (target within 2x), and vs
   decoding every frame of the 10-minute clip (target at least 20x faster).
2. Audio track extraction of the 10-minute clip, as a multiple of real time on one core (target 100x).
3. Video-as-video sampling of the 10-minute clip: frames kept and the process's RSS growth.
4. Audio features for a 5 s clip: Whisper's default 300 s padding vs padding to the clip
   (target at least 50x less preprocessing), with the prompt's token count unchanged.
5. A 500 MB upload to the running server: its peak RSS growth (target at most 64 MB) and the
   temporary files left behind (target none).
"""

from __future__ import annotations

import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from servers import start_server  # noqa: E402

from qwen_omni_server.core import media  # noqa: E402


def make_clip(path: Path, seconds: float, fps: int = 10, size=(1280, 720)) -> Path:
    """A 720p H.264 + AAC clip with a keyframe every 2 s, as phone and streaming encoders make them."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    base = np.zeros((height, width, 3), np.uint8)
    base[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    base[..., 1] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    rate = 44100
    with av.open(str(path), "w") as output:
        video = output.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.options = {"preset": "ultrafast"}
        video.codec_context.gop_size = 2 * fps
        audio = output.add_stream("aac", rate=rate, layout="stereo")
        tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(1024) / rate)).astype(np.float32)
        audio_chunk = np.ascontiguousarray(np.stack([tone, tone]))
        audio_pts = 0
        for index in range(int(seconds * fps)):
            picture = base.copy()
            x = (index * 7) % (width - 64)
            picture[300:364, x : x + 64] = 255  # a moving square
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            for packet in video.encode(frame):
                output.mux(packet)
            while audio_pts < (index + 1) / fps * rate:
                chunk = av.AudioFrame.from_ndarray(audio_chunk, format="fltp", layout="stereo")
                chunk.sample_rate, chunk.pts = rate, audio_pts
                for packet in audio.encode(chunk):
                    output.mux(packet)
                audio_pts += 1024
        for stream in (video, audio):
            for packet in stream.encode(None):
                output.mux(packet)
    return path


def timed(function, *args, repeat: int = 3, **kwargs) -> tuple[float, object]:
    """Best wall time of `repeat` runs, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = function(*args, **kwargs)
        best = min(best, time.perf_counter() - started)
    return best, result


def decode_every_frame(path: Path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def rss_kib(pid: int | str = "self", field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def bench_last_frame(short: Path, long: Path) -> None:
    short_time, _ = timed(media.extract_last_frame, str(short), max_seconds=3600)
    long_time, frame = timed(media.extract_last_frame, str(long), max_seconds=3600)
    full_time, frames = timed(decode_every_frame, long, repeat=1)
    print("1. last frame (720p H.264+AAC)")
    print(
        f"   10 s clip: {short_time * 1000:.0f} ms   10 min clip: {long_time * 1000:.0f} ms   "
        f"ratio {long_time / short_time:.2f}x (target <= 2x)"
    )
    print(
        f"   decoding all {frames} frames of the 10 min clip: {full_time:.1f} s   "
        f"seeking is {full_time / long_time:.0f}x faster (target >= 20x)   last frame {frame.size}"
    )


def bench_audio_track(long: Path) -> None:
    elapsed, track = timed(media.extract_audio_track, str(long), max_seconds=3600, repeat=1)
    print("2. audio track extraction (16 kHz mono)")
    print(
        f"   {track.seconds:.0f} s of audio in {elapsed:.2f} s: {track.seconds / elapsed:.0f}x real time "
        "(target >= 100x, one core)"
    )


def bench_video_sampling(long: Path) -> None:
    before = rss_kib()
    elapsed, video = timed(
        media.load_video, str(long), fps=2.0, max_frames=64, max_seconds=3600, frame_max_pixels=768 * 28 * 28, repeat=1
    )
    peak = rss_kib(field="VmHWM")
    print("3. video-as-video sampling of the 10 min clip")
    print(
        f"   {len(video.frames)} frames kept at {video.fps:g} fps in {elapsed:.1f} s; RSS now "
        f"{(rss_kib() - before) / 1024:+.0f} MiB, process peak {peak / 1024:.0f} MiB"
    )


def bench_audio_features() -> None:
    import torch

    torch.set_num_threads(1)
    import tiny_model

    from qwen_omni_server.core.settings import Settings
    from qwen_omni_server.core.types import GenerationRequest
    from qwen_omni_server.local.engine import OmniEngine

    with tempfile.TemporaryDirectory() as folder:
        engine = OmniEngine.load(
            Settings(_env_file=None, model_path=str(tiny_model.build(Path(folder) / "tiny")), device_map="cpu")
        )
    clip = (0.2 * np.sin(2 * np.pi * 440 * np.arange(5 * 16000) / 16000)).astype(np.float32)
    extractor = engine.processor.feature_extractor
    whisper_features, _ = timed(extractor, [clip], sampling_rate=16000, padding="max_length", repeat=5)
    fitted_features, _ = timed(
        extractor, [clip], sampling_rate=16000, padding="max_length", max_length=len(clip), repeat=5
    )
    request = GenerationRequest("What do you hear?", None, audios=[clip])
    fitted_time, fitted = timed(lambda: engine.prompts.build(request).inputs, repeat=5)
    engine.prompts.audio_padding = "whisper"
    whisper_time, padded = timed(lambda: engine.prompts.build(request).inputs, repeat=5)
    print("4. audio preprocessing of a 5 s clip (the real Whisper feature extractor configuration)")
    print(
        f"   feature extraction: padded to 300 s {whisper_features * 1000:.1f} ms, to the clip "
        f"{fitted_features * 1000:.2f} ms: {whisper_features / fitted_features:.0f}x less (target >= 50x)"
    )
    print(
        f"   whole processor call (template, tokenizer, features): {whisper_time * 1000:.1f} ms vs "
        f"{fitted_time * 1000:.1f} ms: {whisper_time / fitted_time:.0f}x less"
    )
    print(
        f"   prompt tokens {padded['input_ids'].shape[1]} vs {fitted['input_ids'].shape[1]} (must be equal); "
        f"feature frames {padded['input_features'].shape[-1]} vs {fitted['input_features'].shape[-1]}"
    )


def bench_upload(megabytes: int = 500) -> None:
    import http.client

    import tiny_model

    with tempfile.TemporaryDirectory() as folder:
        model_dir = tiny_model.build(Path(folder) / "tiny")
        uploads_tmp = Path(folder) / "tmp"
        uploads_tmp.mkdir()
        env = {"MODEL_PATH": str(model_dir), "TMPDIR": str(uploads_tmp), "LOG_LEVEL": "warning"}
        server, url = start_server(Path(folder), env)
        port = int(url.rsplit(":", 1)[1])
        try:
            before = rss_kib(server.pid)
            boundary = "benchboundary"
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="videos"; filename="big.bin"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            tail = f"\r\n--{boundary}--\r\n".encode()
            block = np.random.default_rng(0).integers(0, 256, 1024 * 1024, dtype=np.uint8).tobytes()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            connection.putrequest("POST", "/multimodal")
            connection.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
            connection.putheader("Content-Length", str(len(head) + megabytes * len(block) + len(tail)))
            connection.endheaders()
            started = time.perf_counter()
            connection.send(head)
            for _ in range(megabytes):
                connection.send(block)
            connection.send(tail)
            response = connection.getresponse()
            detail = response.read().decode()[:120]
            elapsed = time.perf_counter() - started
            peak = rss_kib(server.pid, "VmHWM")
            time.sleep(0.5)
            left = sorted(p.name for p in uploads_tmp.iterdir())
        finally:
            server.terminate()
            server.wait(30)
    print(f"5. a {megabytes} MB upload (random bytes in `videos`) to the running server")
    print(f"   answer {response.status} in {elapsed:.1f} s: {detail}")
    print(
        f"   server RSS before {before / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB: growth "
        f"{(peak - before) / 1024:.0f} MiB (target <= 64 MiB); temporary files left: {len(left)} {left[:3]}"
    )


def main() -> None:
    short = make_clip(OUT / "clip_10s_720p.mp4", 10)
    long = make_clip(OUT / "clip_10min_720p.mp4", 600)
    bench_last_frame(short, long)
    bench_audio_track(long)
    bench_video_sampling(long)
    bench_audio_features()
    bench_upload()


if __name__ == "__main__":
    main()
