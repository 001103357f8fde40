"""The speaker: a spoken answer, told as Qwen2.5-Omni's own pipeline tells it but able to stop and stream:
the thinker writes the text (keeping its hidden states), the talker speaks the part that is returned, and
token2wav turns the codes into audio chunk by chunk (`speech`), streamed or collected into one waveform."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qwen_omni_server.core.audio import SPEECH_SAMPLE_RATE
from qwen_omni_server.core.settings import SpeechSettings
from qwen_omni_server.core.types import GenerationRequest, cut_at_stop
from qwen_omni_server.local.residency import OutOfMemoryWhileSpeaking
from qwen_omni_server.local.pipeline import CodeBound, Talker, speak_while_writing
from qwen_omni_server.local.speech import (
    NO_SPEECH_WARNING,
    CodeStream,
    FirstTokens,
    Stopped,
    Token2Wav,
    spoken_token_count,
    talk,
    talker_inputs,
)
from qwen_omni_server.local.streaming import RequestDraws

logger = logging.getLogger(__name__)

SPEECH_ALLOWANCE_SECONDS = 2.0  # speech an answer may take besides its tokens' (SPEECH_SECONDS_PER_TOKEN each)


@dataclass(frozen=True)
class SpeechJob:
    """What one spoken answer is made of: the processor's tensors, the request, its voice, the thinker's
    generate() arguments (sampling, stops, streamer), the speech settings and the request's random draws."""

    inputs: dict[str, Any]
    use_audio_in_video: bool
    request: GenerationRequest
    voice: str
    thinker: dict[str, Any]
    settings: SpeechSettings
    draws: RequestDraws


@dataclass
class Spoken:
    """The answer's tokens (prompt included), its waveform (None when it went to `on_audio` chunk by chunk,
    when it was stopped, or when the talker made no sound) and what to warn of."""

    sequences: torch.Tensor
    audio: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)


