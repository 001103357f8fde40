"""Speech: the talker speaks the answer that is returned, and token2wav turns its codes into audio,
whole or chunk by chunk while the talker still runs.

The pipeline after the thinker (Qwen2.5-Omni's own, re-told so that it can stop and stream):

1. `talker_inputs`: the thinker's hidden states of the tokens the answer's text is made of (a stop
   string or the length bound cut the speech where they cut the text), as the wrapper's
   `generate` builds them.
2. `talk`: the talker samples codec codes; a streamer hands each one on, a stop event ends it at the
   next code, and codes that are not speech (the codec's control codes, codes outside token2wav's
   codebook) never reach token2wav.
3. `Token2Wav`: the DiT's ODE from fixed, seeded noise per mel frame, then BigVGAN. Every answer,
   streamed or not, is made by `Chunked` as the codes arrive, so its memory is the same at any length
   (solving all N mel frames at once builds [2, heads, N, N] attention masks in every DiT layer);
   `whole` is the reference it is compared with. The DiT attends in blocks (`block_size` mel frames,
   one block more per look-back / look-ahead layer), so each chunk is solved with that many blocks of
   context on each side (close to whole synthesis, not equal: the context frames feed back into the
   kept ones at each of the ODE's steps; bench/chunked_speech_bench.py measures it); BigVGAN is
   convolutional, so each run of mel is vocoded with its full reach (`vocoder_reach`) on both sides
   and its samples equal whole synthesis'.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import RungeKutta4ODESolver

from qwen_omni_server.local.streaming import StopWhenSet

# The wrapper's (Qwen2_5OmniForConditionalGeneration.generate) defaults for the talker and token2wav.
TALKER_SAMPLING = {"do_sample": True, "top_k": 40, "top_p": 0.8, "temperature": 0.9, "repetition_penalty": 1.05}
ODE_STEPS, GUIDANCE_SCALE, SWAY_COEFFICIENT = 10, 0.5, -1.0


def _ode_times() -> list[float]:
    """The ODE's time grid (sway sampling), as numbers: the solver compares them at every step, which on a
    tensor on the GPU would wait for the device (and on fake tensors, for the memory check, cannot be done)."""
    times = torch.linspace(0, 1, ODE_STEPS)
    times += SWAY_COEFFICIENT * (torch.cos(torch.pi / 2 * times) - 1 + times)
    return times.tolist()


ODE_TIMES = _ode_times()
NO_SPEECH_WARNING = "the talker ended before it spoke a sound: this answer has no audio"


class Stopped(RuntimeError):
    """token2wav was stopped midway (the request was given up)."""


@dataclass(frozen=True)
class Codec:
    """Which talker codes are speech: token2wav's codebook, less the codec's control codes."""

    codebook: int  # token2wav's `num_embeds`
    controls: frozenset[int]  # pad, start, end, mask
    ends: tuple[int, ...]  # the codes that end speech
    start: int
    vocabulary: int  # the talker's

    @classmethod
    def of(cls, config) -> Codec:
        talker = config.talker_config
        ends = (talker.tts_codec_pad_token_id, talker.tts_codec_end_token_id)
        controls = {ends[0], ends[1], talker.tts_codec_start_token_id, talker.tts_codec_mask_token_id}
        return cls(
            config.token2wav_config.dit_config.num_embeds,
            frozenset(controls),
            ends,
            talker.tts_codec_start_token_id,
            talker.vocab_size,
        )

    def is_speech(self, code: int) -> bool:
        return 0 <= code < self.codebook and code not in self.controls

    def suppressed(self) -> list[int]:
        """Codes the talker may not sample: its start code (as the wrapper does) and codes token2wav has no
        embedding for (the real talker's vocabulary has 8448, token2wav's codebook 8193)."""
        return [self.start, *(c for c in range(self.codebook, self.vocabulary) if c not in self.ends)]


# ---------------------------------------------------------------- what the talker speaks


def spoken_token_count(tokenizer, generated: list[int], text: str, stop_ids: list[int]) -> int:
    """How many of the answer's first tokens make up `text` (the returned answer): up to the first stop
    token, less any token that reaches past the text (a stop string cut it)."""
    count = next((i for i, token in enumerate(generated) if token in stop_ids), len(generated))
    while count and not text.startswith(tokenizer.decode(generated[:count], skip_special_tokens=True)):
        count -= 1
    return count


class FirstTokens(BaseStreamer):
    """Passes on the prompt and the first `limit` new tokens only (the thinker runs one step further when
    it speaks: that step computes the hidden state of the last token the talker needs)."""

    def __init__(self, inner: BaseStreamer, limit: int) -> None:
        self.inner, self.left, self.prompt_seen = inner, limit, False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen and self.left <= 0:
            return
        if self.prompt_seen:
            self.left -= value.numel()
        self.prompt_seen = True
        self.inner.put(value)

    def end(self) -> None:
        self.inner.end()


def talker_inputs(
    model, inputs: dict[str, Any], use_audio_in_video: bool, thinker_output, spoken: int, voice_bos: int
) -> dict[str, Any]:
    """The talker's generate() arguments for the answer's first `spoken` tokens (at least 1), built as
    Qwen2_5OmniForConditionalGeneration.generate builds them for the whole answer."""
    device = inputs["input_ids"].device
    steps = thinker_output.hidden_states  # [prompt, token 0, token 1, ...], each a tuple over layers
    reply = [reply_state(steps[k][0], steps[k][-1], device) for k in range(1, spoken + 1)]
    ends = [
        text_embedding(model, token, device) for token in (model.talker.text_eos_token, model.talker.text_pad_token)
    ]
    prompt = inputs["input_ids"].shape[1]
    first_token = thinker_output.sequences[:, prompt : prompt + 1].to(device)
    rest = torch.cat([*reply[1:], *ends], dim=1)
    return talker_arguments(
        model, inputs, use_audio_in_video, (steps[0][0], steps[0][-1]), first_token, reply[0], rest, voice_bos
    )


def reply_state(first_layer: torch.Tensor, last_layer: torch.Tensor, device: torch.device) -> torch.Tensor:
    """What the talker reads of one answer token: the thinker's last layer plus its embedding (first layer)."""
    return last_layer.to(device) + first_layer.to(device)


