"""Chunked against whole token2wav at real size: how far the speech every answer is made with (`Chunked`)
is from solving the whole answer at once (`Token2Wav.whole`, the reference).

    OMP_NUM_THREADS=1 .venv/bin/python bench/chunked_speech_bench.py [--seconds 2] [--configs 3x1 3x2]
        [--scale 4] [--out bench/out/chunked_speech.json]

The 3B checkpoint's token2wav (DiT: 22 layers, hidden 1024; BigVGAN: 1536 channels), built from
configs/qwen2.5-omni-3b.config.json with the library's random init (SnakeBeta alpha/beta 0), in float32 as
the server runs it. At that init (std 0.02) attention adds about 2% to the residual stream and a block's
output moves by about 1% of a change in the next block: frames barely mix and chunking looks exact. So
every matrix of the DiT's transformer blocks is scaled by --scale (4: attention adds about a third to the
stream, as residual branches of a trained transformer do, and a block moves by about 20% of a change in
its neighbour); that figure is measured and printed as "mixing".

Why chunked differs at all: a chunk is solved with the context one pass of the DiT reads (one block per
look-back / look-ahead layer), but the ODE evaluates the DiT 36 times, and the context frames, solved
without their own outer context, feed back into the kept ones at each evaluation. A config "CxK" is chunks
of C blocks (SPEECH_CHUNK_BLOCKS) with K times that context; "window" is the most mel frames the DiT solves
at once. The row "seed" is whole synthesis with another seed: how far apart two answers to the same codes
are when no seed is sent. Differences are relative: the largest and the RMS difference over the
reference's largest and RMS value, for the mel and the waveform; "dB" is the waveform's RMS difference
(16-bit PCM's own rounding is about -98 dB below a full-scale sine); "16-bit steps" is the largest
waveform difference, were the answer normalized to full scale, in steps of 16-bit PCM.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transformers import Qwen2_5OmniConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniSnakeBeta,
    Qwen2_5OmniToken2WavModel,
)

from qwen_omni_server.local.speech import Token2Wav

CONFIG = ROOT / "configs" / "qwen2.5-omni-3b.config.json"
CODES_PER_SECOND = 50


class Synthesized(NamedTuple):
    mel: torch.Tensor
    wave: np.ndarray
    seconds: float


def real_size_model(scale: float) -> SimpleNamespace:
    """What Token2Wav reads of a loaded model: the 3B token2wav with random weights, one random voice."""
    config = Qwen2_5OmniConfig.from_pretrained(CONFIG).token2wav_config
    with torch.device("meta"):
        token2wav = Qwen2_5OmniToken2WavModel._from_config(config, attn_implementation="sdpa")
    token2wav.to_empty(device="cpu")
    token2wav.float().eval()  # eval: the DiT's dropout (0.1) off, as from_pretrained leaves it
    torch.manual_seed(0)
    token2wav.init_weights()
    with torch.no_grad():
        for module in token2wav.modules():
            if isinstance(module, Qwen2_5OmniSnakeBeta):  # left uninitialised by init_weights
                module.alpha.zero_()
                module.beta.zero_()
        for parameter in token2wav.code2wav_dit_model.transformer_blocks.parameters():
            if parameter.dim() == 2:
                parameter.mul_(scale)
    dit = config.dit_config
    generator = torch.Generator().manual_seed(1)
    voice = {
        "bos_token": 0,
        "cond": torch.randn(dit.enc_emb_dim, generator=generator),
        "ref_mel": torch.randn(1, 300, dit.mel_dim, generator=generator),
    }
    anchor = torch.nn.Embedding(1, 1)  # Token2Wav takes its device from the thinker's embeddings
    return SimpleNamespace(
        token2wav=token2wav, speaker_map={"random": voice}, thinker=SimpleNamespace(get_input_embeddings=lambda: anchor)
    )


@torch.inference_mode()
def mixing(synthesis: Token2Wav) -> float:
    """How much a block's velocity moves when the next block's input changes, against that block's own move."""
    frames, block = 4 * synthesis.block, synthesis.block
    state = synthesis.noise(0, frames)
    moved = state.clone()
    moved[:, 2 * block : 3 * block] += torch.randn(
        1, block, synthesis.mel_dim, generator=torch.Generator().manual_seed(2)
    )
    code = torch.zeros(1, frames // synthesis.repeats, dtype=torch.long)

    def velocity(hidden: torch.Tensor) -> torch.Tensor:
        return synthesis.dit(
            hidden_states=hidden,
            quantized_code=code,
            speaker_embedding=synthesis.condition.unsqueeze(1).repeat(1, frames, 1),
            condition_vector=synthesis.reference_mel,
            time_step=torch.tensor(0.5),
            apply_cfg=True,
        )

    change = velocity(moved) - velocity(state)
    return float(change[:, block : 2 * block].norm() / change[:, 2 * block : 3 * block].norm())


def chunked(synthesis: Token2Wav, codes: list[int], chunk_blocks: int) -> tuple[torch.Tensor, np.ndarray]:
    """The answer as the server makes it: its mel (the frames each chunk keeps) and its samples."""
    windows: list[tuple[int, torch.Tensor]] = []
    solve = synthesis.mel

    def recorded(codes: list[int], start: int, end: int) -> torch.Tensor:
        windows.append((start, solve(codes, start, end)))
        return windows[-1][1]

    synthesis.mel = recorded  # type: ignore[method-assign]
    pieces: list[np.ndarray] = []
    run = synthesis.chunked(chunk_blocks, lambda audio: pieces.append(audio.copy()))
    run.add(codes)
    run.finish()
    synthesis.mel = solve  # type: ignore[method-assign]
    size = chunk_blocks * synthesis.block
    kept = [mel[:, :, i * size - start : (i + 1) * size - start] for i, (start, mel) in enumerate(windows)]
    return torch.cat(kept, dim=2), np.concatenate(pieces)


def difference(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """The largest and the RMS difference, each against the reference's own."""
    delta = other - reference
    largest = np.abs(delta).max() / np.abs(reference).max()
    return float(largest), float(np.sqrt((delta**2).mean() / (reference**2).mean()))


def row(name: str, window: int, mel: torch.Tensor, wave: np.ndarray, reference: Synthesized, took: float) -> dict:
    mel_max, mel_rms = difference(reference.mel.numpy(), mel.numpy())
    wave_max, wave_rms = difference(reference.wave, wave)
    return {
        "config": name,
        "window_frames": window,
        "mel_max": mel_max,
        "mel_rms": mel_rms,
        "wave_max": wave_max,
        "wave_rms": wave_rms,
        "wave_rms_db": 20 * np.log10(max(wave_rms, 1e-30)),
        "pcm16_steps": wave_max * 32767,
        "seconds": took,
    }


def whole(synthesis: Token2Wav, codes: list[int]) -> Synthesized:
    """The reference: every mel frame solved at once, then vocoded (`Token2Wav.whole`, keeping the mel)."""
    started = time.perf_counter()
    with torch.inference_mode():
        mel = synthesis.mel(codes, 0, len(codes) * synthesis.repeats)
    return Synthesized(mel, synthesis.vocode(mel), time.perf_counter() - started)


def compare(synthesis: Token2Wav, codes: list[int], config: str, reference: Synthesized) -> dict:
    """Chunked synthesis in config "CxK" against the reference."""
    chunk_blocks, context = (int(part) for part in config.split("x"))
    look_back, look_ahead = synthesis.look_back, synthesis.look_ahead
    synthesis.look_back, synthesis.look_ahead = look_back * context, look_ahead * context
    started = time.perf_counter()
    mel, wave = chunked(synthesis, codes, chunk_blocks)
    took = time.perf_counter() - started
    window = chunk_blocks * synthesis.block + synthesis.look_back + synthesis.look_ahead
    synthesis.look_back, synthesis.look_ahead = look_back, look_ahead
    return row(config, window, mel, wave, reference, took)


def table(result: dict) -> str:
    title = (
        f"token2wav 3B size, random weights x{result['scale']:g} (mixing {result['mixing']:.2f}), "
        f"{result['speech_seconds']:g} s of speech ({result['codes']} codes), whole: {result['whole_seconds']:.0f} s"
    )
    names = ("config", "window", "mel max", "mel rms", "wave max", "wave rms", "dB", "16-bit steps", "time s")
    lines = [title, " ".join(f"{name:>9}" for name in names)]
    for row in result["rows"]:
        cells = (
            f"{row['config']:>9}",
            f"{row['window_frames']:>9}",
            *(f"{row[key]:9.2e}" for key in ("mel_max", "mel_rms", "wave_max", "wave_rms")),
            f"{row['wave_rms_db']:9.1f}",
            f"{row['pcm16_steps']:9.3g}",
            f"{row['seconds']:9.0f}",
        )
        lines.append(" ".join(cells))
    lines.append(f"total {result['total_seconds']:.0f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of the speech")
    parser.add_argument("--configs", nargs="+", default=["3x1", "3x2"], help="CxK: chunks of C blocks, K x context")
    parser.add_argument("--scale", type=float, default=4.0, help="factor on the DiT transformer blocks' matrices")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    model = real_size_model(args.scale)
    synthesis = Token2Wav(model, "random", seed=7)
    count = int(args.seconds * CODES_PER_SECOND)
    codes = torch.randint(0, 8192, (count,), generator=torch.Generator().manual_seed(3)).tolist()
    result: dict = {"scale": args.scale, "mixing": mixing(synthesis), "speech_seconds": args.seconds, "codes": count}
    reference = whole(synthesis, codes)
    result["whole_seconds"] = reference.seconds
    rows = [compare(synthesis, codes, config, reference) for config in args.configs]
    other = whole(Token2Wav(model, "random", seed=8), codes)  # what any answer without a seed differs by
    rows.append(row("seed", count * synthesis.repeats, other.mel, other.wave, reference, other.seconds))
    result["rows"] = rows
    result["total_seconds"] = time.perf_counter() - started
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
