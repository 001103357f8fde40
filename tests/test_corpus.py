"""Every file of the real media corpus through POST /multimodal on the tiny model.

Files under image/, audio/ and video/ must answer 200 (or a 415 naming a format no bundled
decoder reads); files under broken/ must answer 4xx, unless their bytes are in fact a valid file
of the field's kind, or a truncated file still yields media and the response says what was
recovered. Never a 5xx, and the server keeps serving after each one.
"""

from __future__ import annotations

import collections
import csv

import pytest
from conftest import CORPUS

pytestmark = pytest.mark.skipif(
    not (CORPUS / "MANIFEST.tsv").exists(), reason=f"the media corpus is absent ({CORPUS}); nothing to walk"
)

FIELD_OF_EXTENSION = {
    **dict.fromkeys(
        ("png", "jpg", "jpeg", "gif", "bmp", "tif", "tiff", "ico", "jp2", "webp", "avif", "heic"), "images"
    ),
    **dict.fromkeys(("wav", "mp3", "flac", "ogg", "aac", "m4a", "m4b", "aiff", "aifc", "rm"), "audios"),
    **dict.fromkeys(("mp4", "mov", "mkv", "webm", "avi", "flv", "mts", "m4s", "ts", "3gp"), "videos"),
}
# Formats no bundled decoder reads: a 415 whose message names them.
EXPECTED_UNSUPPORTED = {
    "audio/mid_midi__sample.mid": "MIDI",
    "image/jxl__fixture.jxl": "JPEG XL",
    "image/bmp_embedded_jpeg__rgb24jpeg.bmp": "BMP pixel depth",  # BMP wrapping a JPEG stream
}
# broken/ files whose bytes are a valid file of the field's kind as far as the decoders can tell.
VALID_DESPITE_FOLDER = {
    "broken/gif_decompression_bomb_extents__decompression_bomb_extents.gif": "only frame 1 is decoded; it is sound",
    "broken/ico_bad_image_length__Bad_smile-incorrect-image-length.ico": "Pillow reads the image despite the length",
    "broken/jpeg_exif_typeerror__exif_typeerror.jpg": "the picture is intact; the EXIF fields are only mistyped",
    "broken/jpeg_invalid_exif__invalid-exif.jpg": "the picture is intact; Pillow skips the broken EXIF",
    "broken/m4a_named__wrong_extension.aac": "a valid M4A with the wrong name",
    "broken/mp3_bad_xing__bad-xing.mp3": "valid MPEG audio frames behind a bad Xing header",
    "broken/mp3_id3_bad_offset__fixture-bad-offset.mp3": "valid MPEG audio frames behind a bad ID3 size",
    "broken/ogg_corrupt_metadata__corrupt_metadata.ogg": "valid Vorbis audio with a corrupt comment",
    "broken/ogg_data_after_eos__data_after_eos.ogg": "valid Vorbis audio; the junk after EOS is ignored",
    "broken/png_truncated_51B__png-truncated.png": "its 1x1 pixel data is complete",
    "broken/polyglot_mp3_jpeg__jpgmp3.mp3": "FFmpeg reads it as the MP3 it also is",
    "broken/tiff_fuzz_crash__crash-0da013a13571cc8eb457a39fee8db18f8a3c7127.tif": "libtiff decodes it",
    "broken/wav_adpcm_no_byterate__adpcm_no_byterate.wav": "valid ADPCM; only the byte-rate field is zero",
    "broken/avif_10bit_duplicate_ipma__ipma-duplicate-item_id.avif": "FFmpeg decodes its primary image",
    "broken/rm_realmedia_latin1__firstrun.rm": "valid RealMedia audio; its Latin-1 metadata is ignored",
}


def field_for(path: str, kind: str) -> str:
    if kind in ("image", "audio", "video"):
        return kind + "s"
    extension = path.rsplit("__", 1)[-1].rsplit(".", 1)[-1].lower()
    return FIELD_OF_EXTENSION[extension]


def test_every_corpus_file_decodes_or_gets_a_clear_4xx(tiny_client, capsys):
    rows = list(csv.DictReader((CORPUS / "MANIFEST.tsv").open(encoding="utf-8"), delimiter="\t"))
    outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    problems = []
    for row in rows:
        path, folder = row["path"], row["path"].split("/")[0]
        field = field_for(path, row["kind"])
        response = tiny_client.post(
            "/multimodal",
            data={"max_new_tokens": "2"},
            files=[(field, (path.rsplit("/", 1)[-1], (CORPUS / path).read_bytes()))],
        )
        body = response.json()
        status = response.status_code
        outcomes[folder][status] += 1
        if status >= 500:
            problems.append(f"{path}: {status} {body}")
        elif folder != "broken" and status != 200:
            expected = EXPECTED_UNSUPPORTED.get(path)
            if not (status == 415 and expected and expected in body["detail"]):
                problems.append(f"{path} in {field}: {status} {body['detail']}")
        elif folder == "broken" and status == 200 and path not in VALID_DESPITE_FOLDER and not body["warnings"]:
            problems.append(f"{path}: 200 without saying what was recovered")
        if status >= 400:
            assert body["detail"].startswith(f"{field}[0]"), f"{path}: the error does not name the file: {body}"
        assert tiny_client.get("/health").status_code == 200, f"server stopped serving after {path}"
    with capsys.disabled():
        print("\n\nmedia corpus outcomes by folder (HTTP status: files)")
        for folder in sorted(outcomes):
            counts = ", ".join(f"{status}: {n}" for status, n in sorted(outcomes[folder].items()))
            print(f"  {folder:<8} {sum(outcomes[folder].values()):>4} files  {counts}")
    assert not problems, "\n".join(problems)
    assert sum(sum(c.values()) for c in outcomes.values()) == len(rows) == 244
