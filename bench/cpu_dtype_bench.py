"""float32 against bfloat16 on the CPU: prefill and decode tokens per second of the 3B thinker.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cpu_dtype_bench.py [--threads 1] [--prompt 256] [--new 16] [--repeats 3] [--layers 2]

The 3B architecture (configs/qwen2.5-omni-3b.config.json) with random weights and its language model
cut to a few decoder layers: each layer costs what it costs in the full model, and the whole still
fits in memory. The time inside the decoder layers is clocked, and the full 36-layer model's
tokens/s are the time outside them (embeddings, lm_head, generation) plus 36 times the measured
time per layer. The encoders are cut to one layer each (this bench reads text). Prefill: logits of the last position only,
as the engine computes them. bfloat16 is measured against float32 in the same run (ratio < 1: slower).
The last line is DTYPE=auto's start-up check in the same run (`devices.measure_matmul_pace`: one MLP product
of the thinker, for a decoding step and a 64-token prefill), to compare with what the whole model shows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from qwen_omni_server.local.devices import measure_matmul_pace, thinker_widths
from qwen_omni_server.local.loading import MODEL_SHORTHANDS, load_config
from qwen_omni_server.local.residency import keep_last_logits

OUT = ROOT / "bench" / "out"


def build_thinker(layers: int, dtype: torch.dtype):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    config = load_config(str(MODEL_SHORTHANDS["3b"])).thinker_config
    config.text_config.num_hidden_layers = layers
    config.vision_config.depth = 1
    config.vision_config.fullatt_block_indexes = [0]
    config.audio_config.encoder_layers = 1
    torch.manual_seed(0)
    thinker = Qwen2_5OmniThinkerForConditionalGeneration._from_config(config, dtype=dtype).eval()
    keep_last_logits(thinker.lm_head)
    return thinker


class LayerClock:
    """Seconds spent inside the decoder layers (forward pre- and post-hooks on each)."""

    def __init__(self, layers: torch.nn.ModuleList) -> None:
        self.seconds, self._started = 0.0, 0.0
        for layer in layers:
            layer.register_forward_pre_hook(self._enter)
            layer.register_forward_hook(self._leave)

    def _enter(self, *_args) -> None:
        self._started = time.perf_counter()

    def _leave(self, *_args) -> None:
        self.seconds += time.perf_counter() - self._started


def measure(thinker, prompt: int, new: int, repeats: int, full_layers: int) -> dict[str, float]:
    """Seconds of the prefill (one token generated) and of `new` tokens after it, for the full model:
    the time outside the decoder layers as measured, plus the measured time per layer times the
    full model's layer count. The best of `repeats` runs counts (other work inflates them less)."""
    layers = thinker.model.language_model.layers
    clock = LayerClock(layers)
    ids = torch.randint(1000, 100_000, (1, prompt))
    mask = torch.ones_like(ids)
    common = {"input_ids": ids, "attention_mask": mask, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}

    def seconds(tokens: int) -> tuple[float, float]:
        clock.seconds = 0.0
        started = time.perf_counter()
        thinker.generate(**common, max_new_tokens=tokens, min_new_tokens=tokens)
        total = time.perf_counter() - started
        per_layer = clock.seconds / len(layers)
        return total - clock.seconds + per_layer * full_layers, total

    with torch.inference_mode():
        seconds(2)  # warm-up
        prefill, prefill_measured = min(seconds(1) for _ in range(repeats))
        total, total_measured = min(seconds(new + 1) for _ in range(repeats))
    return {
        "prefill_s": prefill,
        "decode_s": max(total - prefill, 1e-9),
        "measured_prefill_s": prefill_measured,
        "measured_decode_s": max(total_measured - prefill_measured, 1e-9),
    }


def startup_check() -> dict[str, float]:
    """DTYPE=auto's start-up measurement on the 3B's shapes: bfloat16 / float32 speed, as the ratios above."""
    widths = thinker_widths(load_config(str(MODEL_SHORTHANDS["3b"])))
    fp32, bf16 = (measure_matmul_pace(dtype, *widths) for dtype in (torch.float32, torch.bfloat16))
    ratios = {
        "prefill": fp32.prefill_s / bf16.prefill_s,
        "decode": fp32.decode_s / bf16.decode_s,
        "reference_request": fp32.reference_request_s() / bf16.reference_request_s(),
    }
    print(
        f"DTYPE=auto's start-up check, bfloat16 / float32 speed: prefill {ratios['prefill']:.2f}, decode "
        f"{ratios['decode']:.2f}, reference request {ratios['reference_request']:.2f}: picks "
        f"{'bfloat16' if ratios['reference_request'] > 1 else 'float32'} (float32: {fp32}; bfloat16: {bf16})"
    )
    return ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (OMP)")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--new", type=int, default=16, help="new tokens timed after the prefill")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the best counts")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers built (the full 3B has 36)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    full_layers = load_config(str(MODEL_SHORTHANDS["3b"])).thinker_config.text_config.num_hidden_layers
    results: dict[str, dict] = {}
    for dtype in (torch.float32, torch.bfloat16):
        thinker = build_thinker(args.layers, dtype)
        timing = measure(thinker, args.prompt, args.new, args.repeats, full_layers)
        del thinker
        name = str(dtype).removeprefix("torch.")
        results[name] = {
            **timing,
            "prefill_tokens_per_s_36_layers": args.prompt / timing["prefill_s"],
            "decode_tokens_per_s_36_layers": args.new / timing["decode_s"],
        }
        print(
            f"{name:>9}: 3B ({full_layers} layers, from {args.layers} measured) prefill "
            f"{results[name]['prefill_tokens_per_s_36_layers']:.1f} tokens/s, decode "
            f"{results[name]['decode_tokens_per_s_36_layers']:.2f} tokens/s  "
            f"({args.layers} layers as run: prefill {timing['measured_prefill_s']:.2f} s, "
            f"decode {timing['measured_decode_s']:.2f} s)",
            flush=True,
        )
    fp32, bf16 = results["float32"], results["bfloat16"]
    ratios = {
        "prefill": bf16["prefill_tokens_per_s_36_layers"] / fp32["prefill_tokens_per_s_36_layers"],
        "decode": bf16["decode_tokens_per_s_36_layers"] / fp32["decode_tokens_per_s_36_layers"],
    }
    print(
        f"bfloat16 / float32 tokens/s: prefill {ratios['prefill']:.2f}, decode {ratios['decode']:.2f} "
        f"({args.threads} thread(s), {args.prompt}-token prompt, {args.new} new tokens)"
    )
    check = startup_check()
    OUT.mkdir(parents=True, exist_ok=True)
    report = {"threads": args.threads, "prompt": args.prompt, "new": args.new, "repeats": args.repeats}
    report["layers"] = args.layers
    report.update(results=results, ratios=ratios, startup_check=check)
    (OUT / "cpu_dtype_bench.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
