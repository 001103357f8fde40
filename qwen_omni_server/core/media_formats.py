"""What an uploaded file is, judged by its bytes: kinds, signatures, and the errors media decoding raises.

`media.py` decodes; this module only looks. A file no bundled decoder reads is named when its
signature is known (MIDI, SVG, JPEG XL…); a known format whose data is broken is told apart
from an unknown one; a file of the wrong kind for its field says which field takes it.
"""

from __future__ import annotations

import os
from typing import BinaryIO, Literal

import av
from PIL import Image

Source = str | os.PathLike | BinaryIO
Kind = Literal["image", "audio", "video"]

# Container formats that FFmpeg reads as a single picture rather than a moving video.
_STILL_IMAGE_FORMATS = ("image2", "_pipe", "heif", "ico", "tga")
# ISO-BMFF brands of still images (HEIF, HEIC, AVIF), which FFmpeg opens as a "mov" container.
_STILL_IMAGE_BRANDS = {"mif1", "msf1", "heic", "heix", "heim", "heis", "hevc", "avif", "avis"}
FIELD_OF_KIND: dict[str, str] = {"image": "images", "audio": "audios", "video": "videos"}
_NAMED = {"image": "an image", "audio": "an audio file", "video": "a video"}
# Signatures of formats that no bundled decoder reads, to name them in the 415.
_KNOWN_UNSUPPORTED = (
    (b"MThd", "MIDI"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (b"<svg", "SVG"),
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "ZIP"),
)
# (offset, signature, name) of formats we do read, to tell "broken" from "unknown".
_KNOWN_SIGNATURES = (
    (0, b"\x89PNG", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"GIF8", "a GIF image"),
    (8, b"WEBP", "a WebP image"),
    (0, b"BM", "a BMP image"),
    (0, b"II*\x00", "a TIFF image"),
    (0, b"MM\x00*", "a TIFF image"),
    (4, b"ftypheic", "a HEIC image"),
    (4, b"ftypavif", "an AVIF image"),
    (8, b"WAVE", "a WAV file"),
    (0, b"fLaC", "a FLAC file"),
    (0, b"ID3", "an MP3 file"),
    (0, b"OggS", "an Ogg file"),
    (8, b"AIFF", "an AIFF file"),
    (8, b"AIFC", "an AIFF file"),
    (4, b"ftyp", "an MP4/MOV file"),
    (0, b"\x1aE\xdf\xa3", "a Matroska/WebM file"),
    (8, b"AVI ", "an AVI file"),
    (0, b"FLV", "an FLV file"),
    (0, b"\x00\x00\x01\xba", "an MPEG-PS file"),
)


class MediaError(Exception):
    """A problem with an uploaded file; the message is meant for the user."""


class UnsupportedMedia(MediaError):
    """Not a format we decode, or the wrong kind of media for the field."""


class UndecodableMedia(MediaError):
    """A recognised format whose data is broken."""


class MediaTooLarge(MediaError):
    """Over a configured limit (pixels, duration)."""


def rewind(source: Source) -> Source:
    if not isinstance(source, str | os.PathLike):
        source.seek(0)
    return source


def read_bytes(source: Source, size: int = -1) -> bytes:
    """The file's first `size` bytes (all of them by default); a file object is read from its start."""
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as handle:
            return handle.read(size)
    source.seek(0)
    return source.read(size)


def read_head(source: Source, size: int = 64) -> bytes:
    data = read_bytes(source, size)
    rewind(source)
    return data


def av_open(source: Source) -> av.container.InputContainer:
    # mode="r" explicitly: PyAV would take a "w+b" temporary file for an output otherwise.
    return av.open(rewind(source), mode="r", metadata_errors="ignore")


def sniff_kind(source: Source) -> Kind | None:
    """What the bytes are (image, audio or video), or None when no bundled decoder reads them."""
    try:
        with Image.open(rewind(source)):
            return "image"
    except Exception:  # noqa: BLE001 - any failure just means "not an image Pillow knows"
        pass
    try:
        with av_open(source) as container:
            if moving_video_stream(container) is not None:
                return "image" if is_still_image_container(container) else "video"
            if container.streams.audio:
                return "audio"
    except Exception:  # noqa: BLE001
        pass
    finally:
        rewind(source)
    return None


def unreadable(source: Source) -> MediaError:
    """The error for bytes no bundled decoder reads: unsupported (and named), broken, or unknown."""
    head = read_head(source, 1024)
    stripped = head.lstrip()
    for signature, name in _KNOWN_UNSUPPORTED:
        if head.startswith(signature) or stripped.startswith(signature):
            return UnsupportedMedia(f"is a {name} file, which is not supported")
    if stripped.startswith(b"<?xml") and b"<svg" in head:
        return UnsupportedMedia("is an SVG file, which is not supported")
    if not head:
        return UndecodableMedia("is empty")
    for offset, signature, name in _KNOWN_SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return UndecodableMedia(f"looks like {name} but is broken or truncated")
    return UnsupportedMedia("is not a recognised image, audio or video format")


def wrong_kind(source: Source, wanted: Kind) -> MediaError:
    """The error for a file that is not of the `wanted` kind: what it is, and which field takes it."""
    kind = sniff_kind(source)
    if kind is None:
        return unreadable(source)
    return UnsupportedMedia(f"is {_NAMED[kind]}, not {_NAMED[wanted]}; send it in `{FIELD_OF_KIND[kind]}`")


def moving_video_stream(container: av.container.InputContainer) -> av.VideoStream | None:
    """The first video stream that is real video, not an attached picture (cover art)."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def is_still_image_container(container: av.container.InputContainer) -> bool:
    name = container.format.name
    if any(marker in name for marker in _STILL_IMAGE_FORMATS):
        return True
    brand = str(container.metadata.get("major_brand", "")).strip()
    return brand in _STILL_IMAGE_BRANDS


def refuse_encrypted(source: Source, container) -> None:
    """FFmpeg "decodes" DRM-protected MP4 into garbage; refuse it instead."""
    if "mp4" in container.format.name and mp4_is_encrypted(source):
        raise UnsupportedMedia("is encrypted (DRM-protected), so it cannot be decoded")


def mp4_is_encrypted(source: Source) -> bool:
    """Whether the ISO-BMFF file's moov box holds encrypted sample entries (encv / enca).

    The container may be reading the same file object: its position is restored afterwards.
    """
    handle: BinaryIO = open(source, "rb") if isinstance(source, str | os.PathLike) else source  # noqa: SIM115
    reading_at = handle.tell()
    try:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        position = 0
        while position + 8 <= size:
            handle.seek(position)
            header = handle.read(8)
            box_size, box_type = int.from_bytes(header[:4], "big"), header[4:8]
            if box_size == 1:
                box_size = int.from_bytes(handle.read(8), "big")
            elif box_size == 0:
                box_size = size - position
            if box_type == b"moov":
                body = handle.read(min(box_size, 64 * 1024 * 1024))
                return b"encv" in body or b"enca" in body
            if box_size < 8:
                return False
            position += box_size
        return False
    finally:
        if handle is source:
            handle.seek(reading_at)
        else:
            handle.close()
