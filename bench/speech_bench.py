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
3. `--part pipeline` (issue 24): pipelined speech (SPEECH_PIPELINE=true: the talker speaks while the thinker
   writes) against sequential (false: the talker starts once the text is done). One engine per mode, both loaded
   in the same run, each warmed up with a short spoken answer; then each length in both modes, alternating
   (--tiny-repeats 3 and --repeats 1 runs, median): time to the first audio (the request's first `on_audio`
   call, from the call of `engine.generate`) and the whole answer's time, for answers of exactly 20, 100 and 400
   thinker tokens (max_new_tokens=N, and a hook on the thinker's lm_head lets it write plain-text tokens only,
   never a stop token), seed 2, temperature 0. The talker never ends (tests/conftest.py's
   `speaker_without_end`), so an answer's speech is its bound: 2 s + SPEECH_SECONDS_PER_TOKEN (0.02 s) per
   token, at most MAX_SPEECH_SECONDS. Two models: the tiny one (bound 30 s: 2.4, 4 and 10 s of speech), and the
   3B widths with few layers: configs/'s 3B config with 2 thinker text layers (hidden size 2048, the
   151,936-token embedding and lm_head kept), 2 talker layers, 2 DiT layers (one block of context ahead, two
   behind, as the released DiT), encoders of 2; random weights, built once into --checkpoint; thinker and talker
   in bfloat16, token2wav in float32 (as the server runs it); its bound 1.44 s (72 codes: two chunks of 3 blocks), since each chunk of its DiT takes seconds here.
   Printed as a markdown table with the goals (pipelined first audio at 400 tokens <= 1.1x at 100 and <= 25 % of
   sequential at 400; whole time pipelined <= 1.1x sequential) and whether both modes made the same audio
   (np.array_equal), in wall-clock seconds and again in the process's CPU seconds (all threads: the work done,
   which other load on the machine changes less); the rows go to --out.

    OMP_NUM_THREADS=1 .venv/bin/python bench/speech_bench.py --part pipeline [--models tiny,real] \
        [--lengths 20,100,400] [--repeats 1] [--chunk-blocks 3] [--out bench/out/speech_pipeline.json]

On a GPU at real size, scripts/gpu_check.sh measures the 3B's first audio, pipelined and not (its `first_audio` rows).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------- 3. pipelined against sequential speech

LENGTHS = (20, 100, 400)
REAL_LAYERS = {"thinker": 2, "talker": 2, "dit": 2}  # the 3B widths with these few layers (--real-layers)


