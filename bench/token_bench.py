"""Token budgets benchmark: our defaults against qwen-omni-utils' defaults, in the same run, on the tiny model.

    .venv/bin/python bench/token_bench.py        # about a minute on 2 cores

For a 12-megapixel phone photo (4032x3024 JPEG, made here: the media corpus holds none; its
largest picture, a 3307x4677 fax TIFF, is measured too) and a 60 s 720p clip it makes, it prints
the visual tokens, the preprocessing time (decoding, resizing, the processor) and the vision
encoder's time, at the server's default budgets and at qwen-omni-utils' own defaults (images up
to 16,384 tokens; video frames up to 768 tokens each within 90% of a 128k context), with ratios.
The encoder is the tiny model's (2 layers, width 32): its times show the scaling, not a real
model's seconds, which grow the same way with the token count.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import tiny_model  # noqa: E402
from media_bench import OUT, make_clip  # noqa: E402

from qwen_omni_server.core import media  # noqa: E402
from qwen_omni_server.core.settings import Settings  # noqa: E402
from qwen_omni_server.core.types import GenerationRequest, VideoInput  # noqa: E402
from qwen_omni_server.local.engine import OmniEngine  # noqa: E402

CORPUS_FAX = ROOT.parent / "shared" / "media-corpus" / "image" / "tiff_g4_fax_multipage_3307x4677__g4-multi.tiff"
# qwen-omni-utils 0.0.9 defaults (vision_process.py), as settings of this server.
QWEN_OMNI_UTILS_DEFAULTS = {
    "image_min_pixels": 4 * 28 * 28,
    "image_max_pixels": 16384 * 28 * 28,
    "max_pixels_ceiling": 16384 * 28 * 28,
    "video_fps": 2.0,
    "video_max_frames": 768,
    "video_min_pixels": 128 * 28 * 28,
    "video_max_pixels": 768 * 28 * 28,
    "video_total_pixels": int(128000 * 28 * 28 * 0.9),
    "max_context_tokens": 131072,
}


def phone_photo() -> Path:
    path = OUT / "photo_12mp.jpg"
    if not path.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        gradient = Image.linear_gradient("L").resize((4032, 3024))
        Image.merge(
            "RGB", (gradient, gradient.transpose(Image.Transpose.ROTATE_90).resize((4032, 3024)), gradient)
        ).save(path, quality=90)
    return path


def measure(engine: OmniEngine, settings: Settings, kind: str, path: Path) -> dict:
    """Decode and preprocess like the server, then run the vision encoder on the result."""
    started = time.perf_counter()
    if kind == "image":
        image = media.load_image(str(path), max_pixels=10**9).image
        request = GenerationRequest("Describe.", None, images=[image])
    else:
        video = media.load_video(
            str(path),
            fps=settings.video_fps,
            max_frames=settings.video_max_frames,
            max_seconds=3600,
            frame_max_pixels=settings.video_max_pixels,
            with_audio=False,
        )
        request = GenerationRequest("Describe.", None, videos=[VideoInput(video.frames, video.fps)])
    prompt = engine.prompts.build(request)
    inputs = engine._on_device(prompt.inputs)
    prepared = time.perf_counter()
    with torch.inference_mode():
        if kind == "image":
            engine.model.thinker.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        else:
            engine.model.thinker.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    encoded = time.perf_counter()
    tokens = prompt.by_modality[kind]
    return {"tokens": tokens, "preprocess": prepared - started, "encode": encoded - prepared}


def main() -> None:
    torch.set_num_threads(1)
    clip = make_clip(OUT / "clip_60s_720p.mp4", 60)
    inputs = [("12 MP phone photo (4032x3024)", "image", phone_photo()), ("60 s 720p clip, as video", "video", clip)]
    if CORPUS_FAX.exists():
        inputs.insert(1, ("corpus fax TIFF (3307x4677)", "image", CORPUS_FAX))
    with tempfile.TemporaryDirectory() as folder:
        model_dir = tiny_model.build(Path(folder) / "tiny")
        ours = Settings(_env_file=None, model_path=str(model_dir), device_map="cpu")
        theirs = Settings(_env_file=None, model_path=str(model_dir), device_map="cpu", **QWEN_OMNI_UTILS_DEFAULTS)
        engines = {"ours": OmniEngine.load(ours), "qwen": OmniEngine.load(theirs)}
        settings = {"ours": ours, "qwen": theirs}
        print(f"{'input':<32} {'budget':<16} {'tokens':>7} {'preprocess':>11} {'encoder':>9}")
        for label, kind, path in inputs:
            results = {name: measure(engines[name], settings[name], kind, path) for name in ("qwen", "ours")}
            for name, result in results.items():
                budget = "qwen-omni-utils" if name == "qwen" else "server default"
                print(
                    f"{label:<32} {budget:<16} {result['tokens']:>7} {result['preprocess'] * 1000:>9.0f} ms "
                    f"{result['encode'] * 1000:>6.0f} ms"
                )
            q, o = results["qwen"], results["ours"]
            print(
                f"{'':<32} {'ratio':<16} {q['tokens'] / o['tokens']:>6.1f}x "
                f"{q['preprocess'] / o['preprocess']:>10.1f}x "
                f"{q['encode'] / o['encode']:>8.1f}x"
            )


if __name__ == "__main__":
    main()