class Speaker:
    """Speaks the answers of one loaded model, in the voices of its checkpoint."""

    def __init__(
        self, model: Any, tokenizer: Any, stop_ids: list[int], talker: Callable[..., CodeStream] = talk
    ) -> None:
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, stop_ids
        self.talk = talker  # `speech.talk`: the talker's codes as they are sampled (tests hand over fixed codes)

    def max_codes(self, max_seconds: float) -> int:
        """`max_seconds` of speech in codes (each code is `repeats` mel frames)."""
        token2wav = self.model.config.token2wav_config
        samples_per_code = token2wav.dit_config.repeats * math.prod(token2wav.bigvgan_config.upsample_rates)
        return max(1, int(max_seconds * SPEECH_SAMPLE_RATE / samples_per_code))

    def talker_max_codes(self, spoken_tokens: int, max_seconds: float, seconds_per_token: float) -> int:
        """The talker's length bound for an answer of `spoken_tokens` text tokens: `seconds_per_token` each and
        SPEECH_ALLOWANCE_SECONDS more, never past `max_seconds` (a talker that never ends stops there)."""
        return self.max_codes(min(max_seconds, SPEECH_ALLOWANCE_SECONDS + spoken_tokens * seconds_per_token))

    def speak(self, job: SpeechJob) -> Spoken:
        """The thinker (with the job's generate() arguments), the talker and token2wav over the text returned:
        the talker speaking as the thinker writes (SPEECH_PIPELINE), or after it. The thinker and the talker
        each draw from their own stream of the job's draws. Out of memory after the thinker's first step is
        OutOfMemoryWhileSpeaking."""
        if "streamer" in job.thinker:
            streamer = FirstTokens(job.thinker["streamer"], job.request.max_new_tokens)
            job = dataclasses.replace(job, thinker={**job.thinker, "streamer": streamer})
        if job.settings.speech_pipeline:
            sequences, talker, spoken = speak_while_writing(self, job)
            return self._after_talker(sequences, talker, spoken, job.request.stop or threading.Event())
        return self._after_writing(job)

    @staticmethod
    def _after_talker(sequences: torch.Tensor, talker: Talker | None, spoken: int, stop: threading.Event) -> Spoken:
        if talker is not None and talker.error is not None:
            if isinstance(talker.error, torch.OutOfMemoryError):
                raise OutOfMemoryWhileSpeaking(str(talker.error)) from None
            raise talker.error
        if stop.is_set():
            return Spoken(sequences)
        if spoken == 0 or talker is None:
            return Spoken(sequences, warnings=[NO_SPEECH_WARNING])
        audio, warnings = talker.result
        return Spoken(sequences, audio, warnings)

    def _after_writing(self, job: SpeechJob) -> Spoken:
        """The whole text first (keeping every layer's hidden states of every step), then the talker over it."""
        inputs, request, settings, draws = job.inputs, job.request, job.settings, job.draws
        limit = request.max_new_tokens
        # One step more than the answer may have: that step computes the last answer token's hidden state.
        with draws.thinker.drawing():
            output = self.model.thinker.generate(
                **inputs,
                use_audio_in_video=job.use_audio_in_video,
                max_new_tokens=limit + 1,
                output_hidden_states=True,
                return_dict_in_generate=True,
                **job.thinker,
            )
        sequences = output.sequences[:, : inputs["input_ids"].shape[1] + limit]
        spoken = min(self.spoken_tokens(sequences, inputs, request), len(output.hidden_states) - 1)
        stop = request.stop or threading.Event()
        if stop.is_set():
            return Spoken(sequences)
        if spoken == 0:
            return Spoken(sequences, warnings=[NO_SPEECH_WARNING])
        bos = self.model.speaker_map[job.voice]["bos_token"]
        try:
            arguments = talker_inputs(self.model, inputs, job.use_audio_in_video, output, spoken, bos)
            del output  # every layer's hidden states of every step: the talker has what it needs
            synthesis = Token2Wav(self.model, job.voice, seed=draws.seed, stop=stop)
            max_codes = self.talker_max_codes(spoken, settings.max_speech_seconds, settings.speech_seconds_per_token)
            with draws.talker.drawing():
                audio, warnings = self.voice(arguments, synthesis, request, max_codes, settings.speech_chunk_blocks)
        except torch.OutOfMemoryError as error:
            raise OutOfMemoryWhileSpeaking(str(error)) from None
        return Spoken(sequences, audio, warnings)

    def spoken_tokens(self, sequences: torch.Tensor, inputs: dict[str, Any], request: GenerationRequest) -> int:
        """How many of the answer's first tokens make up the text returned."""
        generated = sequences[0, inputs["input_ids"].shape[1] :].tolist()
        text, _ = cut_at_stop(self.tokenizer.decode(generated, skip_special_tokens=True), request.stop_strings)
        return spoken_token_count(self.tokenizer, generated, text, self.stop_ids)

    def voice(
        self,
        arguments: dict[str, Any],
        synthesis: Token2Wav,
        request: GenerationRequest,
        max_codes: int,
        chunk_blocks: int,
        until: CodeBound | None = None,
    ) -> tuple[np.ndarray | None, list[str]]:
        """The talker's codes, and token2wav's audio of them chunk by chunk as they come: to `on_audio`, or
        collected into one waveform (None when streamed, stopped or silent); and what to warn of."""
        stop = synthesis.stop
        pieces: list[np.ndarray] = []
        # A copy: a piece is a view of its BigVGAN run's output, which holds the margins around it too.
        on_audio = request.on_audio if request.on_audio is not None else lambda audio: pieces.append(audio.copy())
        chunked = synthesis.chunked(chunk_blocks, on_audio)
        try:
            codes = self.talk(self.model, arguments, max_codes, chunked.add, stop, until)
            if codes.dropped:
                logger.info("the talker sampled %d codes that are not speech; token2wav skipped them", codes.dropped)
            if stop.is_set():
                return None, []
            if not codes.codes:
                return None, [NO_SPEECH_WARNING]
            chunked.finish()
            if stop.is_set() or request.on_audio is not None:
                return None, []
            return np.concatenate(pieces), []
        except Stopped:  # given up while token2wav ran: nobody waits for this answer any more
            return None, []