def text_embedding(model, token: int, device: torch.device) -> torch.Tensor:
    return model.thinker.get_input_embeddings()(torch.tensor([[token]], device=device)).to(device)


def talker_arguments(
    model,
    inputs: dict[str, Any],
    use_audio_in_video: bool,
    prompt_states: tuple[torch.Tensor, torch.Tensor],
    first_token: torch.Tensor,
    first_reply: torch.Tensor,
    rest: Any,
    voice_bos: int,
) -> dict[str, Any]:
    """The talker's generate() arguments: the prompt's first- and last-layer thinker states (media positions
    reach the talker as zeros), the voice, the answer's first token and its reply state, and `rest`: the
    reply states of the tokens after it, then the text-end and pad embeddings (a tensor, or a feed that
    reads like one)."""
    config = model.config.thinker_config
    input_ids = inputs["input_ids"]
    device = input_ids.device
    prompt_embeds = prompt_states[0].clone().to(device)
    for key, token in (
        ("input_features", config.audio_token_index),
        ("pixel_values", config.image_token_index),
        ("pixel_values_videos", config.video_token_index),
    ):
        if inputs.get(key) is not None:
            prompt_embeds[input_ids == token] = 0
    talker = model.talker
    arguments: dict[str, Any] = {
        "input_ids": torch.cat(
            [
                torch.full_like(input_ids, talker.codec_mask_token),
                torch.tensor([[talker.codec_pad_token, talker.codec_bos_token]], device=device),
            ],
            dim=1,
        ),
        "input_text_ids": torch.cat([input_ids, torch.tensor([[voice_bos]], device=device), first_token], dim=1),
        "inputs_embeds": torch.cat(
            [prompt_states[1].to(device) + prompt_embeds, text_embedding(model, voice_bos, device), first_reply],
            dim=1,
        ),
        "thinker_reply_part": rest,
        "use_audio_in_video": use_audio_in_video,
    }
    if inputs.get("attention_mask") is not None:
        mask = inputs["attention_mask"]
        arguments["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], 2))], dim=1)
    if inputs.get("feature_attention_mask") is not None:
        arguments["audio_feature_lengths"] = inputs["feature_attention_mask"].sum(dim=1)
    for key in ("image_grid_thw", "video_grid_thw", "video_second_per_grid"):
        if inputs.get(key) is not None:
            arguments[key] = inputs[key]
    return arguments


class CodeStream(BaseStreamer):
    """Receives the talker's codes as they are sampled; hands the speech codes to `on_codes` until the
    first code that ends speech. Control and out-of-codebook codes are dropped (and counted)."""

    def __init__(self, codec: Codec, on_codes: Callable[[list[int]], None]) -> None:
        self.codec, self.on_codes = codec, on_codes
        self.codes: list[int] = []
        self.dropped = 0
        self.prompt_seen = self.ended = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        fresh = []
        for code in value.reshape(-1).tolist():
            if self.ended or code in self.codec.ends:
                self.ended = True
            elif self.codec.is_speech(code):
                fresh.append(code)
            else:
                self.dropped += 1
        if fresh:
            self.codes += fresh
            self.on_codes(fresh)

    def end(self) -> None:
        pass


def talk(
    model,
    arguments: dict[str, Any],
    max_codes: int,
    on_codes: Callable[[list[int]], None],
    stop: threading.Event,
    until: StoppingCriteria | None = None,
) -> CodeStream:
    """Run the talker; its speech codes go to `on_codes` as they come. Ends at an end code, `max_codes`,
    at the next code once `stop` is set, or where `until` says."""
    codec = Codec.of(model.config)
    stream = CodeStream(codec, on_codes)
    model.talker.rope_deltas = None  # positions are worked out afresh for each answer
    model.talker.generate(
        **arguments,
        max_new_tokens=max_codes,
        eos_token_id=list(codec.ends),
        pad_token_id=model.talker.codec_pad_token,
        suppress_tokens=codec.suppressed(),
        streamer=stream,
        stopping_criteria=StoppingCriteriaList([StopWhenSet(stop), *([until] if until else [])]),
        **TALKER_SAMPLING,
    )
    return stream


# ---------------------------------------------------------------- token2wav


def vocoder_reach(config) -> int:
    """How many mel frames on each side of a frame BigVGAN's output for it depends on (rounded up):
    its convolutions' half-widths, each at the rate it runs at, plus every anti-aliased activation's
    12-tap filters (up and down, at twice the rate: 6 samples, counted as 7)."""
    activation = 7
    reach = 3.0  # conv_pre: 7 taps at the mel rate
    rate = 1
    for stride, kernel in zip(config.upsample_rates, config.upsample_kernel_sizes):
        reach += math.ceil(kernel / stride) / rate  # the transposed convolution, in its input's samples
        rate *= stride
        reach += (
            max(
                sum(2 * activation + (size - 1) * d // 2 + (size - 1) // 2 for d in dilations)
                for size, dilations in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes)
            )
            / rate
        )
    reach += (activation + 3) / rate  # activation_post and conv_post (7 taps)
    return math.ceil(reach) + 1


class Token2Wav:
    """token2wav for one answer in one voice: noise fixed per mel frame by `seed`, so a frame gets the
    same noise whether it is synthesized whole or in a chunk."""

    def __init__(self, model, speaker: str, seed: int | None = None, stop: threading.Event | None = None) -> None:
        self.stop = stop or threading.Event()  # checked at each of the ODE's steps: raises Stopped
        token2wav = model.token2wav
        if token2wav.dtype != torch.float:
            token2wav.float()  # it only runs in fp32 (as the wrapper does)
        self.dit = token2wav.code2wav_dit_model
        self.vocoder = token2wav.code2wav_bigvgan_model
        self.device = model.thinker.get_input_embeddings().weight.device
        voice = model.speaker_map[speaker]
        self.condition = voice["cond"].to(self.device).float()[None]
        self.reference_mel = voice["ref_mel"].to(self.device).float()
        config = self.dit.config
        self.repeats, self.block = config.repeats, config.block_size
        self.look_back = len(config.look_backward_layers) * config.block_size  # mel frames
        self.look_ahead = len(config.look_ahead_layers) * config.block_size
        self.reach = vocoder_reach(self.vocoder.config)
        self.hop = math.prod(self.vocoder.config.upsample_rates)
        self.seed = secrets.randbits(62) if seed is None else seed
        self.mel_dim = config.mel_dim

    def noise(self, start: int, end: int) -> torch.Tensor:
        """The ODE's starting noise for mel frames [start, end): [1, end - start, mel_dim], drawn block by
        block from generators seeded by (seed, block), so a frame's noise never depends on the chunking
        (drawn afresh for each window: nothing kept grows with the answer)."""
        first, last = start // self.block, (end - 1) // self.block
        blocks = []
        for index in range(first, last + 1):
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + index) % 2**63)
            blocks.append(torch.randn([1, self.block, self.mel_dim], generator=generator))
        return torch.cat(blocks, dim=1)[:, start - first * self.block : end - first * self.block]

    @torch.no_grad()
    def mel(self, codes: list[int], start: int, end: int) -> torch.Tensor:
        """The DiT's mel for frames [start, end) of `codes`' speech (start on a block boundary), from that
        window alone: [1, mel_dim, end - start]."""
        code = torch.tensor([codes[start // self.repeats : end // self.repeats]], device=self.device)
        noise = self.noise(start, end).to(self.device)
        condition = self.condition.unsqueeze(1).repeat(1, end - start, 1)

        def velocity(time_step: float, state: torch.Tensor) -> torch.Tensor:
            if self.stop.is_set():
                raise Stopped("the request was given up")
            output = self.dit(
                hidden_states=state,
                quantized_code=code,
                speaker_embedding=condition,
                condition_vector=self.reference_mel,
                time_step=torch.tensor(time_step, device=self.device),
                apply_cfg=True,
            )
            guided, unguided = torch.chunk(output, 2, dim=0)
            return guided + (guided - unguided) * GUIDANCE_SCALE

        solution = RungeKutta4ODESolver(function=velocity, initial_value=noise).integrate(ODE_TIMES)[-1]
        return solution.permute(0, 2, 1)

    @torch.inference_mode()
    def vocode(self, mel: torch.Tensor) -> np.ndarray:
        return self.vocoder(mel).reshape(-1).float().numpy()

    def whole(self, codes: list[int]) -> np.ndarray:
        """The reference: all the codes solved in one piece (float32 mono at SPEECH_SAMPLE_RATE). Its memory
        grows with the square of the length; answers are made by `chunked`, this is what it is compared with."""
        return self.vocode(self.mel(codes, 0, len(codes) * self.repeats))

    def chunked(
        self, chunk_blocks: int, on_audio: Callable[[np.ndarray], object], stop: threading.Event | None = None
    ) -> Chunked:
        return Chunked(self, chunk_blocks * self.block, on_audio, stop or self.stop)


class Chunked:
    """Audio as codes arrive: each chunk of mel frames is solved once its look-ahead has arrived, each run
    of mel vocoded once BigVGAN's reach past it is known; `on_audio` receives the samples in order."""

    def __init__(
        self, synthesis: Token2Wav, chunk_frames: int, on_audio: Callable[[np.ndarray], object], stop: threading.Event
    ) -> None:
        self.t2w, self.chunk, self.on_audio, self.stop = synthesis, chunk_frames, on_audio, stop
        self.codes: list[int] = []
        self.mels: list[torch.Tensor] = []  # solved frames, in order
        self.solved = 0  # mel frames solved
        self.vocoded = 0  # mel frames whose samples went out
        self.samples = 0

    def add(self, codes: list[int]) -> None:
        self.codes += codes
        self._advance(final=False)

    def finish(self) -> None:
        self._advance(final=True)

    def _advance(self, final: bool) -> None:
        t2w, total = self.t2w, len(self.codes) * self.t2w.repeats
        while self.solved < total and not self.stop.is_set():
            end = min(self.solved + self.chunk, total)
            if not final and end + t2w.look_ahead > total:
                break
            start = max(0, self.solved - t2w.look_back)
            window_end = min(total, end + t2w.look_ahead)
            mel = t2w.mel(self.codes, start, window_end)
            self.mels.append(mel[:, :, self.solved - start : end - start])
            self.solved = end
            self._vocode(final and end == total)

    def _vocode(self, final: bool) -> None:
        t2w = self.t2w
        ready = self.solved if final else self.solved - t2w.reach
        if ready <= self.vocoded:
            return
        mel = torch.cat(self.mels, dim=2)  # frames [first, solved)
        first = self.solved - mel.shape[2]
        start = max(0, self.vocoded - t2w.reach)
        end = min(self.solved, ready + t2w.reach)
        audio = t2w.vocode(mel[:, :, start - first : end - first])
        self.mels = [mel[:, :, max(0, ready - t2w.reach - first) :]]  # what the next run's context needs
        self.on_audio(audio[(self.vocoded - start) * t2w.hop : (ready - start) * t2w.hop])
        self.samples += (ready - self.vocoded) * t2w.hop
        self.vocoded = ready
