"""media.py on files made here: decoding, conversion, and the errors for bad or misplaced files."""

from __future__ import annotations

import io

import make_media
import numpy as np
import pytest
from PIL import Image

from qwen_omni_server.core import media

BIG = 10**9


def load_video(data: bytes, **overrides) -> media.DecodedVideo:
    options = {"fps": 2.0, "max_frames": 64, "max_seconds": 3600, "frame_max_pixels": BIG, **overrides}
    return media.load_video(io.BytesIO(data), **options)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_images_decode_to_rgb_of_their_size(fmt):
    image = media.load_image(io.BytesIO(make_media.image_bytes(fmt, (96, 64))), max_pixels=BIG).image
    assert image.mode == "RGB" and image.size == (96, 64)


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = io.BytesIO()
    rgba.save(out, "PNG")
    image = media.load_image(out, max_pixels=BIG).image
    assert image.getpixel((5, 5)) == (255, 255, 255)
    assert image.getpixel((0, 0)) == (255, 0, 0)


def test_sixteen_bit_grey_is_rescaled_not_clipped():
    grey = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    out = io.BytesIO()
    grey.save(out, "PNG")
    red, green, blue = media.load_image(out, max_pixels=BIG).image.getpixel((0, 0))
    assert 120 <= red <= 135 and red == green == blue


def test_exif_orientation_is_applied():
    picture = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    out = io.BytesIO()
    picture.save(out, "JPEG", exif=exif)
    assert media.load_image(out, max_pixels=BIG).image.size == (20, 40)


def test_image_over_the_pixel_limit_is_refused_before_decoding():
    with pytest.raises(media.MediaTooLarge, match="MAX_IMAGE_PIXELS"):
        media.load_image(io.BytesIO(make_media.image_bytes("PNG", (200, 100))), max_pixels=10_000)


@pytest.mark.parametrize("container", ["wav", "flac", "mp3", "opus", "m4a"])
def test_audio_decodes_to_16k_mono_float(container):
    audio = media.load_audio(io.BytesIO(make_media.audio_bytes(container, 1.0)), max_seconds=60)
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert abs(audio.seconds - 1.0) < 0.1
    # A 0.3-amplitude tone in both channels stays 0.3 after the downmix (no -3 dB sum, no clipping).
    assert 0.25 < np.abs(audio.samples).max() < 0.35


def test_audio_is_judged_by_its_bytes_not_its_name(tmp_path):
    path = tmp_path / "really-an-mp3.wav"
    path.write_bytes(make_media.audio_bytes("mp3", 1.0))
    assert abs(media.load_audio(str(path), max_seconds=60).seconds - 1.0) < 0.1


def test_audio_over_the_duration_limit_is_refused():
    with pytest.raises(media.MediaTooLarge, match="MAX_AUDIO_SECONDS"):
        media.load_audio(io.BytesIO(make_media.audio_bytes("wav", 2.0)), max_seconds=1.0)


def test_video_frames_are_sampled_at_the_rate_asked_with_the_audio_track():
    video = load_video(make_media.video_bytes(3.0, fps=10))
    assert len(video.frames) == 6 and video.fps == 2.0
    brightness = [np.asarray(f)[-1, -1].mean() for f in video.frames]
    assert brightness == sorted(brightness)  # in time order
    assert video.audio is not None and abs(video.audio.seconds - 3.0) < 0.1


def test_long_videos_halve_the_rate_instead_of_holding_more_frames():
    video = load_video(make_media.video_bytes(8.0, fps=10), max_frames=5)
    assert 3 <= len(video.frames) <= 5
    assert video.fps == 0.5


def test_frames_are_scaled_down_to_the_frame_budget():
    video = load_video(make_media.video_bytes(1.0, size=(320, 240)), frame_max_pixels=160 * 120)
    assert all(f.width * f.height <= 160 * 120 for f in video.frames)


def test_video_without_audio_track():
    data = make_media.video_bytes(1.0, audio=False)
    assert load_video(data).audio is None
    assert media.extract_audio_track(io.BytesIO(data), max_seconds=60) is None


def test_last_frame_is_the_final_picture():
    data = make_media.video_bytes(3.0, fps=10, gop=5)
    last = media.extract_last_frame(io.BytesIO(data), max_seconds=60)
    first = load_video(data).frames[0]
    assert np.asarray(last)[-1, -1].mean() > 240 > np.asarray(first)[-1, -1].mean()


def test_display_matrix_rotation_is_applied():
    data = make_media.video_bytes(1.0, size=(128, 96), audio=False, rotation=90)
    frame = media.extract_last_frame(io.BytesIO(data), max_seconds=60)
    assert frame.size == (96, 128)
    # The red marker, top-left when stored, sits bottom-left after a 90° counter-clockwise turn.
    red, green, _ = frame.getpixel((5, frame.height - 5))
    assert red > 200 and green < 60


