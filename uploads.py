"""Uploaded files to model inputs: limits, decoding through media.py, and errors that name the file.

HTTP glue around `media.py`: it knows FastAPI's UploadFile and turns MediaErrors into
HTTPExceptions whose message starts with the field and file (`videos[0] 'clip.mp4': ...`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, UploadFile

import media
from generation import VideoInput
from settings import Settings

logger = logging.getLogger("multimodal_api")

MEDIA_STATUS = {media.UnsupportedMedia: 415, media.UndecodableMedia: 400, media.MediaTooLarge: 413}


@dataclass
class MediaInputs:
    images: list = field(default_factory=list)
    audios: list = field(default_factory=list)
    videos: list[VideoInput] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _label(field_name: str, index: int, upload: UploadFile) -> str:
    name = "".join(ch for ch in (upload.filename or "") if ch.isprintable())[:100]
    return f"{field_name}[{index}]" + (f" '{name}'" if name else "")


def decode_uploads(
    settings: Settings,
    uploads: dict[str, list[UploadFile]],
    extract_video_audio: bool,
    extract_video_frame: bool,
) -> MediaInputs:
    """Decode every upload (runs in a worker thread). Raises HTTPException naming the bad file."""
    s = settings
    out = MediaInputs()
    for field_name, files in uploads.items():
        for index, upload in enumerate(files):
            label = _label(field_name, index, upload)
            try:
                _decode_one(s, field_name, upload.file, out, label, extract_video_audio, extract_video_frame)
            except media.MediaError as error:
                raise HTTPException(MEDIA_STATUS[type(error)], f"{label}: {error}") from None
            except Exception:  # noqa: BLE001 - a decoder failure we did not foresee is still the file's fault
                logger.exception("unexpected error decoding %s", label)
                raise HTTPException(400, f"{label}: could not be decoded") from None
    return out


def _decode_one(
    s: Settings, field_name: str, source, out: MediaInputs, label: str, extract_audio: bool, extract_frame: bool
) -> None:
    timeout = s.decode_timeout_seconds
    if field_name in ("images", "audios"):
        value, warnings = decode_media(field_name[:-1], source, s)
        (out.images if field_name == "images" else out.audios).append(value)
        out.warnings += [f"{label}: {w}" for w in warnings]
        return
    converted = False
    if extract_frame:
        out.images.append(media.extract_last_frame(source, max_seconds=s.max_video_seconds, timeout=timeout))
        converted = True
    if extract_audio:
        track = media.extract_audio_track(source, max_seconds=s.max_audio_seconds, timeout=timeout)
        if track is None:
            out.warnings.append(f"{label}: has no audio track, so no audio was extracted")
        else:
            out.audios.append(track.samples)
            out.warnings += [f"{label}: {w}" for w in track.warnings]
            converted = True
    if converted:
        return
    if extract_audio:
        out.warnings.append(f"{label}: sent whole as a video instead")
    video, warnings = decode_media("video", source, s)
    out.videos.append(video)
    out.warnings += [f"{label}: {w}" for w in warnings]


def decode_media(kind: str, source, s: Settings) -> tuple[Any, list[str]]:
    """One image, audio or video (as video, with its own audio track) decoded within the settings' limits,
    and the decoder's warnings (what a damaged file still yielded). Raises media.MediaError."""
    if kind == "image":
        image = media.load_image(source, max_pixels=s.max_image_pixels)
        if s.engine == "openai" and not image.warnings:  # upstreams may take the file itself (remote_engine)
            image.image.info["source"] = media.rewind(source).read()
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
    )
    source = media.rewind(source).read() if s.engine == "openai" else None  # upstreams decode the file again
    return VideoInput(video.frames, video.fps, video.audio.samples if video.audio else None, source), video.warnings


def check_uploads(settings: Settings, uploads: dict[str, list[UploadFile]]) -> dict[str, list[UploadFile]]:
    """Drop the empty parts browsers send for an untouched file input; enforce count and size limits."""
    checked = {}
    for field_name, files in uploads.items():
        files = [f for f in files if f.filename or (f.size or 0) > 0]
        if len(files) > settings.max_files_per_field:
            raise HTTPException(
                413,
                f"{field_name}: {len(files)} files, at most {settings.max_files_per_field} "
                "are accepted (MAX_FILES_PER_FIELD)",
            )
        for index, upload in enumerate(files):
            if (upload.size or 0) > settings.max_file_bytes:
                raise HTTPException(
                    413,
                    f"{_label(field_name, index, upload)}: {upload.size:,} bytes, over the "
                    f"limit of {settings.max_file_bytes:,} (MAX_FILE_MB)",
                )
            if upload.size == 0:
                raise HTTPException(400, f"{_label(field_name, index, upload)}: the file is empty")
        checked[field_name] = files
    return checked
