"""Memory check at real size, no GPU needed: the real 3B and 7B architectures run on fake CUDA tensors
while a live-bytes tracker counts what they allocate; each planner row and each request shape prints
its tracked activations beside the planner's prediction.

    .venv/bin/python scripts/memory_check.py                  # 3B and 7B, every row; JSON in memory_check.json
    .venv/bin/python scripts/memory_check.py --models 3b --out report.json

How (torch's CUDA build, no driver): the architecture is built on the meta device and every weight
becomes an empty fake `cuda` tensor; `FakeTensorMode` computes shapes, dtypes and devices, never values,
and `LiveBytes` (qwen_omni_server/local/live_bytes.py) adds each new storage's bytes, rounded to 512 B as
the caching allocator rounds them, and takes them off when the storage is freed: the peak is what
`torch.cuda.max_memory_allocated` would show above the weights, less kernel workspaces (listed apart as the
planner's fixed costs). Attention is counted as the fused kernels allocate it (`fused_attention`).
What needs values is computed for real on the CPU and handed in as constants: the encoders' index tensors
(window index, cu_seqlens, audio chunks), the ODE's time grid. `generate()` reads values to stop, so
prefill and decoding are driven step by step: a decoding step at length L runs on a cache already L long.

Rows:
- shapes: each request shape at the largest the settings admit (text at MAX_CONTEXT_TOKENS, the most
  image patches and audio seconds the budgets and the context allow, a video with its sound, spoken
  answers of 10, 60 and 180 s), tracked against `placement.activation_bytes` for that shape, by phase;
- batches: MAX_BATCH_SIZE rows (4 and 8) of text at MAX_CONTEXT_TOKENS decoding together: the last row's
  prefill beside the others' caches, its cache joining theirs, a step of all rows; tracked against the
  thinker's phase of `placement.activation_bytes` with `batch_size` (kv_cache + other_rows + prefill);
- plans: each planner row (model x budget x bf16/nf4/int8): the GPU-side peak of the shapes for that
  placement, tracked and predicted, and whether a plan that says `fits` holds once the weights, the
  offload buffers, the dequantization workspace and the fixed costs are added to the tracked peak.
  bitsandbytes' kernels cannot run on fake tensors: a quantized row's activations are the bf16 ones (the
  products run in bf16) plus the dequantization workspace by arithmetic, tested against the loaded bytes in
  tests/test_quantization.py; such rows say so.
Goals: tracked <= predicted <= 1.15 x tracked + 64 MiB on every row; `fits` never where it does not.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen_omni_server.core.settings import Settings
from qwen_omni_server.local.devices import planning_budgets
from qwen_omni_server.local.live_bytes import LiveBytes, fused_attention
from qwen_omni_server.local.loading import load_config
from qwen_omni_server.local.placement import (
    AUDIO_TOKENS_PER_SECOND,
    CODES_PER_SECOND,
    FIXED_COSTS,
    Budgets,
    GiB,
    Plan,
    activation_bytes,
    build_skeleton,
    head_dim,
    peak_activations,
    plan_placement,
)
from qwen_omni_server.local.residency import keep_last_logits
from qwen_omni_server.local.speech import Token2Wav

MiB = 1024**2
MODELS = {"3b": "qwen2.5-omni-3b.config.json", "7b": "qwen2.5-omni-7b.derived.config.json"}
BUDGETS_GIB = {"none": (4, 6, 8, 12, 16, 24, 40), "nf4": (4, 6, 8, 12), "int8": (6, 8, 12, 16)}
DTYPE = torch.bfloat16
SPEECH_SECONDS = (10, 60, 180)
SPEECH_PROMPT_TOKENS = 512  # a spoken answer's prompt; its text is ~4 tokens per second of speech
SPEECH_TEXT_TOKENS_PER_SECOND = 4
GOAL_FACTOR, GOAL_SLACK = 1.15, 64 * MiB


# ---------------------------------------------------------------- fake CUDA


class FakeCuda:
    """A FakeTensorMode for a machine without a driver: CUDA tensors are never made real, CPU tensors
    handed in as constants keep their values (index tensors the model reads with `.tolist()`)."""

    def __init__(self) -> None:
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        is_fake = self.mode.is_our_fake
        self.mode.may_turn_const = lambda t: t.device.type == "cpu" and not is_fake(t)  # type: ignore[method-assign]

    def constant(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU tensor whose values the model may read."""
        return self.mode.fake_tensor_converter.from_real_tensor(self.mode, tensor, make_constant=True)

    def cuda(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU tensor's fake copy on the GPU (its values are gone)."""
        with self.mode:
            return self.constant(tensor).to("cuda")

    def empty(self, *shape: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
        with self.mode:
            return torch.empty(shape, dtype=dtype, device="cuda")

    def give_weights(self, module: torch.nn.Module, dtype: torch.dtype) -> None:
        """Every parameter and buffer of a meta-device module becomes an empty fake CUDA tensor."""
        with self.mode:
            for child in module.modules():
                for name, parameter in list(child.named_parameters(recurse=False)):
                    kind = dtype if parameter.is_floating_point() else parameter.dtype
                    child._parameters[name] = torch.nn.Parameter(
                        torch.empty(parameter.shape, dtype=kind, device="cuda"), requires_grad=False
                    )
                for name, buffer in list(child.named_buffers(recurse=False)):
                    if buffer is not None:
                        child._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device="cuda")

    @contextlib.contextmanager
    def tracking(self) -> Iterator[LiveBytes]:
        """Within: fake CUDA, no autograd, fused attention, and the live bytes counted."""
        with self.mode, torch.no_grad(), fused_attention(), LiveBytes() as live:
            yield live


# ---------------------------------------------------------------- what each part allocates


def thinker_phase(fake: FakeCuda, thinker, tokens: int, keep_states: bool) -> dict[str, int]:
    """The thinker's prefill over `tokens` and a decoding step at that length: the KV cache it leaves, the
    prefill's (or the step's) peak above it, and with `keep_states` what a spoken answer keeps for the
    talker: the prompt's first- and last-layer states, read as the server reads them (SPEECH_PIPELINE)."""
    from transformers import DynamicCache

    from qwen_omni_server.local.pipeline import ThinkerStates

    prompt = tokens - 1  # the last of `tokens` comes from the decoding step
    ids, positions = fake.empty(1, prompt, dtype=torch.long), fake.empty(3, 1, prompt, dtype=torch.long)
    with fake.tracking() as live:
        cache = DynamicCache(config=thinker.config.text_config)
        states = ThinkerStates(thinker.model.language_model) if keep_states else None
        output = thinker(input_ids=ids, position_ids=positions, cache=cache, use_cache=True)
        prefill_peak = live.peak
        if states is not None:
            states.detach()
        del output
        kept = live.live
        live.reset_peak()
        step = thinker(input_ids=ids[:, :1], position_ids=positions[..., :1], cache=cache, use_cache=True)
        del step, states
        kv_cache = live.live
        return {
            "kv_cache": kv_cache,
            "talker_states": max(0, kept - kv_cache),
            "prefill": max(prefill_peak - kept, live.peak - kept),
        }


def batch_phase(fake: FakeCuda, thinker, tokens: int, rows: int) -> int:
    """`rows` requests of `tokens` each decoding together (MAX_BATCH_SIZE): the peak while the last one prefills
    beside the others' caches, its cache joins theirs (`batching.Batch`, left-padded layer by layer) and all
    of them take a decoding step."""
    from transformers import DynamicCache

    from qwen_omni_server.local.batching import Batch

    prompt = tokens - 1
    ids, positions = fake.empty(1, prompt, dtype=torch.long), fake.empty(3, 1, prompt, dtype=torch.long)
    mask = fake.empty(1, prompt, dtype=torch.long)
    with fake.tracking() as live:
        batch = Batch(thinker)
        for _ in range(rows):
            cache = DynamicCache(config=thinker.config.text_config)
            output = thinker(input_ids=ids, position_ids=positions, cache=cache, use_cache=True)
            del output
            batch._merge(cache, mask)
            del cache
        step = thinker(
            input_ids=fake.empty(rows, 1, dtype=torch.long),
            attention_mask=fake.empty(rows, prompt + 1, dtype=torch.long),
            position_ids=fake.empty(3, rows, 1, dtype=torch.long),
            cache=batch.cache,
            use_cache=True,
        )
        del step, batch
        return live.peak


def vision_phase(fake: FakeCuda, visual, grids: list[tuple[int, int, int]]) -> int:
    """The vision encoder's peak on images/frames of these (t, h, w) patch grids, its input included."""
    from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

    config = visual.config
    grid = torch.tensor(grids)
    cu_seqlens, _ = get_vision_attention_seqlens(grid, config)
    window_index, cu_window_seqlens = get_vision_window_index(
        grid, config.spatial_merge_size, config.window_size, config.patch_size
    )
    indices = {
        "cu_seqlens": fake.constant(cu_seqlens),
        "window_index": fake.constant(window_index),
        "cu_window_seqlens": fake.constant(cu_window_seqlens),
        "position_ids": fake.cuda(get_vision_position_ids(grid, config.spatial_merge_size)),
    }
    patches = sum(t * h * w for t, h, w in grids)
    pixels = config.in_channels * config.temporal_patch_size * config.patch_size**2
    with fake.tracking() as live:
        visual(torch.empty(patches, pixels, dtype=DTYPE, device="cuda"), grid_thw=fake.constant(grid), **indices)
        return live.peak


def audio_phase(fake: FakeCuda, audio_tower, clips: list[float]) -> int:
    """The audio encoder's peak on clips of these seconds (100 mel frames a second), its input included."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as omni

    config = audio_tower.config
    lengths = torch.tensor([int(seconds * 100) for seconds in clips])
    frames = int(lengths.sum())
    features = torch.zeros(config.num_mel_bins, frames)
    padded, chunk_lengths = omni.chunk_and_pad_features(features, lengths, config.n_window)
    indices = {
        "chunk_lengths": fake.cuda(chunk_lengths),
        "valid_indices": fake.cuda(omni.get_valid_indices(chunk_lengths)),
        "pool_indices": fake.cuda(omni.get_pool_indices(lengths)),
        "cu_seqlens": fake.constant(omni.get_audio_cu_seqlens(chunk_lengths)),
    }
    with fake.tracking() as live:
        flat = torch.empty(config.num_mel_bins, frames, dtype=DTYPE, device="cuda")
        padded_feature = torch.empty(padded.shape, dtype=DTYPE, device="cuda")
        audio_tower(flat, feature_lens=fake.cuda(lengths), padded_feature=padded_feature, **indices)
        return live.peak


def talker_phase(fake: FakeCuda, talker, tokens: int, reply: int, codes: int) -> int:
    """The talker's peak for an answer of `reply` of the `tokens`: its prefill over the prompt, and a decoding
    step once `codes` codes are in its cache."""
    from transformers import DynamicCache

    config = talker.config
    width = config.embedding_size
    prompt = tokens - reply
    positions = fake.empty(3, 1, prompt, dtype=torch.long)
    head_width = head_dim(config)
    with fake.tracking() as live:
        embeds = torch.empty(1, prompt, width, dtype=DTYPE, device="cuda")  # talker_inputs builds them
        reply_part = torch.empty(1, reply, width, dtype=DTYPE, device="cuda")
        cache = DynamicCache(config=config)
        output = talker(inputs_embeds=embeds, position_ids=positions, cache=cache, use_cache=True)
        del output, cache
        cache = DynamicCache(config=config)
        for layer in range(config.num_hidden_layers):
            shape = (1, config.num_key_value_heads, prompt + codes - 1, head_width)
            cache.update(
                torch.empty(shape, dtype=DTYPE, device="cuda"), torch.empty(shape, dtype=DTYPE, device="cuda"), layer
            )
        step = talker(
            input_ids=torch.empty(1, 1, dtype=torch.long, device="cuda"),
            position_ids=positions[..., :1],
            thinker_reply_part=reply_part,
            cache=cache,
            use_cache=True,
        )
        del step, reply_part, embeds
        return live.peak


class FakeSynthesis(Token2Wav):
    """Token2Wav on fake tensors. The vocoder's samples are not read (they have no values); a window of a
    length already solved is not solved again: it would allocate the same, so its peak above what is alive
    then is the one measured, and its output is allocated (a 180 s answer would take an hour otherwise)."""

    peaks: dict[tuple[str, str, int], tuple[int, tuple[int, ...]]] = {}  # (architecture, part, length)

    def __init__(self, model, voice: str, live: LiveBytes) -> None:
        super().__init__(model, voice, seed=0)
        self.live = live
        self.architecture = model.config.token2wav_config.to_json_string()

    def mel(self, codes: list[int], start: int, end: int) -> torch.Tensor:
        return self._measured("mel", end - start, lambda: Token2Wav.mel(self, codes, start, end))

    def vocode(self, mel: torch.Tensor) -> np.ndarray:
        samples = self._measured("vocode", mel.shape[2], lambda: self.vocoder(mel))
        return np.zeros(samples.numel(), dtype=np.float32)

    def _measured(self, part: str, length: int, run) -> torch.Tensor:
        live = self.live
        key = (self.architecture, part, length)
        if key in self.peaks:
            above, shape = self.peaks[key]
            live.peak = max(live.peak, live.live + above)
            return torch.empty(shape, device="cuda")
        alive, peak = live.live, live.peak
        live.reset_peak()
        with torch.no_grad():
            output = run()
        self.peaks[key] = (live.peak - alive, tuple(output.shape))
        live.peak = max(peak, live.peak)
        return output


def token2wav_phase(fake: FakeCuda, model, seconds: float, chunk_blocks: int, whole: bool = False) -> int:
    """token2wav's peak on `seconds` of speech, chunk by chunk as the server makes it (or whole, as the
    server made non-streamed speech before every answer went chunk by chunk)."""
    codes = [0] * int(seconds * CODES_PER_SECOND)
    with fake.tracking() as live:
        synthesis = FakeSynthesis(model, next(iter(model.speaker_map)), live)
        if whole:
            synthesis.vocode(synthesis.mel(codes, 0, len(codes) * synthesis.repeats))
        else:
            chunked = synthesis.chunked(chunk_blocks, lambda samples: None)
            for start in range(0, len(codes), synthesis.block // synthesis.repeats):  # as the talker hands them on
                chunked.add(codes[start : start + synthesis.block // synthesis.repeats])
            chunked.finish()
        return live.peak


# ---------------------------------------------------------------- request shapes


@dataclass(frozen=True)
class Shape:
    """One request at its largest: prompt tokens and what its media and speech bring."""

    name: str
    tokens: int
    grids: tuple[tuple[int, int, int], ...] = ()  # vision patch grids (t, h, w)
    audio_clips: tuple[float, ...] = ()  # seconds
    speech_seconds: float = 0
    reply_tokens: int = 0  # the spoken text's tokens (the talker's reply part)

    @property
    def patches(self) -> int:
        return sum(t * h * w for t, h, w in self.grids)

    @property
    def audio_seconds(self) -> float:
        return sum(self.audio_clips)

    def budgets(self, chunk_blocks: int) -> Budgets:
        return Budgets(self.tokens, self.patches, self.audio_seconds, self.speech_seconds, chunk_blocks)


def image_grids(patches: int, most_per_image: int) -> tuple[tuple[int, int, int], ...]:
    """Images 256 patches wide (3,584 pixels) holding `patches` in all, none over `most_per_image`."""
    grids, left = [], patches
    while left >= 256 * 2:
        rows = min(left, most_per_image) // 256 // 2 * 2
        grids.append((1, rows, 256))
        left -= rows * 256
    return tuple(grids)


def resized_grid(width: int, height: int, max_pixels: int, patch: int) -> tuple[int, int, int]:
    """An image's patch grid as the processor resizes it (qwen-vl's smart_resize, 28-pixel steps)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    resized_height, resized_width = smart_resize(height, width, factor=2 * patch, max_pixels=max_pixels)
    return (1, resized_height // patch, resized_width // patch)


def audio_clips(seconds: float, longest: float) -> tuple[float, ...]:
    whole, rest = divmod(seconds, longest)
    return (longest,) * int(whole) + ((rest,) if rest >= 1 else ())


def request_shapes(settings: Settings, config) -> list[Shape]:
    """The shapes each row measures, at the largest the settings admit (the planner's own sizes first)."""
    context = settings.max_context_tokens
    vision = config.thinker_config.vision_config
    merge = vision.spatial_merge_size**2
    largest = planning_budgets(settings)
    patches = min(context * merge, largest["max_visual_patches"])
    seconds = min(context / AUDIO_TOKENS_PER_SECOND, largest["max_audio_seconds"])
    per_image = settings.max_pixels_ceiling // (vision.patch_size**2)
    frames = settings.video_max_frames
    frame_patches = settings.video_total_pixels // (vision.patch_size**2) // (frames // 2) // 64 * 64
    video_seconds = frames / settings.video_fps
    photo = resized_grid(1920, 1080, settings.image_max_pixels, vision.patch_size)
    shapes = [
        Shape("text", context),
        Shape("image", context, image_grids(patches, per_image)),
        Shape("image 1080p", 64 + photo[1] * photo[2] // merge, (photo,)),
        Shape("audio", context, audio_clips=audio_clips(seconds, settings.max_audio_seconds)),
        Shape(
            "video+sound",
            64 + frames // 2 * frame_patches // merge + int(video_seconds * AUDIO_TOKENS_PER_SECOND),
            ((frames // 2, frame_patches // 32, 32),),
            (video_seconds,),
        ),
    ]
    for speech, longest in [*((seconds, False) for seconds in SPEECH_SECONDS), (settings.max_speech_seconds, True)]:
        reply = int(speech * SPEECH_TEXT_TOKENS_PER_SECOND)
        tokens = context if longest else SPEECH_PROMPT_TOKENS + reply
        name = f"speech {speech:g} s" + (", longest prompt" if longest else "")
        shapes.append(Shape(name, tokens, speech_seconds=speech, reply_tokens=reply))
    return shapes


# ---------------------------------------------------------------- tracked and predicted


class RealSizeModel:
    """One architecture on fake CUDA tensors (bf16; token2wav in fp32 as it runs), measured phase by phase."""

    def __init__(self, config, chunk_blocks: int) -> None:
        self.config, self.chunk_blocks = config, chunk_blocks
        self.fake = FakeCuda()
        self.model = build_skeleton(config)
        self.fake.give_weights(self.model.thinker, DTYPE)
        self.fake.give_weights(self.model.talker, DTYPE)
        self.fake.give_weights(self.model.token2wav, torch.float32)
        keep_last_logits(self.model.thinker.lm_head)  # as the server does
        keep_last_logits(self.model.talker.codec_head)
        dit = config.token2wav_config.dit_config
        voice = {
            "bos_token": 0,
            "cond": self.fake.empty(dit.enc_emb_dim, dtype=torch.float32),
            "ref_mel": self.fake.empty(1, 300, dit.mel_dim, dtype=torch.float32),
        }
        self.model.speaker_map = {"voice": voice}
        self._thinker: dict[tuple[int, bool], dict[str, int]] = {}

    def thinker(self, tokens: int, keep_states: bool) -> dict[str, int]:
        key = (tokens, keep_states)
        if key not in self._thinker:
            self._thinker[key] = thinker_phase(self.fake, self.model.thinker, tokens, keep_states)
        return self._thinker[key]

    def activations(self, shape: Shape) -> dict[str, int]:
        """Tracked bytes above the weights, by what holds them (the keys of placement.activation_bytes)."""
        speaks = shape.speech_seconds > 0
        thinker = self.model.thinker.model
        acts = {"vision": 0, "audio": 0, "talker": 0, "token2wav": 0, **self.thinker(shape.tokens, speaks)}
        if shape.grids:
            acts["vision"] = vision_phase(self.fake, thinker.visual, list(shape.grids))
        if shape.audio_clips:
            acts["audio"] = audio_phase(self.fake, thinker.audio_tower, list(shape.audio_clips))
        if speaks:
            codes = int(shape.speech_seconds * CODES_PER_SECOND)
            acts["talker"] = talker_phase(self.fake, self.model.talker, shape.tokens, shape.reply_tokens, codes)
            acts["token2wav"] = token2wav_phase(self.fake, self.model, shape.speech_seconds, self.chunk_blocks)
        else:
            acts["talker_states"] = 0
        return acts


PHASES = ("vision", "audio", "kv_cache", "prefill", "talker_states", "talker", "token2wav")
ALL_ON_GPU = dict.fromkeys(("visual", "audio_tower", "language_model", "talker", "token2wav"), "gpu")


def within_goal(tracked: int, predicted: int) -> bool:
    return tracked <= predicted <= GOAL_FACTOR * tracked + GOAL_SLACK


@dataclass
class ShapeRow:
    model: str
    shape: str
    tokens: int
    tracked: dict[str, int]
    predicted: dict[str, int]
    tracked_peak: int = 0
    predicted_peak: int = 0
    ok: bool = False

    def __post_init__(self) -> None:
        self.tracked_peak = peak_activations(self.tracked, ALL_ON_GPU, on_gpu_side=True)
        self.predicted_peak = peak_activations(self.predicted, ALL_ON_GPU, on_gpu_side=True)
        self.ok = within_goal(self.tracked_peak, self.predicted_peak)


def shape_rows(name: str, measured: RealSizeModel, shapes: list[Shape]) -> list[ShapeRow]:
    rows = []
    for shape in shapes:
        started = time.perf_counter()
        tracked = measured.activations(shape)
        predicted = activation_bytes(
            measured.config, shape.budgets(measured.chunk_blocks), DTYPE, shape.speech_seconds > 0
        )
        rows.append(ShapeRow(name, shape.name, shape.tokens, tracked, {k: predicted[k] for k in PHASES}))
        print(f"  {name} {shape.name}: measured in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return rows


@dataclass
class PlanRow:
    model: str
    quantization: str
    budget_gib: float
    placement: str
    fits: bool
    predicted_gpu_activations: int
    tracked_gpu_activations: int
    tracked_total: int  # weights + tracked activations + offload buffer + dequantization + fixed costs
    predicted_total: int
    ok: bool = False
    note: str = ""


def plan_row(name: str, plan: Plan, tracked_max: dict[str, int]) -> PlanRow:
    """A planner row: its GPU-side activations tracked (the largest request, phase by phase) and predicted."""
    tracked = peak_activations(tracked_max, plan.placement, on_gpu_side=True)
    predicted = peak_activations(plan.activations, plan.placement, on_gpu_side=True)
    tracked_total = plan.predicted_gpu_bytes - predicted + tracked  # the same weights, buffers and fixed costs
    gpu_used = plan.headroom_bytes > 0  # a plan with nothing on the GPU reserves no headroom
    row = PlanRow(
        name,
        plan.quantization,
        plan.budget_bytes / GiB,
        placement_summary(plan),
        plan.fits,
        predicted,
        tracked,
        tracked_total,
        plan.predicted_gpu_bytes,
    )
    row.ok = (not gpu_used or within_goal(tracked, predicted)) and (not plan.fits or tracked_total <= plan.budget_bytes)
    if plan.quantization != "none":
        row.note = "bitsandbytes cannot run on fake tensors: bf16 activations, dequantization by arithmetic"
    return row


def placement_summary(plan: Plan) -> str:
    lm = plan.placement["language_model"]
    if plan.language_model_layers:
        lm = f"split {plan.language_model_layers['gpu']}/{sum(plan.language_model_layers.values())}"
    speech = "/".join(plan.placement.get(c, "-") for c in ("talker", "token2wav"))
    return f"lm {lm}, enc {plan.placement['visual']}/{plan.placement['audio_tower']}, speech {speech}"


def largest_request(rows: list[ShapeRow]) -> dict[str, int]:
    """Phase by phase, the most any shape held: what the planner sizes (its largest request)."""
    return {phase: max(row.tracked[phase] for row in rows) for phase in PHASES}


def plan_rows(name: str, config, settings: Settings, tracked_max: dict[str, int], schemes: list[str]) -> list[PlanRow]:
    skeleton = build_skeleton(config)
    rows = []
    for scheme in schemes:
        for budget in BUDGETS_GIB[scheme]:
            plan = plan_placement(
                copy.deepcopy(config),
                int(budget * GiB),
                DTYPE,
                audio_output=True,
                skeleton=skeleton,
                **planning_budgets(settings),
                quantization=scheme,
            )
            rows.append(plan_row(name, plan, tracked_max))
    return rows


# ---------------------------------------------------------------- report


BATCH_ROWS = (4, 8)


@dataclass
class BatchRow:
    model: str
    rows: int
    tokens: int
    tracked: int
    predicted: int
    ok: bool = False

    def __post_init__(self) -> None:
        self.ok = within_goal(self.tracked, self.predicted)


def batch_rows(name: str, measured: RealSizeModel, tokens: int) -> list[BatchRow]:
    found = []
    for rows in BATCH_ROWS:
        tracked = batch_phase(measured.fake, measured.model.thinker, tokens, rows)
        predicted = activation_bytes(measured.config, Budgets(tokens, batch_size=rows), DTYPE, False)
        found.append(
            BatchRow(name, rows, tokens, tracked, sum(predicted[k] for k in ("kv_cache", "other_rows", "prefill")))
        )
    return found


def gib(value: float) -> str:
    return f"{value / GiB:.2f}"


def print_shapes(rows: list[ShapeRow]) -> None:
    print("request shapes (GiB above the weights, all on the GPU; tracked / predicted per phase)")
    print(f"{'model':<5} {'shape':<28} {'tokens':>6} {'tracked':>8} {'predicted':>9} {'ratio':>6} ok   phases")
    for row in rows:
        phases = " ".join(
            f"{p}={gib(row.tracked[p])}/{gib(row.predicted[p])}" for p in PHASES if row.tracked[p] or row.predicted[p]
        )
        ratio = row.predicted_peak / row.tracked_peak if row.tracked_peak else math.nan
        print(
            f"{row.model:<5} {row.shape:<28} {row.tokens:>6} {gib(row.tracked_peak):>8} {gib(row.predicted_peak):>9} "
            f"{ratio:>6.2f} {'yes' if row.ok else 'NO':<4} {phases}"
        )


def print_plans(rows: list[PlanRow]) -> None:
    print(
        "\nplanner rows (GiB; GPU-side activations of the largest request; total = weights + activations + "
        "offload buffer + dequantization + fixed costs)"
    )
    print(
        f"{'model':<5} {'quant':<5} {'budget':>6} {'placement':<44} {'fits':<4} {'tracked':>8} {'predicted':>9} "
        f"{'total tracked':>13} {'total plan':>10} ok"
    )
    for row in rows:
        print(
            f"{row.model:<5} {row.quantization:<5} {row.budget_gib:>6g} {row.placement:<44} "
            f"{'yes' if row.fits else 'no':<4} {gib(row.tracked_gpu_activations):>8} "
            f"{gib(row.predicted_gpu_activations):>9} {gib(row.tracked_total):>13} {gib(row.predicted_total):>10} "
            f"{'yes' if row.ok else 'NO'}{'  ' + row.note if row.note else ''}"
        )


def markdown(report: dict[str, Any]) -> str:
    """The report as the README's tables: shapes, planner rows, fixed costs."""
    lines = [
        "| model | shape | tokens | tracked | predicted | ratio | phases (tracked / predicted) |",
        "|---" * 7 + "|",
    ]
    for row in report["shapes"]:
        phases = ", ".join(
            f"{p} {gib(row['tracked'][p])} / {gib(row['predicted'][p])}"
            for p in PHASES
            if row["tracked"][p] or row["predicted"][p]
        )
        ratio = row["predicted_peak"] / row["tracked_peak"]
        lines.append(
            f"| {row['model'].upper()} | {row['shape']} | {row['tokens']} | {gib(row['tracked_peak'])} | "
            f"{gib(row['predicted_peak'])} | {ratio:.2f} | {phases} |"
        )
    lines += ["", "| model | batch rows | tokens each | tracked | predicted | ratio |", "|---" * 6 + "|"]
    for row in report["batches"]:
        lines.append(
            f"| {row['model'].upper()} | {row['rows']} | {row['tokens']} | {gib(row['tracked'])} | "
            f"{gib(row['predicted'])} | {row['predicted'] / row['tracked']:.2f} |"
        )
    lines += ["", "| model | weights | GPU GiB | placement | fits | tracked | predicted | total tracked | total plan |"]
    lines.append("|---" * 9 + "|")
    for row in report["plans"]:
        lines.append(
            f"| {row['model'].upper()} | {row['quantization']} | {row['budget_gib']:g} | {row['placement']} | "
            f"{'yes' if row['fits'] else 'no'} | {gib(row['tracked_gpu_activations'])} | "
            f"{gib(row['predicted_gpu_activations'])} | {gib(row['tracked_total'])} | {gib(row['predicted_total'])} |"
        )
    lines.append("")
    lines += [f"| {cost['name']} | {cost['bytes'] / MiB:.0f} | {cost['source']} |" for cost in report["fixed_costs"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="3b,7b", help="comma-separated: 3b, 7b")
    parser.add_argument("--quantization", default="none,nf4,int8", help="planner rows: none, nf4, int8")
    parser.add_argument("--out", default="memory_check.json", help="where the JSON report goes")
    parser.add_argument("--markdown", action="store_true", help="print the report as the README's tables too")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = Settings(enable_audio_output=True)
    report: dict[str, Any] = {
        "fixed_costs": [asdict(cost) for cost in FIXED_COSTS],
        "shapes": [],
        "batches": [],
        "plans": [],
    }
    for name in args.models.split(","):
        config = load_config(str(ROOT / "configs" / MODELS[name]))
        config.enable_audio_output = True
        measured = RealSizeModel(config, settings.speech_chunk_blocks)
        shapes = shape_rows(name, measured, request_shapes(settings, config))
        plans = plan_rows(name, config, settings, largest_request(shapes), args.quantization.split(","))
        batches = batch_rows(name, measured, settings.max_context_tokens)
        report["shapes"] += [asdict(row) for row in shapes]
        report["batches"] += [asdict(row) for row in batches]
        report["plans"] += [asdict(row) for row in plans]
        print_shapes(shapes)
        for batch in batches:
            print(
                f"{name} batch of {batch.rows} x {batch.tokens} tokens: tracked {gib(batch.tracked)} GiB, predicted "
                f"{gib(batch.predicted)} GiB: {'yes' if batch.ok else 'NO'}"
            )
        print_plans(plans)
        print()
    print("fixed costs the tracker cannot see (in every plan's headroom):")
    for cost in FIXED_COSTS:
        print(f"  {cost.name}: {cost.bytes / MiB:.0f} MiB ({cost.source})")
    Path(args.out).write_text(json.dumps(report, indent=1))
    if args.markdown:
        print("\n" + markdown(report))
    rows = report["shapes"] + report["batches"] + report["plans"]
    failed = [r for r in rows if not r["ok"]]
    print(f"\n{len(failed)} of {len(rows)} rows miss the goal; report: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
