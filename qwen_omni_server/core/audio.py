"""Audio in and out: the two sample rates, WAV and PCM16 encoding, and the one resampler.

The model hears 16 kHz mono (Whisper's feature extractor) and speaks 24 kHz mono (token2wav). numpy and the
standard library only at import time (the web UI uses the encoders in its own environment); PyAV's
libswresample and libsndfile are imported where audio is resampled or read.
"""

from __future__ import annotations

import io
import wave
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import av

INPUT_SAMPLE_RATE = 16_000  # what Qwen2.5-Omni's audio encoder takes: float32 mono
SPEECH_SAMPLE_RATE = 24_000  # what token2wav makes: float32 mono


def pcm16(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] as raw 16-bit little-endian PCM (the format of streamed speech)."""
    return (np.clip(samples, -1.0, 1.0) * 32767).round().astype("<i2").tobytes()


def wav_of_pcm16(pcm: bytes, sample_rate: int = SPEECH_SAMPLE_RATE) -> bytes:
    """Raw 16-bit mono PCM as a WAV file."""
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(sample_rate)
        writer.writeframes(pcm)
    return out.getvalue()


def wav_bytes(samples: np.ndarray, sample_rate: int = SPEECH_SAMPLE_RATE) -> bytes:
    """A mono float waveform as a 16-bit PCM WAV file."""
    return wav_of_pcm16(pcm16(samples), sample_rate)


def float_wav_bytes(samples: np.ndarray, sample_rate: int = INPUT_SAMPLE_RATE) -> bytes:
    """A mono float waveform as a 32-bit float WAV file: exactly these samples, for a server that decodes again."""
    import soundfile

    out = io.BytesIO()
    soundfile.write(out, samples, sample_rate, format="WAV", subtype="FLOAT")
    return out.getvalue()


def read_wav(data: bytes, sample_rate: int = SPEECH_SAMPLE_RATE) -> np.ndarray:
    """A WAV file's sound as float32 mono at `sample_rate` (channels averaged, resampled when needed)."""
    import soundfile

    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return to_mono(samples.T, rate, sample_rate)


class Resampler:
    """Decoded audio frames to float32 mono at one rate.

    libswresample does the rate conversion (a windowed-sinc filter) but keeps the channels:
    its own downmix weighs each channel by -3 dB, which clips loud stereo, so the channels are
    averaged here instead, as Whisper-style front ends do.
    """

    _TINY = 4096  # input samples kept raw, for clips too short for the resampler's filter

    def __init__(self, rate: int = INPUT_SAMPLE_RATE) -> None:
        import av

        self.rate = rate
        self._resampler = av.AudioResampler(format="fltp", rate=rate)
        self._chunks: list[np.ndarray] = []
        self._raw: list[np.ndarray] = []
        self._raw_rate = rate
        self.input_samples = 0
        self.samples = 0

    def push(self, frame: av.AudioFrame | None) -> None:
        if frame is not None:
            self.input_samples += frame.samples
            if self.input_samples <= self._TINY:
                samples = _as_float(frame.to_ndarray())
                self._raw.append(
                    samples.reshape(frame.samples, -1).mean(axis=1) if frame.format.is_packed else samples.mean(axis=0)
                )
                self._raw_rate = frame.sample_rate
        for out in self._resampler.resample(frame):
            mono = out.to_ndarray().mean(axis=0, dtype=np.float32)
            self._chunks.append(mono)
            self.samples += mono.size

    def finish(self) -> np.ndarray:
        self.push(None)
        if self._chunks:
            return np.concatenate(self._chunks)
        if self._raw:  # a few samples: linear interpolation where the filter has nothing to work on
            raw = np.concatenate(self._raw)
            length = max(1, round(raw.size * self.rate / self._raw_rate))
            return np.interp(np.linspace(0, raw.size - 1, length), np.arange(raw.size), raw).astype(np.float32)
        return np.zeros(0, np.float32)


def _as_float(samples: np.ndarray) -> np.ndarray:
    """PCM samples of any sample format as float32 in [-1, 1] (8-bit PCM is unsigned, centred on 128)."""
    if samples.dtype == np.uint8:
        return (samples.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(samples.dtype, np.integer):
        return samples.astype(np.float32) / float(-np.iinfo(samples.dtype).min)
    return samples.astype(np.float32)


def to_mono(channels: np.ndarray, rate: int, target: int = INPUT_SAMPLE_RATE) -> np.ndarray:
    """(channels, samples) float32 at `rate` to mono at `target`."""
    import av

    mono = np.ascontiguousarray(channels.mean(axis=0, dtype=np.float32)[None, :])
    if rate == target or mono.size == 0:
        return mono[0]
    frame = av.AudioFrame.from_ndarray(mono, format="fltp", layout="mono")
    frame.sample_rate = rate
    resampler = Resampler(target)
    resampler.push(frame)
    return resampler.finish()
