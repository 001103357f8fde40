"""Build a tiny, randomly initialised Qwen2.5-Omni checkpoint for tests and offline smoke runs.

    python tests/tiny_model.py OUT_DIR

It uses the real classes (thinker, talker, token2wav), a byte-level BPE tokenizer with
Qwen2.5-Omni's special tokens, the real processor and the official chat template, saved with
`save_pretrained` so that `MODEL_PATH=OUT_DIR python multimodal_api.py` serves it. Its weights
are random: its answers are gibberish. It exists to exercise every code path without a download.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    Qwen2_5OmniConfig,
    Qwen2_5OmniForConditionalGeneration,
    Qwen2_5OmniProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    WhisperFeatureExtractor,
)

# Qwen2.5-Omni's added tokens, in the real checkpoint's order (ids 151643..151664 there).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|vision_pad|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
# Tokens the talker reads from the thinker's embedding table (text start/end/pad, one per voice).
TALKER_TOKENS = ["<|tts_pad|>", "<|tts_bos|>", "<|tts_eos|>", "<|spk_chelsie|>", "<|spk_ethan|>"]
TOKENIZER_ATTRIBUTES = {
    "image_token": "<|IMAGE|>",
    "audio_token": "<|AUDIO|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}
# The official Qwen2.5-Omni chat template (chat_template.json of the released checkpoints).
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio "
    "{{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRAINING_TEXT = [
    "You are a helpful AI assistant. Describe the image, the audio and the video.",
    "What is in this picture? What do you hear? Summarise the clip in one sentence.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}<>-_/\\",
    "Bonjour, ¿qué tal? Grüße, 你好, こんにちは, привет.",
]
# Talker codec ids: codes 0..31, then the codec's pad/start/end/mask, as the real vocabulary orders them.
CODEC_PAD, CODEC_START, CODEC_END, CODEC_MASK, TALKER_VOCAB = 32, 33, 34, 35, 40
VOICES = ("Chelsie", "Ethan")


def build_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE trained here, in Qwen2's pre-tokenisation, with Qwen2.5-Omni's special tokens."""
    reference = Qwen2Tokenizer()  # carries Qwen2's normaliser and pre-tokeniser
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = reference._tokenizer.normalizer
    bpe.pre_tokenizer = reference._tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(TRAINING_TEXT * 20, trainer)
    vocab = bpe.get_vocab()
    merges = _merges_of(bpe)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        extra_special_tokens=TOKENIZER_ATTRIBUTES,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS + TALKER_TOKENS})
    return tokenizer


