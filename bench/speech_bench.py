"""Streamed speech benchmark on the tiny model (CPU): chunked against whole token2wav, time to first
audio against the whole answer, and peak memory, each against a baseline measured in the same run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/speech_bench.py [--seconds 10] [--chunk-blocks 3]

1. Agreement: the same codes and the same noise per mel frame, synthesized whole and chunk by chunk
   (codes fed a few at a time, as the talker makes them): the largest sample difference (absolute and
   against the loudest sample) and the log-spectral distance in dB. The tiny model's random DiT mixes
   frames very little, so it is measured again with its attention and output layers scaled up (a DiT
   whose frames do depend on their neighbours), with the default context and with twice as much.
2. A ~`--seconds` s spoken answer (a talker whose end codes are switched off, so it speaks for
   MAX_SPEECH_SECONDS) in a fresh process per mode: non-streamed (thinker, talker, chunks collected
   into one waveform) and streamed (the same chunks sent as made): time to the first audio against the whole time, and
   the peak resident memory above the loaded model's while it runs.
The real-size talker and token2wav on a GPU are not measured here (no GPU): that figure is pending.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import tiny_model  # noqa: E402
from conftest import tiny_settings  # noqa: E402

from qwen_omni_server.core.types import GenerationRequest  # noqa: E402
from qwen_omni_server.local.engine import OmniEngine, memory_in_use  # noqa: E402
from qwen_omni_server.local.speech import Codec, Token2Wav  # noqa: E402

TEST_TOLERANCE = 1e-4  # tests/test_speech.py: of the loudest sample


def spectral_distance(a: np.ndarray, b: np.ndarray, n_fft: int = 1024, hop: int = 256) -> float:
    """Log-spectral distance in dB between two equal-length signals (RMS over bins, mean over frames)."""

    def spectrum(x: np.ndarray) -> np.ndarray:
        frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * np.hanning(n_fft)
        return np.abs(np.fft.rfft(frames, axis=1))

    floor = 1e-6 * max(np.abs(a).max(), np.abs(b).max(), 1e-30)
    sa, sb = (20 * np.log10(np.maximum(spectrum(x), floor)) for x in (a, b))
    return float(np.sqrt(((sa - sb) ** 2).mean(axis=1)).mean())


def compare(engine: OmniEngine, codes: list[int], chunk_blocks: int, context_scale: int = 1) -> dict[str, float]:
    synthesis = Token2Wav(engine.model, "Chelsie", seed=5)
    synthesis.look_back *= context_scale
    synthesis.look_ahead *= context_scale
    started = time.perf_counter()
    whole = synthesis.whole(codes)
    whole_s = time.perf_counter() - started
    pieces: list[np.ndarray] = []
    chunked = synthesis.chunked(chunk_blocks, pieces.append)
    started = time.perf_counter()
    for start in range(0, len(codes), 5):
        chunked.add(codes[start : start + 5])
    chunked.finish()
    chunked_s = time.perf_counter() - started
    streamed = np.concatenate(pieces)
    difference = np.abs(streamed - whole).max()
    frames = len(codes) * synthesis.repeats
    whole_mel, solved, chunks = synthesis.mel(codes, 0, frames), 0, []
    while solved < frames:  # the chunks' mel, as Chunked solves them
        end = min(solved + chunk_blocks * synthesis.block, frames)
        start = max(0, solved - synthesis.look_back)
        chunks.append(
            synthesis.mel(codes, start, min(frames, end + synthesis.look_ahead))[:, :, solved - start : end - start]
        )
        solved = end
    added = whole_mel - synthesis.noise(0, frames).permute(0, 2, 1)  # what the DiT made of the noise
    return {
        "mel_difference": float((torch.cat(chunks, dim=2) - whole_mel).norm() / added.norm()),
        "max_abs_difference": float(difference),
        "max_difference_of_peak": float(difference / np.abs(whole).max()),
        "spectral_distance_db": spectral_distance(streamed, whole),
        "whole_s": whole_s,
        "chunked_s": chunked_s,
    }


def agreement(model_dir: Path, seconds: float, chunk_blocks: int) -> None:
    engine = OmniEngine.load(tiny_settings(model_dir, enable_audio_output=True))
    codec = Codec.of(engine.model.config)
    speech = [c for c in range(codec.codebook) if codec.is_speech(c)]
    generator = torch.Generator().manual_seed(0)
    count = int(min(seconds, 4) * 50)  # 4 s: enough chunks, and four syntheses of it stay quick
    codes = [speech[i] for i in torch.randint(0, len(speech), (count,), generator=generator).tolist()]
    print(f"1. chunked ({chunk_blocks} blocks) vs whole token2wav, {count} codes ({count / 50:g} s), same noise")
    rows = [("tiny model as built", compare(engine, codes, chunk_blocks))]
    dit = engine.model.token2wav.code2wav_dit_model
    with torch.no_grad():  # a DiT whose frames depend on their neighbours: its matrices 18x larger
        for parameter in [*dit.transformer_blocks.parameters(), dit.proj_out.weight]:
            if parameter.dim() == 2:
                parameter.mul_(18)
    for scale in (1, 2, 4):
        rows.append((f"DiT scaled up (mixing), context {scale}x", compare(engine, codes, chunk_blocks, scale)))
    print(
        f"   {'case':36} {'max |diff|':>10} {'of peak':>8} {'LSD dB':>7} {'mel diff':>9} {'whole s':>7} {'chunked s':>9}"
    )
    for name, row in rows:
        print(
            f"   {name:36} {row['max_abs_difference']:10.3g} {row['max_difference_of_peak']:8.2g} "
            f"{row['spectral_distance_db']:7.3f} {row['mel_difference']:9.2g} {row['whole_s']:7.2f} "
            f"{row['chunked_s']:9.2f}"
        )
    print("   mel diff: |chunked mel - whole mel| / |whole mel - its noise| (what the DiT added)")
    print(f"   the test's tolerance: {TEST_TOLERANCE:g} of the loudest sample (tests/test_speech.py)")


def answer(model_dir: Path, seconds: float, chunk_blocks: int, streamed: bool) -> dict[str, float]:
    """One spoken answer of `seconds` (run in its own process): timings and peak memory."""
    engine = OmniEngine.load(
        tiny_settings(model_dir, enable_audio_output=True, max_speech_seconds=seconds, speech_chunk_blocks=chunk_blocks)
    )
    with torch.no_grad():  # the talker's end codes switched off: it speaks for MAX_SPEECH_SECONDS
        head = engine.model.talker.codec_head.weight
        head.mul_(1000)
        head[list(Codec.of(engine.model.config).ends)] = 0
    request = GenerationRequest("Tell me a story.", None, max_new_tokens=16, return_audio=True, seed=3)
    engine.generate(GenerationRequest("Hi", None, max_new_tokens=2))  # warm up the thinker
    baseline = memory_in_use()["rss_bytes"]
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], memory_in_use()["rss_bytes"])
            time.sleep(0.002)

    first: list[float] = []
    samples = [0]

    def on_audio(audio: np.ndarray) -> None:
        first.append(time.perf_counter())
        samples[0] += len(audio)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    result = engine.generate(GenerationRequest(**{**request.__dict__, "on_audio": on_audio if streamed else None}))
    finished = time.perf_counter()
    done.set()
    sampler.join()
    audio_samples = samples[0] if streamed else len(result.audio)
    return {
        "first_audio_s": (first[0] if first else finished) - started,
        "whole_s": finished - started,
        "audio_s": audio_samples / 24000,
        "peak_rss_mib": (peak[0] - baseline) / 2**20,
    }


def timing(model_dir: Path, seconds: float, chunk_blocks: int) -> None:
    runs = {}
    for mode in ("whole", "streamed"):
        output = subprocess.run(
            [sys.executable, __file__, "--one", mode, "--model", str(model_dir), "--seconds", str(seconds)]
            + ["--chunk-blocks", str(chunk_blocks)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        runs[mode] = json.loads(output.stdout.strip().splitlines()[-1])
    whole, streamed = runs["whole"], runs["streamed"]
    print(f"2. a {whole['audio_s']:.1f} s spoken answer on the tiny model (CPU, 1 thread), each in a fresh process")
    print(f"   non-streamed: answer complete after {whole['whole_s']:.2f} s, peak +{whole['peak_rss_mib']:.1f} MiB")
    print(
        f"   streamed:     first audio after {streamed['first_audio_s']:.2f} s, complete after "
        f"{streamed['whole_s']:.2f} s, peak +{streamed['peak_rss_mib']:.1f} MiB, {streamed['audio_s']:.1f} s of audio"
    )
    print(
        f"   first audio / whole non-streamed answer: {streamed['first_audio_s'] / whole['whole_s']:.1%} "
        f"(goal <= 25%); streamed peak / whole-synthesis peak: "
        f"{streamed['peak_rss_mib'] / max(whole['peak_rss_mib'], 1e-9):.2f} (goal <= 1)"
    )
    print("   real-size talker and token2wav on a GPU: pending (no GPU here)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the spoken answer")
    parser.add_argument("--chunk-blocks", type=int, default=3, help="SPEECH_CHUNK_BLOCKS")
    parser.add_argument("--one", choices=["whole", "streamed"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(answer(Path(args.model), args.seconds, args.chunk_blocks, args.one == "streamed")))
        return
    with tempfile.TemporaryDirectory() as folder:
        model_dir = tiny_model.build(Path(folder))
        agreement(model_dir, args.seconds, args.chunk_blocks)
        timing(model_dir, args.seconds, args.chunk_blocks)


if __name__ == "__main__":
    main()
