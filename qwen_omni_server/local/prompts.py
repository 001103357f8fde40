"""The prompt builder: a conversation of text and media, and the pixel and context budgets, in; the
processor's inputs, their token counts and what each file became, out.

No model inside: it needs the processor and the media token ids of the thinker's config. It calls
qwen-omni-utils' resizing and the processor the way the model's authors do (see the parity tests,
tests/test_reference_parity.py), so the model sees what the official pipeline would give it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from qwen_omni_server.core.conversation import (
    conversation,
    describe_audio,
    describe_image,
    describe_video,
    interleaves_video_audio,
    videos_of,
)
from qwen_omni_server.core.errors import InputRejected, PromptTooLong
from qwen_omni_server.core.settings import Settings
from qwen_omni_server.core.types import ChatTurn, GenerationRequest, VideoInput

IMAGE_PATCH_SIZE = 14
MERGE = 2  # 2x2 patches make one token


@dataclass(frozen=True)
class MediaTokenIds:
    """The placeholder token ids of the thinker's config, for counting prompt tokens by modality."""

    image: int
    audio: int
    video: int

    @classmethod
    def of(cls, thinker_config) -> MediaTokenIds:
        return cls(thinker_config.image_token_index, thinker_config.audio_token_index, thinker_config.video_token_index)


@dataclass
class Prompt:
    """The processor's output for one request, and what it holds."""

    inputs: dict[str, Any]  # the processor's tensors, on the CPU
    use_audio_in_video: bool  # generate() must get the same value
    by_modality: dict[str, int]  # prompt tokens: text, image, audio (a video's own too), video
    described: dict[str, list[dict]]  # per file, in prompt order: what the model got
    warnings: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


@dataclass
class _Media:
    """A conversation's media in prompt order, as the processor takes them."""

    images: list[Image.Image] = field(default_factory=list)
    audios: list[np.ndarray] = field(default_factory=list)
    owners: list[int | None] = field(default_factory=list)  # per audio: None, or the video whose track it is
    videos: list[VideoInput] = field(default_factory=list)