def test_audio_track_extraction():
    track = media.extract_audio_track(io.BytesIO(make_media.video_bytes(2.0)), max_seconds=60)
    assert track is not None and abs(track.seconds - 2.0) < 0.1


def test_video_over_the_duration_limit_is_refused():
    with pytest.raises(media.MediaTooLarge, match="MAX_VIDEO_SECONDS"):
        load_video(make_media.video_bytes(3.0), max_seconds=1.0)
    with pytest.raises(media.MediaTooLarge, match="MAX_VIDEO_SECONDS"):
        media.extract_last_frame(io.BytesIO(make_media.video_bytes(3.0)), max_seconds=1.0)


@pytest.mark.parametrize(
    ("data", "loader", "error", "message"),
    [
        (make_media.video_bytes(1.0), "image", media.UnsupportedMedia, "is a video, not an image; send it in `videos`"),
        (
            make_media.image_bytes(),
            "audio",
            media.UnsupportedMedia,
            "is an image, not an audio file; send it in `images`",
        ),
        (make_media.audio_bytes("wav"), "video", media.UnsupportedMedia, "send it in `audios`"),
        (make_media.image_bytes(), "video", media.UnsupportedMedia, "is an image, not a video"),
        (make_media.video_bytes(1.0, audio=False), "audio", media.UnsupportedMedia, "video without an audio track"),
        (b"just some text\n" * 10, "video", media.UnsupportedMedia, "not a recognised image, audio or video format"),
        (b"MThd\x00\x00\x00\x06" + bytes(40), "audio", media.UnsupportedMedia, "MIDI"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "image", media.UnsupportedMedia, "SVG"),
        (make_media.image_bytes("PNG")[:120], "image", media.UndecodableMedia, "truncated"),
        (make_media.video_bytes(1.0)[:3000], "video", media.UndecodableMedia, "MP4/MOV file but is broken"),
        (b"", "audio", media.UndecodableMedia, "empty"),
    ],
)
def test_bad_or_misplaced_files_get_precise_errors(data, loader, error, message):
    load = {
        "image": lambda f: media.load_image(f, max_pixels=BIG),
        "audio": lambda f: media.load_audio(f, max_seconds=60),
        "video": lambda f: load_video(f.getvalue()),
    }[loader]
    with pytest.raises(error, match=message.replace("`", ".").replace("(", ".").replace(")", ".")):
        load(io.BytesIO(data))


class CountingReader(io.BytesIO):
    """Counts the bytes a decoder reads, to show where it stopped."""

    bytes_read = 0

    def read(self, size=-1):
        data = super().read(size)
        self.bytes_read += len(data)
        return data


def test_video_frames_over_max_image_pixels_are_refused_before_decoding():
    clip = make_media.video_bytes(1.0, size=(128, 96), audio=False)  # 12,288-pixel frames
    with pytest.raises(media.MediaTooLarge, match="MAX_IMAGE_PIXELS"):
        load_video(clip, max_image_pixels=10_000)
    with pytest.raises(media.MediaTooLarge, match="MAX_IMAGE_PIXELS"):
        media.extract_last_frame(io.BytesIO(clip), max_seconds=3600, max_pixels=10_000)
    assert len(load_video(clip, max_image_pixels=12_288).frames) == 2


def test_a_videos_audio_track_is_bounded_while_it_decodes():
    clip = CountingReader(make_media.video_bytes(20.0, audio=True))
    with pytest.raises(media.MediaTooLarge, match="MAX_AUDIO_SECONDS"):
        media.load_video(clip, fps=2.0, max_frames=64, max_seconds=3600, frame_max_pixels=BIG, max_audio_seconds=1)
    assert clip.bytes_read < len(clip.getvalue()) / 2  # refused after about a second, not after all 20


def test_the_last_frame_of_a_recording_without_duration_is_bounded_as_it_is_read():
    recording = make_media.recorder_webm(20.0)
    assert av_duration(recording) is None  # what a browser's MediaRecorder writes
    reader = CountingReader(recording)
    with pytest.raises(media.MediaTooLarge, match="MAX_VIDEO_SECONDS"):
        media.extract_last_frame(reader, max_seconds=2)
    assert reader.bytes_read < len(recording) / 2
    last = media.extract_last_frame(io.BytesIO(make_media.recorder_webm(3.0)), max_seconds=60)
    assert np.asarray(last).mean() > 170  # the last (brightest) frame


