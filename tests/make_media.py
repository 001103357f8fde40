"""Small real media files made on the spot (PyAV encodes them), for tests and benchmarks."""

from __future__ import annotations

import io
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image


def tone(seconds: float, rate: int = 44100, channels: int = 2, freq: float = 440.0) -> np.ndarray:
    """A sine tone, (channels, samples) float32."""
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([wave] * channels)


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (96, 64), mode: str = "RGB", **save) -> bytes:
    """A gradient picture in `fmt` (PNG, JPEG, WEBP, GIF, BMP, TIFF…)."""
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.uint8)[:, None].repeat(w, 1)
    picture = Image.fromarray(np.stack([x, y, 255 - x], -1)).convert(mode)
    out = io.BytesIO()
    picture.save(out, fmt, **save)
    return out.getvalue()


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """A PNG's chunks as (type, data)."""
    chunks, position = [], 8
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        chunks.append((data[position + 4 : position + 8], data[position + 8 : position + 8 + length]))
        position += 12 + length
    return chunks


def png_from_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG of these chunks, each with its right length and CRC."""
    out = b"\x89PNG\r\n\x1a\n"
    for kind, data in chunks:
        out += len(data).to_bytes(4, "big") + kind + data + (zlib.crc32(kind + data) & 0xFFFFFFFF).to_bytes(4, "big")
    return out


def damaged_png(damage: str, size: tuple[int, int] = (800, 600)) -> bytes:
    """A noisy RGB PNG whose every chunk is well formed and which ends with IEND, as a whole file does, but
    whose pixel data is `broken` (bytes near its end flipped: it does not decode) or `cut` (the compressed
    stream stops at two thirds: the rows before decode)."""
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG", compress_level=1)
    chunks = png_chunks(out.getvalue())
    stream = bytearray(b"".join(data for kind, data in chunks if kind == b"IDAT"))
    if damage == "broken":
        for index in range(len(stream) - 2000, len(stream) - 1000):
            stream[index] ^= 0x5A
    else:
        del stream[len(stream) * 2 // 3 :]
    head = [(kind, data) for kind, data in chunks if kind not in (b"IDAT", b"IEND")]
    return png_from_chunks([*head, (b"IDAT", bytes(stream)), (b"IEND", b"")])


def audio_bytes(container: str = "wav", seconds: float = 1.0, rate: int = 44100, channels: int = 2) -> bytes:
    """A tone encoded as wav (s16), flac, mp3, opus (in ogg) or m4a (aac)."""
    codec = {"wav": "pcm_s16le", "flac": "flac", "mp3": "libmp3lame", "opus": "libopus", "m4a": "aac"}[container]
    fmt = {"opus": "ogg", "m4a": "mp4"}.get(container, container)
    if container == "opus":
        rate = 48000
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as output:
        stream = output.add_stream(codec, rate=rate, layout="stereo" if channels == 2 else "mono")
        samples = tone(seconds, rate, channels)
        frame_size = stream.codec_context.frame_size or 1024
        target = stream.codec_context.format.name
        for start in range(0, samples.shape[1], frame_size):
            chunk = np.ascontiguousarray(samples[:, start : start + frame_size])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=stream.layout.name)
            frame.sample_rate = rate
            frame.pts = start
            for converted in av.AudioResampler(format=target, layout=stream.layout.name, rate=rate).resample(frame):
                for packet in stream.encode(converted):
                    output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return out.getvalue()


def video_bytes(
    seconds: float = 2.0,
    fps: int = 10,
    size: tuple[int, int] = (128, 96),
    audio: bool = True,
    container: str = "mp4",
    rotation: int = 0,
    gop: int | None = None,
) -> bytes:
    """H.264 (+ AAC) video whose frames count up (frame i has brightness ~ i), for tests and benchmarks."""
    out = io.BytesIO()
    with av.open(out, "w", format=container) as output:
        video = output.add_stream("libx264", rate=fps)
        video.width, video.height = size
        video.pix_fmt = "yuv420p"
        video.codec_context.options = {"preset": "ultrafast", "tune": "zerolatency"}
        if gop:
            video.codec_context.gop_size = gop
        if rotation:
            video.set_display_rotation(rotation)
        sound = output.add_stream("aac", rate=44100, layout="stereo") if audio else None
        frames = int(seconds * fps)
        samples = tone(seconds, 44100) if audio else None
        audio_pos = 0
        for i in range(frames):
            level = int(255 * i / max(1, frames - 1))
            picture = np.full((size[1], size[0], 3), level, np.uint8)
            picture[: size[1] // 4, : size[0] // 4] = (255, 0, 0)  # a red corner shows orientation
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in video.encode(frame):
                output.mux(packet)
            if sound is not None:
                until = int((i + 1) / fps * 44100)
                while audio_pos + 1024 <= until:
                    chunk = np.ascontiguousarray(samples[:, audio_pos : audio_pos + 1024])
                    aframe = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
                    aframe.sample_rate = 44100
                    aframe.pts = audio_pos
                    for packet in sound.encode(aframe):
                        output.mux(packet)
                    audio_pos += 1024
        for stream in (video, sound):
            if stream is not None:
                for packet in stream.encode(None):
                    output.mux(packet)
    return out.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class _Unseekable:
    """A write-only sink without seek: muxers then write what a live recorder does (no duration, no index)."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()

    def write(self, data) -> int:
        return self.buffer.write(data)


def recorder_webm(seconds: float = 5.0, fps: int = 10, size: tuple[int, int] = (64, 48)) -> bytes:
    """VP8 WebM written as a browser's MediaRecorder writes it: streamed, so the container declares no duration.
    Its frames are noise (brightening over time), so each costs bytes and a reader's progress can be measured."""
    noise = np.random.default_rng(0)
    sink = _Unseekable()
    with av.open(sink, "w", format="webm") as output:
        video = output.add_stream("libvpx", rate=fps)
        video.width, video.height = size
        video.pix_fmt = "yuv420p"
        for i in range(int(seconds * fps)):
            level = int(191 * i / max(1, seconds * fps - 1))
            picture = (level + noise.integers(0, 64, (size[1], size[0], 3))).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in video.encode(frame):
                output.mux(packet)
        for packet in video.encode(None):
            output.mux(packet)
    return sink.buffer.getvalue()
