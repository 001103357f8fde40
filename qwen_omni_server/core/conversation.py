"""The one conversation builder, used by both engines: a request's turns with its system prompt (or the
default), the speech persona as the model's authors advise, and what each file of it is.

The local engine gives these turns to the processor; the upstream engine sends them as Chat Completions
messages: either way the model reads the same conversation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from qwen_omni_server.core.audio import INPUT_SAMPLE_RATE
from qwen_omni_server.core.media import PictureFile
from qwen_omni_server.core.types import ChatTurn, GenerationRequest, VideoInput

# The official system prompt: the talker only speaks under it (Qwen2.5-Omni README, "Prompt for audio output").
OFFICIAL_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)
# With speech, a custom persona goes into the conversation as the model's authors advise (Qwen2.5-Omni
# README, "Customization Settings"): a user turn with the persona, this answer, then the dialogue.
PERSONA_ACKNOWLEDGEMENT = "Sure, I got it."


def conversation(request: GenerationRequest, default_system_prompt: str) -> list[ChatTurn]:
    """The conversation, system turn first. Speech needs the official system prompt: a custom one goes
    into the dialogue as the model's authors advise, a user turn and the model's acknowledgement."""
    turns = (
        list(request.turns)
        if request.turns
        else [ChatTurn("user", [*request.images, *request.audios, *request.videos, *filter(None, [request.text])])]
    )
    given = [part for turn in turns if turn.role == "system" for part in turn.parts if isinstance(part, str)]
    if not given and request.system_prompt is not None:
        given = [request.system_prompt]
    system = "\n".join(given) if given else default_system_prompt
    dialogue = [turn for turn in turns if turn.role != "system"]
    if request.return_audio:
        if given and system.strip() and system != OFFICIAL_SYSTEM_PROMPT:
            dialogue = [ChatTurn("user", [system.strip()]), ChatTurn("assistant", [PERSONA_ACKNOWLEDGEMENT]), *dialogue]
        system = OFFICIAL_SYSTEM_PROMPT
    return [ChatTurn("system", [system]), *dialogue]


def videos_of(turns: list[ChatTurn]) -> list[VideoInput]:
    return [part for turn in turns for part in turn.parts if isinstance(part, VideoInput)]


def interleaves_video_audio(videos: list[VideoInput]) -> bool:
    """Whether the videos' sound is read interleaved with their frames: only when every video has sound
    (else each sounding video's track follows it as plain audio)."""
    return bool(videos) and all(video.audio is not None for video in videos)


def describe_image(image: Image.Image | PictureFile) -> dict[str, Any]:
    return {"width": image.width, "height": image.height}


def describe_audio(samples: np.ndarray) -> dict[str, Any]:
    return {"seconds": round(len(samples) / INPUT_SAMPLE_RATE, 3)}


def describe_video(video: VideoInput) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "frames": len(video.frames),
        "fps": round(video.fps, 3),
        "seconds": round(len(video.frames) / video.fps, 3),
    }
    if video.audio is not None:
        entry["audio_seconds"] = round(len(video.audio) / INPUT_SAMPLE_RATE, 3)
    return entry


def describe_inputs(turns: list[ChatTurn]) -> dict[str, list[dict[str, Any]]]:
    """Per file, in conversation order, what it is: an image's size, an audio's seconds, a video's frames,
    rate and seconds (and its sound's). An engine that counts tokens adds them to these entries."""
    parts = [part for turn in turns for part in turn.parts]
    return {
        "images": [describe_image(p) for p in parts if isinstance(p, Image.Image | PictureFile)],
        "audios": [describe_audio(p) for p in parts if isinstance(p, np.ndarray)],
        "videos": [describe_video(p) for p in parts if isinstance(p, VideoInput)],
    }
