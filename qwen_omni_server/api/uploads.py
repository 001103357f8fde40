"""Uploaded files to model inputs: limits, decoding through `core.media`, and errors that name the file.

HTTP glue around `core.media`: it knows FastAPI's UploadFile and answers a MediaError with the error whose
message starts with the field and file (`videos[0] 'clip.mp4': ...`). A /v1 media part's bytes decode
through the same `decode_file`. An engine that passes files on (`Engine.passes_files`) gets pictures that
can go as they came as `PictureFile`s, and each video's file with its frames.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
from fastapi import Request
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser

from qwen_omni_server.api.errors import ApiError, api_error
from qwen_omni_server.core import media
from qwen_omni_server.core.settings import Settings
from qwen_omni_server.core.types import VideoInput

logger = logging.getLogger("multimodal_api")


@dataclass(frozen=True)
class DecodeOptions:
    """How a request's files are decoded: videos turned into their last frame and sound track (/multimodal's
    extract_video_frame / extract_video_audio), and files kept for an engine that passes them on."""

    extract_video_audio: bool = False
    extract_video_frame: bool = False
    passes_files: bool = False


@dataclass
class MediaInputs:
    images: list = field(default_factory=list)
    audios: list = field(default_factory=list)
    videos: list[VideoInput] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    pictures: list[tuple[str, media.PictureFile]] = field(default_factory=list)  # to check: `check_pictures`


def _label(field_name: str, index: int, upload: UploadFile | None = None, filename: str | None = None) -> str:
    name = "".join(ch for ch in ((upload.filename if upload else filename) or "") if ch.isprintable())[:100]
    return f"{field_name}[{index}]" + (f" '{name}'" if name else "")


# ---------------------------------------------------------------- the form, read as it arrives


class _LimitedMultiPartParser(MultiPartParser):
    """Starlette's streaming multipart parser with our limits applied as the bytes arrive: an unknown field
    or a file where a value belongs is refused at its headers, the file one too many in a field at its
    headers (MAX_FILES_PER_FIELD), and a file is cut at the byte that crosses MAX_FILE_MB."""

    def __init__(self, request: Request, settings: Settings, fields: set[str], file_fields: set[str]) -> None:
        super().__init__(
            request.headers,
            request.stream(),
            max_files=len(file_fields) * settings.max_files_per_field + 8,  # (+ empty parts from browsers)
            max_fields=len(fields) * 4,
            max_part_size=max(1024 * 1024, 4 * settings.max_text_chars + 16),
        )
        self.settings = settings
        self.fields = fields
        self.file_fields = file_fields
        self.files_seen: dict[str, int] = {}
        self.part_bytes = 0
        self.part_label = ""

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        part = self._current_part
        name = part.field_name
        if name not in self.fields:
            raise ApiError(422, f"unknown form field(s) {[name]}; accepted: {', '.join(sorted(self.fields))}")
        if part.file is None:
            if name in self.file_fields:
                raise ApiError(422, f"{name}: expected a file upload, got a plain value")
            return
        if name not in self.file_fields:
            raise ApiError(422, f"{name}: expected a value, got a file upload")
        index = self.files_seen.get(name, 0)
        self.part_bytes = 0
        self.part_label = _label(name, index, filename=part.file.filename)
        if part.file.filename:  # browsers send an empty, nameless part for a file input left empty
            self.files_seen[name] = index + 1
            if index + 1 > self.settings.max_files_per_field:
                raise ApiError(
                    413,
                    f"{name}: more than {self.settings.max_files_per_field} files; at most "
                    f"{self.settings.max_files_per_field} are accepted (MAX_FILES_PER_FIELD)",
                )

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current_part.file is not None:
            self.part_bytes += end - start
            if self.part_bytes > self.settings.max_file_bytes:
                raise ApiError(
                    413,
                    f"{self.part_label}: over the limit of {self.settings.max_file_bytes:,} bytes (MAX_FILE_MB); "
                    f"refused at byte {self.part_bytes:,}",
                )
        super().on_part_data(data, start, end)


async def read_form(request: Request, settings: Settings, fields: set[str], file_fields: set[str]) -> FormData:
    """The request's form (multipart or url-encoded), read as it arrives with the upload limits applied.
    A request with no body type reads as an empty form; another type (JSON…) is a 415. Files are spooled to
    temporary files: close them (`close_form`)."""
    content_type, _ = parse_options_header(request.headers.get("content-type", ""))
    if content_type not in (b"", b"multipart/form-data", b"application/x-www-form-urlencoded"):
        raise ApiError(
            415,
            f"the body is {content_type.decode('latin-1')}, but this route takes a multipart form "
            "(curl -F text=... -F images=@file); for JSON, use POST /v1/chat/completions",
        )
    try:
        if content_type == b"multipart/form-data":
            return await _LimitedMultiPartParser(request, settings, fields, file_fields).parse()
        if content_type == b"application/x-www-form-urlencoded":
            form = await FormParser(request.headers, request.stream(), max_fields=len(fields) * 4).parse()
            unknown = sorted(set(form.keys()) - fields)
            if unknown:
                raise ApiError(422, f"unknown form field(s) {unknown}; accepted: {', '.join(sorted(fields))}")
            for name in sorted(file_fields & set(form.keys())):
                raise ApiError(422, f"{name}: expected a file upload, got a plain value")
            return form
    except MultiPartException as error:
        raise ApiError(400, f"the form could not be read: {error.message}") from None
    return FormData()


async def close_form(form: FormData | None) -> None:
    """Close (and so delete) every spooled upload of a form."""
    for _, value in form.multi_items() if form is not None else []:
        if isinstance(value, UploadFile):
            await value.close()


def decode_uploads(
    settings: Settings,
    uploads: dict[str, list[UploadFile]],
    options: DecodeOptions,
) -> MediaInputs:
    """Decode every upload (runs in a worker thread). Raises ApiError naming the bad file."""
    out = MediaInputs()
    for field_name, files in uploads.items():
        for index, upload in enumerate(files):
            label = _label(field_name, index, upload)
            with _naming(label):
                _decode_one(settings, field_name, upload.file, out, label, options)
    return out


@contextlib.contextmanager
def _naming(label: str) -> Iterator[None]:
    """A decoding failure as the error that names the file."""
    try:
        yield
    except media.MediaError as error:
        raise api_error(error, prefix=label) from None
    except Exception:  # noqa: BLE001 - a decoder failure we did not foresee is still the file's fault
        logger.exception("unexpected error decoding %s", label)
        raise ApiError(400, f"{label}: could not be decoded") from None


def _decode_one(
    s: Settings, field_name: str, source: BinaryIO, out: MediaInputs, label: str, options: DecodeOptions
) -> None:
    kind = field_name[:-1]
    values, warnings = decode_parts(kind, source, s, options)
    for value in values:
        if isinstance(value, VideoInput):
            out.videos.append(value)
        elif isinstance(value, np.ndarray):
            out.audios.append(value)
        else:
            out.images.append(value)
            if isinstance(value, media.PictureFile):
                out.pictures.append((label, value))
    out.warnings += [f"{label}: {w}" for w in warnings]


def decode_parts(kind: str, source: BinaryIO, s: Settings, options: DecodeOptions) -> tuple[list[Any], list[str]]:
    """What one file becomes for the model, and the decoder's warnings: an image or audio as itself; a video as
    itself, or, with the video options, as its last frame and/or its sound track (in that order). Raises
    media.MediaError."""
    if kind != "video" or not (options.extract_video_frame or options.extract_video_audio):
        value, notes = decode_file(kind, source, s, options.passes_files)
        return [value], notes
    timeout = s.decode_timeout_seconds
    values: list[Any] = []
    warnings: list[str] = []
    if options.extract_video_frame:
        frame = media.extract_last_frame(
            source, max_seconds=s.max_video_seconds, timeout=timeout, max_pixels=s.max_image_pixels
        )
        values.append(frame)
    if options.extract_video_audio:
        track = media.extract_audio_track(source, max_seconds=s.max_audio_seconds, timeout=timeout)
        if track is None:
            warnings.append("has no audio track, so no audio was extracted")
        else:
            values.append(track.samples)
            warnings += track.warnings
    if values:
        return values, warnings
    video, more = decode_file("video", source, s, options.passes_files)
    return [video], [*warnings, "sent whole as a video instead", *more]


def decode_file(kind: str, source: BinaryIO, s: Settings, passes_files: bool = False) -> tuple[Any, list[str]]:
    """One image, audio or video (as video, with its own audio track) decoded within the settings' limits,
    and the decoder's warnings (what a damaged file still yielded). Raises media.MediaError.

    For an engine that passes files on, an image that can go as it came stays a `media.PictureFile`, checked
    from its header only: it goes on at once and is decoded in full meanwhile (`check_pictures`)."""
    if kind == "image":
        if passes_files and (picture := media.picture_file(source, max_pixels=s.max_image_pixels)):
            return picture, []
        image = media.load_image(source, max_pixels=s.max_image_pixels)
        return image.image, image.warnings
    if kind == "audio":
        audio = media.load_audio(source, max_seconds=s.max_audio_seconds, timeout=s.decode_timeout_seconds)
        return audio.samples, audio.warnings
    video = media.load_video(
        source,
        fps=s.video_fps,
        max_frames=s.video_max_frames,
        max_seconds=s.max_video_seconds,
        frame_max_pixels=s.video_max_pixels,
        max_audio_seconds=s.max_audio_seconds,
        timeout=s.decode_timeout_seconds,
        max_image_pixels=s.max_image_pixels,
    )
    kept = media.read_bytes(source) if passes_files else None  # an engine that passes files on sends it whole
    return VideoInput(video.frames, video.fps, video.audio.samples if video.audio else None, kept), video.warnings


def check_pictures(settings: Settings, pictures: list[tuple[str, media.PictureFile]]) -> dict:
    """Decode in full each picture that went upstream as it came, as any upload is decoded (runs in a worker
    thread). Raises ApiError naming a file that does not decode; returns those that decoded only in
    part (a cut file recovered) as {picture: (label, DecodedImage)}: they must go again as their pixels."""
    recovered = {}
    for label, picture in pictures:
        with _naming(label):
            decoded = media.check_picture(picture, max_pixels=settings.max_image_pixels)
        if decoded is not None:
            recovered[picture] = (label, decoded)
    return recovered


def check_uploads(settings: Settings, uploads: dict[str, list[UploadFile]]) -> dict[str, list[UploadFile]]:
    """Drop the empty parts browsers send for an untouched file input; enforce count and size limits."""
    checked = {}
    for field_name, files in uploads.items():
        files = [f for f in files if f.filename or (f.size or 0) > 0]
        if len(files) > settings.max_files_per_field:
            raise ApiError(
                413,
                f"{field_name}: {len(files)} files, at most {settings.max_files_per_field} "
                "are accepted (MAX_FILES_PER_FIELD)",
            )
        for index, upload in enumerate(files):
            if (upload.size or 0) > settings.max_file_bytes:
                raise ApiError(
                    413,
                    f"{_label(field_name, index, upload)}: {upload.size:,} bytes, over the "
                    f"limit of {settings.max_file_bytes:,} (MAX_FILE_MB)",
                )
            if upload.size == 0:
                raise ApiError(400, f"{_label(field_name, index, upload)}: the file is empty")
        checked[field_name] = files
    return checked
