"""GPU check: the tiny model in low-VRAM float16 (encoders on CPU, the rest on CUDA) against all-CPU float32.

    scripts/gpu_check.sh

Builds the tiny model, sends one image + audio + video request through the server code with
each placement, prints both answers' tokens, where they first differ (fp16 rounding on a random
model can flip a near-tie), the devices actually used, and the peak GPU memory.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fastapi.testclient import TestClient  # noqa: E402

import make_media  # noqa: E402
import tiny_model  # noqa: E402
from modeling_low_vram import OmniEngine  # noqa: E402
from multimodal_api import create_app  # noqa: E402
from settings import Settings  # noqa: E402


def run(model_dir: Path, files: list, **overrides) -> dict:
    settings = Settings(_env_file=None, model_path=str(model_dir), **overrides)
    engine = OmniEngine.load(settings)
    answers: list = []
    original = engine.generate

    def recording(request):
        answers.append(original(request))
        return answers[-1]

    engine.generate = recording
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with TestClient(create_app(settings, engine=engine)) as client:
        response = client.post("/multimodal", data={"text": "Describe all of it.", "max_new_tokens": "24"}, files=files)
        response.raise_for_status()
        health = client.get("/health").json()
    return {
        "body": response.json(),
        "ids": answers[0].completion_ids,
        "describe": engine.describe(),
        "memory": health["memory"],
    }


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU")
        return 2
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as folder:
        model_dir = tiny_model.build(Path(folder) / "tiny")
        files = [
            ("images", ("image.jpg", make_media.image_bytes("JPEG", (320, 240)), "image/jpeg")),
            ("audios", ("audio.mp3", make_media.audio_bytes("mp3", 2.0), "audio/mpeg")),
            ("videos", ("video.mp4", make_media.video_bytes(2.0), "video/mp4")),
        ]
        reference = run(model_dir, files, device_map="cpu", dtype="float32")
        low_vram = run(model_dir, files, device_map="low-vram", dtype="float16")
    for name, result in (("cpu float32", reference), ("low-vram float16", low_vram)):
        print(f"\n== {name}")
        print("placement:", result["describe"]["placement"], "devices:", result["describe"]["devices"])
        print("prompt tokens:", result["body"]["usage"]["prompt_tokens"], "inputs:", result["body"]["inputs"])
        print("completion ids:", result["ids"])
        print("timings_ms:", result["body"]["timings_ms"], "memory:", result["memory"])
    same_prompt = reference["body"]["usage"]["prompt_tokens"] == low_vram["body"]["usage"]["prompt_tokens"]
    first_difference = next((i for i, (a, b) in enumerate(zip(reference["ids"], low_vram["ids"])) if a != b), None)
    placement = low_vram["describe"]["placement"]
    layout_ok = placement["visual"] == placement["audio_tower"] == "cpu" and placement["language_model"].startswith(
        "cuda"
    )
    print(f"\nsame prompt length: {same_prompt}")
    print(f"encoders on CPU, language model on CUDA: {layout_ok}")
    print(
        "tokens identical"
        if first_difference is None
        else f"tokens agree for the first {first_difference} of {len(reference['ids'])} "
        "(fp16 rounding on random weights)"
    )
    print(f"peak GPU memory: {low_vram['memory'].get('gpu_peak_bytes', 0) / 2**20:.1f} MiB")
    return 0 if same_prompt and layout_ok else 1


if __name__ == "__main__":
    sys.exit(main())
