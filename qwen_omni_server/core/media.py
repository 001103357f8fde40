"""Uploaded bytes in, model-ready media out: PIL images (RGB) and numpy audio (16 kHz mono float32).

Pure functions over a seekable binary file or a path; no web framework, no torch. Every failure
is a `MediaError` whose message is safe to show the user: `UnsupportedMedia` (not a format we
read, or the wrong kind for the field), `UndecodableMedia` (a known format, but broken) and
`MediaTooLarge` (over a limit). Files are judged by their bytes, never by their names.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from dataclasses import dataclass, field

import av
import numpy as np
import soundfile
from PIL import Image, ImageOps, UnidentifiedImageError

from qwen_omni_server.core.audio import INPUT_SAMPLE_RATE, Resampler, to_mono
from qwen_omni_server.core.media_formats import (  # noqa: F401 - the errors are part of media's interface
    MediaError,
    MediaTooLarge,
    Source,
    UndecodableMedia,
    UnsupportedMedia,
    av_open,
    is_still_image_container,
    moving_video_stream,
    read_bytes,
    refuse_encrypted,
    rewind,
    unreadable,
    wrong_kind,
)

SAMPLE_RATE = INPUT_SAMPLE_RATE
__all__ = [
    "DecodedAudio",
    "DecodedImage",
    "DecodedVideo",
    "MediaError",
    "MediaTooLarge",
    "PictureFile",
    "SAMPLE_RATE",
    "Source",
    "UndecodableMedia",
    "UnsupportedMedia",
    "check_picture",
    "extract_audio_track",
    "extract_last_frame",
    "load_audio",
    "load_image",
    "load_video",
    "picture_file",
    "real_rate",
    "rewind",
    "to_rgb",
]


@dataclass
class DecodedImage:
    image: Image.Image  # RGB
    warnings: list[str] = field(default_factory=list)


@dataclass
class DecodedAudio:
    samples: np.ndarray  # float32, mono, SAMPLE_RATE
    warnings: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE


@dataclass
class DecodedVideo:
    frames: list[Image.Image]  # RGB, sampled at about `fps`
    fps: float  # the real rate between the kept frames, from their own timestamps
    seconds: float  # from the decoded timestamps, not the container's claim
    audio: DecodedAudio | None  # the audio track, when there is one and it was asked for
    warnings: list[str] = field(default_factory=list)
    frame_times: list[float] = field(default_factory=list)  # each kept frame's time, from the first frame


# ---------------------------------------------------------------- images


def load_image(source: Source, *, max_pixels: int) -> DecodedImage:
    """Decode an image to RGB: first frame, EXIF orientation applied, alpha composited on white.

    The size is checked from the header before any pixel is decoded (decompression bombs).
    Formats Pillow cannot read (HEIC and friends) go through FFmpeg, and so does a truncated
    file, whose readable part FFmpeg's error concealment can often recover.
    """
    try:
        with Image.open(rewind(source)) as image:
            _check_pixels(image.width, image.height, max_pixels)
            image.load()
            warnings: list[str] = []
            return DecodedImage(to_rgb(_upright(image, warnings)), warnings)
    except MediaError:
        raise
    except Image.DecompressionBombError as error:
        raise MediaTooLarge(f"image is too large to decode safely ({error})") from None
    except UnidentifiedImageError:
        return _load_image_with_ffmpeg(source, max_pixels=max_pixels)
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as error:
        message = _short(error)
        if "not supported" in message.lower() or "unsupported" in message.lower():
            raise UnsupportedMedia(f"uses a variant Pillow cannot read ({message})") from None
        if "truncated" in message:
            with contextlib.suppress(MediaError):
                recovered = _load_image_with_ffmpeg(source, max_pixels=max_pixels)
                recovered.warnings.append("image file is truncated; the part that decoded was used")
                return recovered
        raise UndecodableMedia(f"image data is broken or truncated ({message})") from None


@dataclass(frozen=True, eq=False)
class PictureFile:
    """An image file that decodes, as it is, to the very pixels `load_image` gives it (an upright, opaque,
    8-bit RGB JPEG, PNG or WebP that is whole), so an engine that passes files on can send it as it came.
    Its size is read from its header; decoding it in full is still the only proof that it is not broken."""

    data: bytes = field(repr=False)
    mime: str
    width: int
    height: int


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def picture_file(source: Source, *, max_pixels: int) -> PictureFile | None:
    """The file as a `PictureFile` from its header alone (MAX_IMAGE_PIXELS checked: MediaTooLarge), or None
    for one that needs converting, might be cut short, or is no picture Pillow reads: `load_image` it."""
    data = read_bytes(source)
    try:
        with Image.open(io.BytesIO(data)) as image:
            _check_pixels(image.width, image.height, max_pixels)
            plain = (
                image.format in ("JPEG", "PNG", "WEBP")
                and image.mode == "RGB"
                and not getattr(image, "is_animated", False)
                and _upright_as_stored(image, data)
                and _whole(image.format, data)
            )
            return PictureFile(data, Image.MIME[str(image.format)], image.width, image.height) if plain else None
    except MediaError:
        raise
    except Exception:  # noqa: BLE001 - whatever Pillow cannot parse from the header, load_image judges
        return None


def check_picture(picture: PictureFile, *, max_pixels: int) -> DecodedImage | None:
    """Decode a `PictureFile` in full to prove it is not broken: None when it decodes whole, else what
    `load_image` makes of it (a cut file recovered, with warnings); raises what `load_image` raises.
    A JPEG's every coefficient is read, but its pixels are made at 1/8 scale (libjpeg's DCT scaling): the
    same verdict for a third less work; any failure there is judged again by `load_image` itself."""
    if picture.mime == "image/jpeg":
        try:
            with Image.open(io.BytesIO(picture.data)) as image:
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
            return None
        except Exception:  # noqa: BLE001 - load_image says what is wrong, and recovers what it can
            pass
    decoded = load_image(io.BytesIO(picture.data), max_pixels=max_pixels)
    whole = not decoded.warnings and decoded.image.size == (picture.width, picture.height)
    return None if whole else decoded


def _upright_as_stored(image: Image.Image, data: bytes) -> bool:
    """No EXIF orientation to apply. A PNG's eXIf chunk may follow its pixels, where Pillow reads it only by
    decoding them all: a PNG with one at all is not taken as it came."""
    if image.format == "PNG":
        return b"eXIf" not in _png_chunk_types(data)
    return image.getexif().get(0x0112, 1) == 1


def _png_chunk_types(data: bytes) -> set[bytes]:
    types, position = set(), 8
    while position + 8 <= len(data):
        types.add(data[position + 4 : position + 8])
        position += 12 + int.from_bytes(data[position : position + 4], "big")
    return types


def _whole(image_format: str, data: bytes) -> bool:
    """Whether the file ends where its format says a file ends (a cut one is recovered by `load_image`)."""
    if image_format == "JPEG":
        return data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if image_format == "PNG":
        return data.endswith(_PNG_END)
    return int.from_bytes(data[4:8], "little") + 8 in (len(data), len(data) - 1)  # RIFF size (+ pad byte)


def _upright(image: Image.Image, warnings: list[str]) -> Image.Image:
    """EXIF orientation applied; a broken EXIF block is reported, not fatal."""
    try:
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an image that is upright already
        return image
    except Exception:  # noqa: BLE001 - Pillow raises assorted errors on malformed EXIF
        warnings.append("EXIF data is malformed, so its orientation could not be applied")
        return image


def _load_image_with_ffmpeg(source: Source, *, max_pixels: int) -> DecodedImage:
    try:
        with av_open(source) as container:
            stream = _largest_picture_stream(container)
            if stream is None or not is_still_image_container(container):
                raise wrong_kind(source, "image")
            if stream.codec_context is None:  # FFmpeg knows the container but has no decoder for it
                raise unreadable(source)
            _check_pixels(stream.codec_context.width, stream.codec_context.height, max_pixels)
            for frame in container.decode(stream):
                return DecodedImage(_frame_to_image(frame))
            raise UndecodableMedia("image holds no decodable picture")
    except MediaError:
        raise
    except av.error.FFmpegError:
        raise wrong_kind(source, "image") from None


def _largest_picture_stream(container) -> av.VideoStream | None:
    """The main picture of a still-image container (HEIF keeps a thumbnail beside it)."""
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        return None
    return max(streams, key=lambda s: (s.codec_context.width * s.codec_context.height) if s.codec_context else 0)


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise UndecodableMedia(f"image has an invalid size {width}x{height}")
    if width * height > max_pixels:
        raise MediaTooLarge(
            f"image is {width}x{height} = {width * height:,} pixels, "
            f"over the limit of {max_pixels:,} (MAX_IMAGE_PIXELS)"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency becomes white, 16-bit and float are rescaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


# ---------------------------------------------------------------- audio


def load_audio(source: Source, *, max_seconds: float, timeout: float | None = None) -> DecodedAudio:
    """Decode any audio file (or the audio of a video) to 16 kHz mono float32.

    FFmpeg (PyAV) reads nearly everything; libsndfile is the fallback for the few WAV/AIFF
    flavours it reads and FFmpeg does not. Both go through the same resampler (libswresample).
    """
    try:
        with av_open(source) as container:
            if not container.streams.audio:
                if moving_video_stream(container) is not None and not is_still_image_container(container):
                    raise UnsupportedMedia("is a video without an audio track; send it in `videos`")
                raise wrong_kind(source, "audio")
            refuse_encrypted(source, container)
            return _decode_audio_stream(container, container.streams.audio[0], max_seconds, timeout)
    except MediaError:
        raise
    except av.error.FFmpegError:
        try:
            samples, rate = soundfile.read(_in_memory(source), dtype="float32", always_2d=True)
        except Exception:  # noqa: BLE001 - libsndfile's errors carry no useful type
            raise wrong_kind(source, "audio") from None
        if len(samples) > max_seconds * rate:
            raise _audio_too_long(len(samples) / rate, max_seconds)
        return DecodedAudio(to_mono(samples.T, rate))


def _in_memory(source: Source, limit: int = 64 * 1024 * 1024) -> Source:
    """A small file as BytesIO for libsndfile, whose callbacks would seek a temporary file before its start."""
    if isinstance(source, str | os.PathLike):
        return source
    data = read_bytes(source, limit + 1)
    rewind(source)
    return io.BytesIO(data) if len(data) <= limit else source


def _audio_too_long(seconds: float, limit: float) -> MediaTooLarge:
    return MediaTooLarge(f"audio is over {limit:g} s long (at least {seconds:.1f} s; MAX_AUDIO_SECONDS)")


def _decode_audio_stream(container, stream, max_seconds: float, timeout: float | None = None) -> DecodedAudio:
    """Decode one audio stream to 16 kHz mono; keep what decoded when the file ends in garbage."""
    resampler = Resampler()
    warnings: list[str] = []
    deadline = _Deadline(timeout)
    try:
        for frame in container.decode(stream):
            deadline.check()
            resampler.push(frame)
            if resampler.samples > max_seconds * SAMPLE_RATE:
                raise _audio_too_long(resampler.samples / SAMPLE_RATE, max_seconds)
    except av.error.FFmpegError as error:
        if resampler.samples == 0:
            raise UndecodableMedia(f"audio data is broken ({_short(error)})") from None
        warnings.append(f"audio is damaged after {resampler.samples / SAMPLE_RATE:.2f} s; the part before was used")
    samples = resampler.finish()
    if samples.size == 0:
        raise UndecodableMedia("audio track holds no decodable sound")
    if not warnings and (note := _shortfall("audio", samples.size / SAMPLE_RATE, _claimed_duration(container, stream))):
        warnings.append(note)
    return DecodedAudio(samples, warnings)


def _shortfall(kind: str, decoded: float, claimed: float) -> str | None:
    """A warning when much less decoded than the container claims (a truncated or lying file)."""
    if claimed > 0 and decoded < 0.9 * claimed - 0.5:
        return f"{kind} file claims {claimed:.1f} s but only {decoded:.3g} s decoded; the decoded part was used"
    return None


class _Deadline:
    """Cooperative decode time limit (a decoding thread cannot be killed, so loops check it)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds if seconds else None

    def check(self) -> None:
        if self.end is not None and time.monotonic() > self.end:
            raise MediaTooLarge(f"took longer than {self.seconds:g} s to decode (DECODE_TIMEOUT_SECONDS)")