def test_the_last_frame_seek_path_on_a_clip_longer_than_its_window():
    clip = make_media.video_bytes(12.0, fps=10, audio=False, gop=10)  # 12 s: past the 4-second seek window
    last = media.extract_last_frame(io.BytesIO(clip), max_seconds=3600)
    assert last.getpixel((100, 80)) == (255, 255, 255)  # frame 119 of 120, not one before the window


def av_duration(data: bytes):
    import av

    with av.open(io.BytesIO(data)) as container:
        return container.duration


@pytest.mark.parametrize("fmt, mime", [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")])
def test_a_whole_upright_rgb_picture_can_go_on_as_it_came(fmt, mime):
    data = make_media.image_bytes(fmt, (120, 80))
    picture = media.picture_file(io.BytesIO(data), max_pixels=10_000)
    assert (picture.mime, picture.width, picture.height, picture.data) == (mime, 120, 80, data)
    decoded = media.load_image(io.BytesIO(picture.data), max_pixels=10_000)
    assert decoded.image.size == (120, 80) and not decoded.warnings


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return make_media.image_bytes("JPEG", (60, 40), exif=exif.tobytes())


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(make_media.image_bytes("PNG", mode="RGBA"), id="transparency"),
        pytest.param(make_media.image_bytes("PNG", mode="L"), id="grey"),
        pytest.param(make_media.image_bytes("JPEG", mode="CMYK"), id="cmyk"),
        pytest.param(make_media.image_bytes("GIF"), id="gif"),
        pytest.param(exif_rotated_jpeg(), id="exif-rotated"),
        pytest.param(make_media.image_bytes("JPEG")[:-200], id="jpeg-cut-short"),
        pytest.param(make_media.image_bytes("PNG")[:-20], id="png-cut-short"),
        pytest.param(make_media.image_bytes("WEBP")[:-10], id="webp-cut-short"),
        pytest.param(b"not a picture at all" * 10, id="not-a-picture"),
    ],
)
def test_pictures_that_need_converting_or_may_be_cut_are_decoded_here(data):
    assert media.picture_file(io.BytesIO(data), max_pixels=10**6) is None


def test_a_png_with_an_exif_chunk_anywhere_is_decoded_here():
    """Pillow reads an eXIf chunk after the pixel data only by decoding them, so any eXIf rules the file out."""
    chunks = make_media.png_chunks(make_media.image_bytes("PNG", (96, 64)))
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = make_media.png_from_chunks([*chunks[:-1], (b"eXIf", exif.tobytes()), chunks[-1]])
    assert media.load_image(io.BytesIO(tagged), max_pixels=10**6).image.size == (64, 96)  # turned upright here
    assert media.picture_file(io.BytesIO(tagged), max_pixels=10**6) is None


def test_a_picture_over_the_pixel_limit_is_refused_from_its_header():
    with pytest.raises(media.MediaTooLarge, match="MAX_IMAGE_PIXELS"):
        media.picture_file(io.BytesIO(make_media.image_bytes("JPEG", (200, 100))), max_pixels=19_999)


@pytest.mark.parametrize("damage", ["broken", "cut"])
def test_a_damaged_picture_that_looks_whole_is_only_found_out_by_decoding_it(damage):
    """What the front's check (uploads.check_pictures) is for: the verdict load_image gives."""
    data = make_media.damaged_png(damage, size=(200, 150))
    picture = media.picture_file(io.BytesIO(data), max_pixels=10**6)
    assert picture is not None
    if damage == "broken":
        with pytest.raises(media.UndecodableMedia, match="image data is broken"):
            media.check_picture(picture, max_pixels=10**6)
    else:
        recovered = media.check_picture(picture, max_pixels=10**6)
        assert recovered.warnings == media.load_image(io.BytesIO(data), max_pixels=10**6).warnings != []


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_a_whole_picture_passes_the_check(fmt):
    data = make_media.image_bytes(fmt, (300, 200))
    assert media.check_picture(media.picture_file(io.BytesIO(data), max_pixels=10**6), max_pixels=10**6) is None


@pytest.mark.parametrize("kept", [0.3, 0.9])
def test_the_jpeg_check_at_one_eighth_scale_judges_as_a_full_decode(kept):
    """A JPEG cut inside its scan and ended again: libjpeg fills the rest at any scale, so both pass it."""
    whole = make_media.image_bytes("JPEG", (640, 480), quality=95)
    data = whole[: int(len(whole) * kept)] + b"\xff\xd9"
    picture = media.picture_file(io.BytesIO(data), max_pixels=10**6)
    full = media.load_image(io.BytesIO(data), max_pixels=10**6)
    assert media.check_picture(picture, max_pixels=10**6) is None and not full.warnings
