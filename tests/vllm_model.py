"""A tiny Qwen2.5-Omni that vLLM's CPU build serves, for tests/test_vllm.py.

    python tests/vllm_model.py OUT_DIR

tests/tiny_model.py's checkpoint with the thinker's text hidden size 128 over its 4 heads: vLLM's CPU
attention needs a head size of at least 32 (16 kills its engine at the first generation). vLLM serves the
thinker of it (text answers); the tokenizer, processor and chat template are tiny_model's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tiny_model

TEXT_HIDDEN = 128  # head size 32


def build(out_dir: str | Path, seed: int = 0) -> Path:
    """Build and save the checkpoint into `out_dir`; returns the path."""
    return tiny_model.build(out_dir, seed, text_hidden=TEXT_HIDDEN)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/vllm_model.py OUT_DIR")
    print(f"tiny random Qwen2.5-Omni for vLLM written to {build(sys.argv[1])}")