# ---------------------------------------------------------------- video


def _open_video(source: Source, max_pixels: int | None = None):
    """Open a video container and its real video stream, mapping failures to MediaErrors; frames the stream
    declares larger than `max_pixels` are refused before any is decoded."""
    try:
        container = av_open(source)
    except av.error.FFmpegError:
        raise wrong_kind(source, "video") from None
    stream = moving_video_stream(container)
    if stream is None or is_still_image_container(container):
        container.close()
        if stream is None and container.streams.audio:
            raise UnsupportedMedia("has no video stream (audio only, or only cover art); send it in `audios`")
        raise wrong_kind(source, "video")
    try:
        refuse_encrypted(source, container)
        if stream.codec_context is not None:
            _check_frame_size(stream.codec_context.width, stream.codec_context.height, max_pixels)
    except MediaError:
        container.close()
        raise
    stream.thread_type = "AUTO"
    return container, stream


def _check_frame_size(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels and width * height > max_pixels:
        raise MediaTooLarge(
            f"video frames are {width}x{height} = {width * height:,} pixels, "
            f"over the limit of {max_pixels:,} (MAX_IMAGE_PIXELS)"
        )


def _frame_to_image(frame: av.VideoFrame, max_pixels: int | None = None) -> Image.Image:
    """A decoded frame as an upright RGB image, scaled down to at most `max_pixels`."""
    width, height = frame.width, frame.height
    if max_pixels and width * height > max_pixels:
        scale = (max_pixels / (width * height)) ** 0.5
        width, height = max(2, int(width * scale)), max(2, int(height * scale))
    image = frame.to_image(width=width, height=height)
    # The display matrix says how far the picture must turn, counter-clockwise, to be upright.
    turns = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
    rotation = round((frame.rotation or 0) / 90) * 90 % 360
    return image.transpose(turns[rotation]) if rotation in turns else image


def _too_long_video(seconds: float, limit: float) -> MediaTooLarge:
    return MediaTooLarge(f"video is over {limit:g} s long (at least {seconds:.1f} s; MAX_VIDEO_SECONDS)")


def load_video(
    source: Source,
    *,
    fps: float,
    max_frames: int,
    max_seconds: float,
    frame_max_pixels: int,
    with_audio: bool = True,
    max_audio_seconds: float | None = None,
    timeout: float | None = None,
    max_image_pixels: int | None = None,
) -> DecodedVideo:
    """Sample frames at `fps` (and the audio track) in one pass over the file.

    The rate returned is the real one between the kept frames (from their timestamps), which is lower
    than `fps` for a source with fewer frames per second, and varies with a variable-rate source.

    Only the sampled frames are kept, each scaled to at most `frame_max_pixels`. When a video is
    longer than `max_frames / fps`, the sampling rate halves as often as needed, so memory stays
    bounded whatever the length and the frames stay as evenly spaced as the source allows. Times
    come from each frame's own timestamp, so variable frame rates and lying container durations
    are handled. Every bound holds as the file is read: frame size (`max_image_pixels`), length,
    audio length, time.
    """
    container, stream = _open_video(source, max_image_pixels)
    with container:
        audio_stream = container.streams.audio[0] if with_audio and container.streams.audio else None
        resampler = Resampler() if audio_stream else None
        sampler = _FrameSampler(stream, fps, max_frames, max_seconds, frame_max_pixels, max_image_pixels)
        warnings: list[str] = []
        deadline = _Deadline(timeout)
        try:
            for packet in container.demux(*([stream] + ([audio_stream] if audio_stream else []))):
                deadline.check()
                for frame in packet.decode():
                    if resampler is not None and packet.stream is audio_stream:
                        resampler.push(frame)
                        if max_audio_seconds is not None and resampler.samples > max_audio_seconds * SAMPLE_RATE:
                            raise _audio_too_long(resampler.samples / SAMPLE_RATE, max_audio_seconds)
                    else:
                        sampler.add(frame)
        except av.error.FFmpegError as error:
            if not sampler.frames:
                raise UndecodableMedia(f"video data is broken ({_short(error)})") from None
            warnings.append(f"video is damaged after {sampler.last_time:.2f} s; the part before was used")
        if not sampler.frames:
            raise UndecodableMedia("video holds no decodable frame")
        seconds = max(sampler.span, sampler.last_time)
        if not warnings and (note := _shortfall("video", seconds, _claimed_duration(container, stream))):
            warnings.append(note)
        times = [time for time, _ in sampler.frames]
        return DecodedVideo(
            frames=[image for _, image in sampler.frames],
            fps=real_rate(times, 1.0 / sampler.interval),
            seconds=seconds,
            audio=_track(resampler, max_audio_seconds),
            warnings=warnings,
            frame_times=times,
        )


def _track(resampler: Resampler | None, max_seconds: float | None) -> DecodedAudio | None:
    """A video's sound track, once its file is read (None when it has none)."""
    if resampler is None:
        return None
    samples = resampler.finish()
    if max_seconds is not None and samples.size > max_seconds * SAMPLE_RATE:
        raise _audio_too_long(samples.size / SAMPLE_RATE, max_seconds)
    return DecodedAudio(samples) if samples.size else None


class _FrameSampler:
    """Keeps frames at about `fps`, from their own timestamps; past `max_frames` kept, every other one goes and
    the rate halves, so memory stays bounded and the frames evenly spaced. Every bound holds as frames come."""

    def __init__(
        self, stream, fps: float, max_frames: int, max_seconds: float, frame_max_pixels: int, max_image_pixels
    ) -> None:
        self.stream, self.max_frames, self.max_seconds = stream, max_frames, max_seconds
        self.frame_max_pixels, self.max_image_pixels = frame_max_pixels, max_image_pixels
        self.interval = 1.0 / fps
        self.frames: list[tuple[float, Image.Image]] = []
        self.start: float | None = None
        self.last_time = 0.0  # start of the latest frame, from the first frame's start
        self.span = 0.0  # end of the latest frame: what actually decoded
        self.next_sample = 0.0

    def add(self, frame: av.VideoFrame) -> None:
        _check_frame_size(frame.width, frame.height, self.max_image_pixels)
        time = frame.time if frame.time is not None else self.last_time + 1.0 / float(self.stream.guessed_rate or 25)
        self.start = time if self.start is None else self.start
        self.last_time = max(self.last_time, time - self.start)
        self.span = max(self.span, self.last_time + float((frame.duration or 0) * (frame.time_base or 0)))
        if self.last_time > self.max_seconds:
            raise _too_long_video(self.last_time, self.max_seconds)
        if time - self.start + 1e-6 >= self.next_sample:
            self.frames.append((time - self.start, _frame_to_image(frame, self.frame_max_pixels)))
            self.next_sample = time - self.start + self.interval
            if len(self.frames) > self.max_frames:
                self.frames = self.frames[::2]
                self.interval *= 2
                self.next_sample = self.frames[-1][0] + self.interval


def real_rate(times: list[float], nominal: float) -> float:
    """Frames per second between frames kept at `times` (seconds); `nominal` when fewer than two frames
    (or no time between them) say nothing. A 1 fps source sampled "at 2 fps" keeps frames 1 s apart: 1.0."""
    if len(times) < 2 or times[-1] <= times[0]:
        return nominal
    return (len(times) - 1) / (times[-1] - times[0])


def extract_audio_track(source: Source, *, max_seconds: float, timeout: float | None = None) -> DecodedAudio | None:
    """The audio track of a video as 16 kHz mono, or None when it has none (video is not decoded)."""
    container, _ = _open_video(source)
    with container:
        if not container.streams.audio:
            return None
        return _decode_audio_stream(container, container.streams.audio[0], max_seconds, timeout)


def extract_last_frame(
    source: Source, *, max_seconds: float, timeout: float | None = None, max_pixels: int | None = None
) -> Image.Image:
    """The video's last frame, found by seeking near the end instead of decoding the whole file.

    It seeks to a few seconds before the claimed end and decodes to the real end, keeping the
    frame with the latest timestamp. If nothing decodes there (the container lied about its
    length, or the end is damaged), the window doubles back towards the start. A video that claims no
    length (a browser's MediaRecorder WebM) is read from the start, bounded by `max_seconds` as it goes.
    """
    container, stream = _open_video(source, max_pixels)
    deadline = _Deadline(timeout)
    with container:
        claimed_end = _claimed_duration(container, stream)
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        window = 4.0
        while True:
            seek_to = max(0.0, claimed_end - window)
            try:
                if seek_to > 0:
                    container.seek(int(seek_to / stream.time_base), stream=stream, backward=True)
                else:
                    container.seek(0, stream=stream, backward=True)
            except av.error.FFmpegError:
                seek_to = 0.0
            last: av.VideoFrame | None = None
            try:
                for frame in container.decode(stream):
                    deadline.check()
                    _check_frame_size(frame.width, frame.height, max_pixels)
                    if frame.time is not None and frame.time - start > max_seconds:
                        raise _too_long_video(frame.time - start, max_seconds)
                    if last is None or (frame.pts or 0) >= (last.pts or 0):
                        last = frame
            except av.error.FFmpegError:
                pass  # a damaged tail: keep the last good frame, if any
            if last is not None:
                if last.time is not None and last.time - start > max_seconds:
                    raise _too_long_video(last.time - start, max_seconds)
                return _frame_to_image(last)
            if seek_to == 0:
                raise UndecodableMedia("video holds no decodable frame")
            window *= 4


def _claimed_duration(container, stream) -> float:
    """The container's claimed duration in seconds (0 when it gives none)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return 0.0


def _short(error: BaseException) -> str:
    text = str(error).split(";")[0].strip() or type(error).__name__
    return text[:200]