def few_layer_config(out_dir: Path, layers: dict[str, int]) -> Path:
    """configs/'s 3B config with few layers: the thinker's text model (hidden size 2048, 151,936-token embedding
    and lm_head kept), the talker and token2wav's DiT as `layers` say; the encoders (unused by a text
    request but run by the warm-up) with 2. Written to `out_dir`/config.json."""
    config = json.loads((ROOT / "configs" / "qwen2.5-omni-3b.config.json").read_text())
    thinker, talker = config["thinker_config"], config["talker_config"]
    dit = config["token2wav_config"]["dit_config"]
    for part, count in ((thinker["text_config"], layers["thinker"]), (talker, layers["talker"])):
        part["num_hidden_layers"] = count
        part["layer_types"] = part["layer_types"][:count]
        part["max_window_layers"] = min(part["max_window_layers"], count)
    thinker["audio_config"]["encoder_layers"] = 2
    thinker["vision_config"].update(depth=2, fullatt_block_indexes=[1])
    count = layers["dit"]  # the same context as the released DiT: one block ahead, two behind
    dit.update(num_hidden_layers=count, look_ahead_layers=[count // 2], look_backward_layers=[0, count - 1])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    return out_dir / "config.json"


def real_size_checkpoint(folder: Path, layers: dict[str, int]) -> Path:
    """The few-layer 3B checkpoint (random weights, bf16 on disk), built once into `folder` and reused."""
    name = "-".join(f"{part}{count}" for part, count in layers.items())
    model_dir = folder / f"3b-{name}"
    if (model_dir / "spk_dict.pt").exists():
        return model_dir
    started = time.perf_counter()
    config_file = few_layer_config(folder / f"config-{name}", layers)
    tiny_model.build_real_size(config_file, model_dir, dtype=torch.bfloat16)
    print(f"   built {model_dir} in {time.perf_counter() - started:.0f} s", flush=True)
    return model_dir


def plain_tokens(tokenizer: Any) -> list[int]:
    """The ids that decode to printable ASCII on their own: what an answer of exactly N tokens is written in."""
    ids = []
    for token in range(len(tokenizer)):
        text = tokenizer.decode([token])
        if text and text.isascii() and text.isprintable() and token not in tokenizer.all_special_ids:
            ids.append(token)
    return ids


def never_ending(engine: OmniEngine) -> None:
    """A thinker that writes until max_new_tokens and a talker that speaks until its bound.

    The thinker may only write tokens of plain text (a forward hook on its lm_head adds -inf to every other
    logit: the stop tokens `engine._stop_ids`, the special tokens, and the random checkpoint's ids past the
    tokenizer, which decode to nothing and so would never count as text sure to be spoken). The talker:
    tests/conftest.py's `speaker_without_end` (end codes' output weights zeroed, the others scaled up)."""
    thinker = engine.model.thinker
    allowed = torch.tensor(plain_tokens(engine.processor.tokenizer))
    assert not set(allowed.tolist()) & set(engine._stop_ids)
    bias = torch.full((thinker.lm_head.out_features,), float("-inf"))
    bias[allowed] = 0

    def plain_only(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        return output + bias.to(output.device, output.dtype)

    thinker.lm_head.register_forward_hook(plain_only)
    with torch.no_grad():
        head = engine.model.talker.codec_head.weight
        head.mul_(1000)
        head[list(Codec.of(engine.model.config).ends)] = 0


def timed_answer(engine: OmniEngine, tokens: int, seed: int) -> dict[str, Any]:
    """One spoken answer of exactly `tokens` thinker tokens, streamed: the seconds to the first audio and to the
    end from the call of `engine.generate`, in wall-clock time (`_s`) and in the process's CPU time (`_cpu`: all
    its threads; the thinker and the talker never compute at once, so it is the work done, whatever else
    the machine runs), and the audio."""
    pieces: list[np.ndarray] = []
    first: list[tuple[float, float]] = []

    def on_audio(audio: np.ndarray) -> None:
        if not first:
            first.append((time.perf_counter(), time.process_time()))
        pieces.append(np.array(audio, copy=True))

    request = GenerationRequest(
        "Tell me a long story.",
        None,
        max_new_tokens=tokens,
        return_audio=True,
        seed=seed,
        temperature=0.0,
        on_audio=on_audio,
    )
    started, started_cpu = time.perf_counter(), time.process_time()
    result = engine.generate(request)
    finished, finished_cpu = time.perf_counter(), time.process_time()
    assert result.completion_tokens == tokens and result.finish_reason == "length", result
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    first_wall, first_cpu = first[0] if first else (finished, finished_cpu)
    return {
        "first_audio_s": first_wall - started,
        "whole_s": finished - started,
        "first_audio_cpu": first_cpu - started_cpu,
        "whole_cpu": finished_cpu - started_cpu,
        "audio": audio,
        "completion_ids": result.completion_ids,
    }


def pipeline_engines(
    model_dir: Path, dtype: str, max_speech_seconds: float, args: argparse.Namespace
) -> dict[bool, OmniEngine]:
    """One engine per mode (SPEECH_PIPELINE false and true), each warmed up with one short spoken answer."""
    engines = {}
    for pipelined in (False, True):
        settings = tiny_settings(
            model_dir,
            enable_audio_output=True,
            speech_pipeline=pipelined,
            dtype=dtype,
            max_speech_seconds=max_speech_seconds,
            speech_seconds_per_token=args.seconds_per_token,
            speech_chunk_blocks=args.chunk_blocks,
        )
        engine = OmniEngine.load(settings)
        never_ending(engine)
        engine.settings = settings.model_copy(update={"max_speech_seconds": 1.0})  # warm-up: one short answer
        timed_answer(engine, 4, args.seed)
        engine.settings = settings
        engines[pipelined] = engine
    return engines


MEASURES = ("first_audio_s", "whole_s", "first_audio_cpu", "whole_cpu")
MODES = (("sequential", False), ("pipelined", True))


def pipeline_rows(
    name: str, engines: dict[bool, OmniEngine], repeats: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Each length `repeats` times in both modes, alternating (the mode that goes first alternates too)."""
    rows = []
    for tokens in args.lengths:
        runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
        for repeat in range(repeats):
            for pipelined in (False, True) if repeat % 2 == 0 else (True, False):
                runs[pipelined].append(timed_answer(engines[pipelined], tokens, args.seed))
        reference = runs[False][0]
        everything = [run for mode_runs in runs.values() for run in mode_runs]
        row = {
            "model": name,
            "tokens": tokens,
            "repeats": repeats,
            **{
                f"{measure}_{mode}": float(np.median([run[measure] for run in runs[key]]))
                for measure in MEASURES
                for mode, key in MODES
            },
            "audio_s": len(reference["audio"]) / 24000,
            "same_text": all(run["completion_ids"] == reference["completion_ids"] for run in everything),
            "same_audio": all(np.array_equal(run["audio"], reference["audio"]) for run in everything),
            "runs": {
                f"{measure}_{mode}": [round(run[measure], 3) for run in runs[key]]
                for measure in MEASURES
                for mode, key in MODES
            },
        }
        rows.append(row)
        print(f"   {name} {tokens} tokens: {json.dumps(row)}", flush=True)
    return rows


def pipeline_table(rows: list[dict[str, Any]], unit: str) -> None:
    """The table in wall-clock seconds (`unit` "s") or in the process's CPU seconds ("cpu"), and the goals."""
    print(
        f"\n| model | tokens | speech (s) | first audio sequential ({unit}) | first audio pipelined ({unit}) | ratio | "
        f"whole sequential ({unit}) | whole pipelined ({unit}) | ratio | same audio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        first, whole = (
            (row[f"first_audio_{unit}_{mode}"] for mode, _ in MODES),
            (row[f"whole_{unit}_{mode}"] for mode, _ in MODES),
        )
        first_sequential, first_pipelined = first
        whole_sequential, whole_pipelined = whole
        print(
            f"| {row['model']} | {row['tokens']} | {row['audio_s']:.2f} | {first_sequential:.3f} | "
            f"{first_pipelined:.3f} | {first_pipelined / first_sequential:.2f} | {whole_sequential:.2f} | "
            f"{whole_pipelined:.2f} | {whole_pipelined / whole_sequential:.2f} | "
            f"{'yes' if row['same_audio'] and row['same_text'] else 'NO'} |"
        )
    print()
    for model in dict.fromkeys(row["model"] for row in rows):
        by_length = {row["tokens"]: row for row in rows if row["model"] == model}
        if 100 in by_length and 400 in by_length:
            long, medium = by_length[400], by_length[100]
            print(
                f"- {model}: pipelined first audio at 400 / at 100 tokens: "
                f"{long[f'first_audio_{unit}_pipelined'] / medium[f'first_audio_{unit}_pipelined']:.2f} "
                f"(goal <= 1.1); pipelined / sequential first audio at 400: "
                f"{long[f'first_audio_{unit}_pipelined'] / long[f'first_audio_{unit}_sequential']:.2f} (goal <= 0.25)"
            )
        worst = max(row[f"whole_{unit}_pipelined"] / row[f"whole_{unit}_sequential"] for row in by_length.values())
        print(f"- {model}: whole time pipelined / sequential, largest over the lengths: {worst:.2f} (goal <= 1.1)")


def pipeline(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    print(
        f"3. pipelined (SPEECH_PIPELINE=true) against sequential speech, answers of {args.lengths} tokens, "
        f"{args.tiny_repeats} (tiny) and {args.repeats} (3B widths) run(s) each (median), CPU, "
        f"{torch.get_num_threads()} thread(s)"
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        if "tiny" in args.models:
            engines = pipeline_engines(
                tiny_model.build(Path(folder) / "tiny"), "float32", args.max_speech_seconds, args
            )
            rows += pipeline_rows("tiny", engines, args.tiny_repeats, args)
            del engines
            gc.collect()
        if "real" in args.models:
            layers = dict(zip(REAL_LAYERS, args.real_layers, strict=True))
            model_dir = real_size_checkpoint(Path(args.checkpoint), layers)
            engines = pipeline_engines(model_dir, args.real_dtype, args.real_max_speech_seconds, args)
            name = f"3B widths, {layers['thinker']}/{layers['talker']}/{layers['dit']} layers, {args.real_dtype}"
            rows += pipeline_rows(name, engines, args.repeats, args)
            del engines
            gc.collect()
    print("\n   wall-clock seconds (medians; other work on the machine makes them noisy):")
    pipeline_table(rows, "s")
    print("\n   the process's CPU seconds, all threads (the work done, less sensitive to other load):")
    pipeline_table(rows, "cpu")
    seconds = time.perf_counter() - started
    print(f"\n   part 3 took {seconds:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        settings = {
            k: getattr(args, k)
            for k in (
                "max_speech_seconds",
                "real_max_speech_seconds",
                "seconds_per_token",
                "chunk_blocks",
                "seed",
                "repeats",
                "tiny_repeats",
                "real_layers",
                "real_dtype",
            )
        }
        Path(args.out).write_text(
            json.dumps(
                {"settings": settings, "threads": torch.get_num_threads(), "seconds": seconds, "rows": rows}, indent=1
            )
            + "\n"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the spoken answer")
    parser.add_argument("--chunk-blocks", type=int, default=3, help="SPEECH_CHUNK_BLOCKS")
    parser.add_argument(
        "--part", choices=["streamed", "pipeline", "all"], default="streamed", help="1-2 (streamed), 3, or all"
    )
    parser.add_argument("--models", type=lambda v: v.split(","), default=["tiny", "real"], help="part 3: tiny,real")
    parser.add_argument(
        "--lengths", type=lambda v: [int(n) for n in v.split(",")], default=list(LENGTHS), help="part 3: tokens"
    )
    parser.add_argument("--repeats", type=int, default=1, help="part 3: 3B runs per length and mode (median)")
    parser.add_argument("--tiny-repeats", type=int, default=3, help="part 3: tiny runs per length and mode")
    parser.add_argument("--seed", type=int, default=2, help="part 3: the requests' seed")
    parser.add_argument("--max-speech-seconds", type=float, default=30.0, help="part 3: MAX_SPEECH_SECONDS")
    parser.add_argument(
        "--real-max-speech-seconds", type=float, default=1.44, help="part 3: MAX_SPEECH_SECONDS of the 3B widths"
    )
    parser.add_argument("--seconds-per-token", type=float, default=0.02, help="part 3: SPEECH_SECONDS_PER_TOKEN")
    parser.add_argument(
        "--real-layers",
        type=lambda v: [int(n) for n in v.split(",")],
        default=list(REAL_LAYERS.values()),
        help="part 3: thinker,talker,DiT layers of the 3B widths",
    )
    parser.add_argument("--real-dtype", choices=["bfloat16", "float32"], default="bfloat16", help="part 3")
    parser.add_argument(
        "--checkpoint", default=str(Path(tempfile.gettempdir()) / "speech_bench_3b"), help="part 3: built once"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "speech_pipeline.json"), help="part 3's rows")
    parser.add_argument("--one", choices=["whole", "streamed"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(answer(Path(args.model), args.seconds, args.chunk_blocks, args.one == "streamed")))
        return
    if args.part in ("streamed", "all"):
        with tempfile.TemporaryDirectory() as folder:
            model_dir = tiny_model.build(Path(folder))
            agreement(model_dir, args.seconds, args.chunk_blocks)
            timing(model_dir, args.seconds, args.chunk_blocks)
    if args.part in ("pipeline", "all"):
        pipeline(args)


if __name__ == "__main__":
    main()