class PromptBuilder:
    """Turns + media + budgets -> processor inputs and token counts."""

    def __init__(self, processor, token_ids: MediaTokenIds, settings: Settings) -> None:
        self.processor = processor
        self.token_ids = token_ids
        self.settings = settings
        # "clip": audio features are padded to the longest clip, so their cost follows the clip's
        # length; "whisper": the feature extractor's default 300 s (as the reference does; benchmarks).
        self.audio_padding = "clip"

    # -- the conversation

    def turns(self, request: GenerationRequest) -> list[ChatTurn]:
        """The conversation the model reads (`core.conversation`, as the upstream engine sends it)."""
        return conversation(request, self.settings.default_system_prompt)

    # -- the processor's inputs

    def build(self, request: GenerationRequest) -> Prompt:
        """The processor's inputs for `request`, counted by modality, with what each file became."""
        from qwen_omni_utils.v2_5.vision_process import fetch_image

        turns = self.turns(request)
        videos, warnings = common_rate(videos_of(turns))
        use_audio_in_video = interleaves_video_audio(videos)
        conversation, media = self._conversation(turns, iter(videos), use_audio_in_video)
        prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        image_max, frame_max = self._pixel_budgets(request)
        image_min = min(self.settings.image_min_pixels, image_max)
        try:
            images = [
                fetch_image(
                    {"image": image, "min_pixels": image_min, "max_pixels": image_max},
                    image_patch_size=IMAGE_PATCH_SIZE,
                )
                for image in media.images
            ]
            video_tensors = [self._fetch_video(v, frame_max) for v in media.videos]
        except ValueError as error:  # qwen-omni-utils refuses e.g. aspect ratios over 200:1
            raise InputRejected(f"a picture cannot be given to the model: {error}") from None
        inputs = self.processor(
            text=prompt,
            images=images or None,
            audio=media.audios or None,
            videos=video_tensors or None,
            return_tensors="pt",
            padding=True,
            **self._processor_kwargs(media, use_audio_in_video),
        )
        inputs = dict(inputs)
        return Prompt(
            inputs=inputs,
            use_audio_in_video=use_audio_in_video,
            by_modality=self.count_by_modality(inputs["input_ids"]),
            described=self._describe(inputs, images, media, use_audio_in_video),
            warnings=warnings,
        )

    def _conversation(self, turns: list[ChatTurn], videos, use_audio_in_video: bool) -> tuple[list[dict], _Media]:
        """The chat template's conversation, and the media in the order the processor takes them."""
        conversation: list[dict[str, Any]] = []
        media = _Media()
        for turn in turns:
            content: list[dict[str, Any]] = []
            for part in turn.parts:
                if isinstance(part, str):
                    content.append({"type": "text", "text": part})
                elif isinstance(part, Image.Image):
                    content.append({"type": "image"})
                    media.images.append(part)
                elif isinstance(part, np.ndarray):
                    content.append({"type": "audio"})
                    media.audios.append(part)
                    media.owners.append(None)
                else:
                    video = next(videos)
                    content.append({"type": "video"})
                    media.videos.append(video)
                    if video.audio is not None:
                        media.audios.append(video.audio)
                        media.owners.append(len(media.videos) - 1)
                        if not use_audio_in_video:  # mixed silent and sounding videos: the track follows as audio
                            content.append({"type": "audio"})
            conversation.append({"role": turn.role, "content": content})
        return conversation, media

    def _pixel_budgets(self, request: GenerationRequest) -> tuple[int, int]:
        """Each image's and each video frame's pixel budget: the request's max_pixels, else the settings'."""
        s = self.settings
        image_max = request.max_pixels or s.image_max_pixels
        frame_max = min(request.max_pixels, s.video_max_pixels) if request.max_pixels else s.video_max_pixels
        return image_max, frame_max

    def _fetch_video(self, video: VideoInput, frame_max: int):
        from qwen_omni_utils.v2_5.vision_process import fetch_video

        s = self.settings
        frame_min = min(s.video_min_pixels, frame_max)
        return fetch_video(
            {
                "video": video.frames,
                "sample_fps": video.fps,
                "min_pixels": frame_min,
                "max_pixels": frame_share(len(video.frames), frame_max, s.video_total_pixels, frame_min),
                "total_pixels": s.video_total_pixels,
            },
            image_patch_size=IMAGE_PATCH_SIZE,
        )

    def _processor_kwargs(self, media: _Media, use_audio_in_video: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if media.audios and self.audio_padding == "clip":
            # Whisper pads every clip to 300 s by default; pad only to the longest clip and one STFT window of
            # silence (whole 10 ms frames), so that the clip's last frames see silence after it, as in the
            # reference, and not the clip's own end mirrored: every frame the model reads is the same.
            extractor = self.processor.feature_extractor
            longest = max(len(a) for a in media.audios)
            fitted = -(-(longest + extractor.n_fft) // extractor.hop_length) * extractor.hop_length
            kwargs["audio_kwargs"] = {"max_length": fitted}
        if media.images:
            kwargs["images_kwargs"] = {"do_resize": False}  # fetch_image already sized them
        if media.videos:
            kwargs["videos_kwargs"] = {
                "fps": media.videos[0].fps,  # the processor takes one rate: common_rate made them equal
                "do_resize": False,
                "do_sample_frames": False,
                "cap_pixels_per_frame": False,
            }
        if use_audio_in_video:
            kwargs.update(load_audio_from_video=True, audio_from_video_indices=media.owners)
        return kwargs

    def _describe(
        self, inputs: dict[str, Any], images: list[Image.Image], media: _Media, use_audio_in_video: bool
    ) -> dict[str, list[dict]]:
        """Per file, what the model got (`core.conversation`'s entries: sizes after resizing, seconds, frames and
        their real rate) with its tokens, and whether a video's sound was interleaved with its frames."""
        audio_tokens = _audio_token_counts(inputs.get("feature_attention_mask"))
        track_of = {owner: i for i, owner in enumerate(media.owners) if owner is not None}
        described: dict[str, list[dict]] = {"images": [], "audios": [], "videos": []}
        for image, grid in zip(images, inputs.get("image_grid_thw", [])):
            described["images"].append({**describe_image(image), "tokens": int(grid.prod()) // MERGE**2})
        for samples, owner, tokens in zip(media.audios, media.owners, audio_tokens):
            if owner is None:
                described["audios"].append({**describe_audio(samples), "tokens": tokens})
        for index, (video, grid) in enumerate(zip(media.videos, inputs.get("video_grid_thw", []))):
            entry = {**describe_video(video), "tokens": int(grid.prod()) // MERGE**2}
            entry["audio_interleaved"] = use_audio_in_video and index in track_of
            if index in track_of:
                entry["audio_tokens"] = audio_tokens[track_of[index]]
            described["videos"].append(entry)
        return described

    # -- counting and fitting

    def count_by_modality(self, input_ids) -> dict[str, int]:
        """Prompt tokens by modality; the audio of a video counts as audio."""
        ids = input_ids[0]
        counts = {
            "image": int((ids == self.token_ids.image).sum()),
            "audio": int((ids == self.token_ids.audio).sum()),
            "video": int((ids == self.token_ids.video).sum()),
        }
        return {"text": int(ids.numel()) - sum(counts.values()), **counts}

    def fit_context(self, by_modality: dict[str, int], max_new_tokens: int) -> tuple[int, list[str]]:
        """Refuse a prompt over MAX_CONTEXT_TOKENS; shorten the answer bound to what is left."""
        context = self.settings.max_context_tokens
        prompt = sum(by_modality.values())
        if prompt >= context:
            counts = ", ".join(f"{name} {count}" for name, count in by_modality.items() if count)
            raise PromptTooLong(
                f"the prompt is {prompt} tokens ({counts}), over MAX_CONTEXT_TOKENS={context}. "
                f"{how_to_fit(max(by_modality, key=lambda name: by_modality[name]))}"
            )
        room = context - prompt
        if max_new_tokens <= room:
            return max_new_tokens, []
        return room, [f"max_new_tokens lowered from {max_new_tokens} to {room} to fit MAX_CONTEXT_TOKENS={context}"]


def _audio_token_counts(feature_attention_mask) -> list[int]:
    """Audio tokens per clip, from its feature frames (the audio tower's own length formula)."""
    if feature_attention_mask is None:
        return []
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths

    return [int(n) for n in _get_feat_extract_output_lengths(feature_attention_mask.sum(-1))]


def frame_share(frames: int, frame_max: int, total: int, frame_min: int) -> int:
    """Each frame's pixel budget: its share of the video's total (frames go in pairs), as qwen-omni-utils
    computes it, so the budget it is given never exceeds the one it would apply."""
    pairs_of_frames = frames + frames % 2
    return int(max(min(frame_max, total / pairs_of_frames * 2), frame_min * 1.05))


def how_to_fit(largest: str) -> str:
    """What would make a prompt fit, for its largest modality."""
    advice = {
        "image": "Send smaller or fewer images, a lower `max_pixels`, or lower IMAGE_MAX_PIXELS.",
        "video": "Send shorter or fewer videos, use extract_video_frame / extract_video_audio, or lower "
        "VIDEO_TOTAL_PIXELS, VIDEO_MAX_FRAMES or VIDEO_FPS.",
        "audio": "Send shorter audio (each second costs 25 tokens), or use extract_video_frame for videos.",
        "text": "Send a shorter text or system_prompt.",
    }[largest]
    return f"{advice} Or raise MAX_CONTEXT_TOKENS (the memory plan grows with it)."


def common_rate(videos: list[VideoInput]) -> tuple[list[VideoInput], list[str]]:
    """Videos brought to one frame rate (the processor takes one fps per request), and a warning when
    their rates could not be matched. Each keeps every k-th frame, k chosen to come closest to the
    slowest video's rate; a video's rate is the real one between its kept frames (media.load_video)."""
    if not videos:
        return [], []
    rate = min(v.fps for v in videos)
    matched, off = [], []
    for index, video in enumerate(videos):
        step = max(1, round(video.fps / rate))
        matched.append(VideoInput(frames=video.frames[::step], fps=rate, audio=video.audio))
        if abs(video.fps / step - rate) > 0.05 * rate:
            off.append(f"video {index + 1} at {video.fps / step:.3g} fps")
    warnings = (
        [
            f"the model takes one frame rate per request, {rate:.3g} fps here, but the videos' frames could not "
            f"all be brought to it ({', '.join(off)}): their timing is approximate"
        ]
        if off
        else []
    )
    return matched, warnings