def _merges_of(bpe: Tokenizer) -> list[tuple[str, str]]:
    """The merge list of a trained BPE tokenizer, read back from its serialised form."""
    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def build_config(tokenizer: Qwen2Tokenizer, text_hidden: int = 64) -> Qwen2_5OmniConfig:
    """A Qwen2.5-Omni config of the real shape at toy sizes; token ids read back from the tokenizer. The
    thinker's text hidden size `text_hidden` is split over 4 heads (64: head size 16; vLLM's CPU attention
    needs 128: head size 32), its rotary halves over time, height and width as the real 16:24:24."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS + TALKER_TOKENS}
    vocab_size = len(tokenizer)
    half = text_hidden // 4 // 2
    mrope_section = [half // 4, 3 * half // 8, 3 * half // 8]
    media_ids = {
        "audio_token_index": ids["<|AUDIO|>"],
        "image_token_index": ids["<|IMAGE|>"],
        "video_token_index": ids["<|VIDEO|>"],
        "audio_start_token_id": ids["<|audio_bos|>"],
        "audio_end_token_id": ids["<|audio_eos|>"],
    }
    thinker = {
        **media_ids,
        "vision_start_token_id": ids["<|vision_bos|>"],
        "vision_end_token_id": ids["<|vision_eos|>"],
        "user_token_id": tokenizer.convert_tokens_to_ids("user") or 0,
        "position_id_per_seconds": 25,
        "seconds_per_chunk": 2,
        "audio_config": {
            "num_mel_bins": 128,
            "encoder_layers": 2,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "d_model": 32,
            "output_dim": text_hidden,
            "n_window": 100,
            "max_source_positions": 1500,
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": text_hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "hidden_act": "silu",
        },
        "text_config": {
            "vocab_size": vocab_size,
            "hidden_size": text_hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "tie_word_embeddings": False,
            "rope_parameters": {"mrope_section": mrope_section, "rope_theta": 1000000.0, "rope_type": "default"},
        },
    }
    talker = {
        **media_ids,
        "vision_start_token_id": ids["<|vision_bos|>"],
        "vision_end_token_id": ids["<|vision_eos|>"],
        "vocab_size": TALKER_VOCAB,
        "embedding_size": text_hidden,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 32768,
        "rope_parameters": {"mrope_section": [2, 3, 3], "rope_theta": 1000000.0, "rope_type": "default"},
        "tts_text_pad_token_id": ids["<|tts_pad|>"],
        "tts_text_start_token_id": ids["<|tts_bos|>"],
        "tts_text_end_token_id": ids["<|tts_eos|>"],
        "tts_codec_pad_token_id": CODEC_PAD,
        "tts_codec_start_token_id": CODEC_START,
        "tts_codec_end_token_id": CODEC_END,
        "tts_codec_mask_token_id": CODEC_MASK,
    }
    token2wav = {
        "dit_config": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "head_dim": 16,
            "ff_mult": 2,
            "emb_dim": 16,
            "num_embeds": TALKER_VOCAB,
            "mel_dim": 80,
            "enc_emb_dim": 16,
            "enc_dim": 16,
            "enc_channels": [32, 32, 32, 32, 96],
            "enc_attention_channels": 8,
            "enc_se_channels": 8,
            "look_ahead_layers": [1],
            "look_backward_layers": [0],
            "block_size": 24,
            "repeats": 2,
        },
        "bigvgan_config": {"mel_dim": 80, "upsample_initial_channel": 64},
    }
    return Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker, token2wav_config=token2wav)


def build_processor(tokenizer: Qwen2Tokenizer) -> Qwen2_5OmniProcessor:
    """Whisper features (128 mel bins, 16 kHz) + Qwen2-VL image and video processors + the chat template."""
    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(
            min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2
        ),
        video_processor=Qwen2VLVideoProcessor(
            min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2
        ),
        feature_extractor=WhisperFeatureExtractor(
            feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=300, n_fft=400
        ),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def build_speakers(config: Qwen2_5OmniConfig, tokenizer: Qwen2Tokenizer) -> dict:
    """`spk_dict.pt`: one entry per voice, as the released checkpoints ship it."""
    dit = config.token2wav_config.dit_config
    generator = torch.Generator().manual_seed(0)
    return {
        name: {
            "bos_token": tokenizer.convert_tokens_to_ids(f"<|spk_{name.lower()}|>"),
            "cond": torch.randn(dit.enc_emb_dim, generator=generator),
            "ref_mel": torch.randn(1, 30, dit.mel_dim, generator=generator),
        }
        for name in VOICES
    }


def build(out_dir: str | Path, seed: int = 0, text_hidden: int = 64) -> Path:
    """Build and save the tiny checkpoint into `out_dir` (the thinker's text hidden size `text_hidden`, see
    build_config); returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = build_config(tokenizer, text_hidden)
    model = Qwen2_5OmniForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    build_processor(tokenizer).save_pretrained(out)
    torch.save(build_speakers(config, tokenizer), out / "spk_dict.pt")
    return out


def build_real_size(
    config_file: str | Path,
    out_dir: str | Path,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    audio_output: bool = True,
) -> Path:
    """A released architecture (a config file of configs/) with random weights, saved with the tokenizer
    made here (the config's special-token ids mapped onto it): real memory and time, gibberish answers."""
    tokenizer = build_tokenizer()
    first = 151643  # the released tokenizer's id of the first special token
    real_ids = {first + i: tokenizer.convert_tokens_to_ids(t) for i, t in enumerate(SPECIAL_TOKENS)}

    def remap(value, key=""):
        if isinstance(value, dict):
            return {k: remap(v, k) for k, v in value.items()}
        if isinstance(value, int) and key.endswith(("_id", "_index")) and value in real_ids:
            return real_ids[value]
        return value

    config = Qwen2_5OmniConfig.from_dict(remap(json.loads(Path(config_file).read_text())))
    config.enable_audio_output = audio_output
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5OmniForConditionalGeneration._from_config(config, dtype=dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    del model
    build_processor(tokenizer).save_pretrained(out)
    torch.save(build_speakers(config, tokenizer), out / "spk_dict.pt")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/tiny_model.py OUT_DIR")
    print(f"tiny random Qwen2.5-Omni written to {build(sys.argv[1])}")
